"""The HTTP server: `python -m gpt.serve` (gpt/serve/__main__.py), its API (api.py), the decode engine that batches requests continuously (engine.py) and what it serves (model.py)."""
