"""Scaling experiments: sweeps of ordinary training runs over model size and token budget (sweep.py),
their summary rows (collect.py), power-law fits with bootstrap intervals (fit.py) and plots (plots.py).
`python -m gpt.scaling run|collect|fit` is the command line (__main__.py)."""
