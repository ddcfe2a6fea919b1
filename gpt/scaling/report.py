"""`python -m gpt.scaling fit RESULTS [flags]`: fit.py's fits printed as tables (or one JSON object) and
written next to the results as fit.json, fit.md and the plots (gpt/scaling/plots.py)."""

from __future__ import annotations

import json
from pathlib import Path

from gpt.config import ConfigError, check_writable_dir
from gpt.scaling.fit import FALSE_WORDS, TRUE_WORDS, fit, load_results

USAGE = ("usage: python -m gpt.scaling fit RESULTS [--json] [--params=total] [--compute=1e18] [--level=0.9] "
         "[--resamples=N] [--seed=S] [--drop_highest=K] [--drop_residual=R] [--exclude_repeated] [--no_plots]")
FLAGS = {  # flag: (type, default, meaning)
    "json": (bool, False, "print one JSON object on stdout instead of the tables"),
    "params": (str, "non_embedding", "N of a sweep directory: non_embedding or total parameters"),
    "compute": (float, None, "a budget C in FLOPs: its compute-optimal N, D and loss"),
    "level": (float, 0.95, "confidence level of the intervals"),
    "resamples": (int, 1000, "bootstrap resamples"),
    "seed": (int, 0, "seed of the resampling"),
    "drop_highest": (int, 0, "leave out the K highest-loss points"),
    "drop_residual": (float, None, "leave out points whose |log residual| under a first fit exceeds R"),
    "exclude_repeated": (bool, False, "leave out the points that saw their data more than once"),
    "no_plots": (bool, False, "write no PNG files"),
}
HELP = "\n".join([USAGE, "", "RESULTS is a sweep directory (its summary.jsonl) or a CSV/JSONL file with columns "
                   "params, loss, and tokens or flops.", "",
                   *(f"  --{k:<17} {json.dumps(d):<16} {m}" for k, (_, d, m) in FLAGS.items())])


def _parse(argv: list[str]) -> tuple[str, dict]:
    """(RESULTS, {flag: value}) from `RESULTS --key=value ...`; one line naming a bad flag."""
    path, options = None, {k: default for k, (_, default, _) in FLAGS.items()}
    allowed = ", ".join(f"--{k}" for k in FLAGS)
    for arg in argv:
        if not arg.startswith("-"):
            if path is not None:
                raise ConfigError(f"one RESULTS path expected, got {path!r} and {arg!r}; {USAGE}")
            path = arg
            continue
        key, has_value, raw = arg.lstrip("-").partition("=")
        if key not in FLAGS:
            raise ConfigError(f"unknown flag {arg.partition('=')[0]!r}; the flags are {allowed}")
        kind = FLAGS[key][0]
        if kind is bool and not has_value:  # a bare boolean flag means True
            options[key] = True
        elif not raw:
            raise ConfigError(f"--{key} needs a value: write it --{key}=VALUE")
        else:
            options[key] = _flag_value(key, raw, kind)
    if path is None:
        raise ConfigError(f"no RESULTS given; {USAGE}")
    return path, options


def _flag_value(key: str, raw: str, kind: type):
    bad = ConfigError(f"--{key}={raw!r} is not a valid {kind.__name__}")
    if kind is bool:
        if raw.lower() not in TRUE_WORDS + FALSE_WORDS:
            raise bad
        return raw.lower() in TRUE_WORDS
    if kind is str:
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise bad from None
    if kind is int:
        if not value.is_integer():
            raise bad
        return int(value)  # so 1e3 is 1000
    return value


def _number(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _span(pair) -> str:
    return "n/a" if pair is None or None in pair else f"[{pair[0]:.4g}, {pair[1]:.4g}]"


def _described(point: dict) -> list[str]:
    return [point["name"], _number(point["N"]), _number(point["D"]), _number(point["loss"])]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table with padded columns, so it reads as well in a terminal as rendered."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def report(result: dict) -> str:
    """fit()'s result as markdown: what fit.md holds, and what the command prints."""
    level = f"{100 * result['level']:g}%"
    terms = {"L(N, D)": "E + A/N^alpha + B/D^beta", "L(N)": "E + A/N^alpha", "L(D)": "E + B/D^beta"}
    which = {"non_embedding": "non-embedding parameters", "total": "all parameters"}.get(result["params"], "params")
    lines = [f"# Scaling-law fit of {result['source'] or 'the points'}", "",
             f"{result['law']} = {terms[result['law']]}, fitted to {result['n_points']} points (N: {which}) by the "
             f"Huber loss (delta {result['huber_delta']:g}) of log-residuals; {level} bootstrap intervals over "
             f"{result['resamples']} resamples (seed {result['seed']}).", ""]
    estimates = [k for k in ("E", "A", "B", "alpha", "beta", "a", "b") if result[k] is not None]
    lines += _table(["estimate", "value", f"{level} interval"],
                    [[k, _number(result[k]), _span(result["ci"][k])] for k in estimates])
    if result["a"] is not None:
        lines += ["", f"Compute-optimal (Approach 3): N_opt ∝ C^a, D_opt ∝ C^b with a = {result['a']:.3f} "
                      f"{_span(result['ci']['a'])}, b = {result['b']:.3f} {_span(result['ci']['b'])}."]
    if optimal := result["compute_optimal"]:
        lines += ["", f"## Compute-optimal allocation for C = {optimal['C']:.3g} FLOPs", ""]
        lines += _table(["", "value", f"{level} interval"],
                        [[k, _number(optimal[k]), _span(optimal["ci"][k])] for k in ("N_opt", "D_opt", "loss")])
    two = result["approach2"]
    lines += ["", "## Approach 2 (IsoFLOP profiles)", ""]
    if "skipped" in two:
        lines.append(f"Skipped: {two['skipped']}.")
    else:
        lines += [f"N* ∝ C^a with a = {two['a']:.3f} {_span(two['ci']['a'])}, D* ∝ C^b with b = {two['b']:.3f} "
                  f"{_span(two['ci']['b'])} ({two['resamples']} usable resamples).", ""]
        lines += _table(["C", "N*", "D*", "loss at N*", "sizes", "note"],
                        [[f"{m['C']:.3g}", _number(m["N_opt"]), _number(m["D_opt"]), _number(m["loss"]),
                          len(m["points"]), "minimum outside the sizes tried" if m["extrapolated"] else ""]
                         for m in two["minima"]])
    if result["dropped"]:
        lines += ["", "## Points left out", ""]
        lines += _table(["point", "N", "D", "loss", "why"],
                        [[*_described(p), p["reason"]] for p in result["dropped"]])
        lines += ["", "How the estimates moved:", ""]
        lines += _table(["estimate", "all points", "without them"],
                        [[k, _number(before), _number(after)] for k, (before, after) in result["moved"].items()])
    if result["flagged_repeats"]:
        fate = ("left out (--exclude_repeated)" if result["flagged_repeats"][0]["excluded"]
                else "kept (--exclude_repeated leaves them out)")
        lines += ["", "## Points that saw their data more than once", "",
                  f"The laws assume unique tokens; these points are {fate}.", ""]
        lines += _table(["point", "N", "D", "loss", "epochs"],
                        [[*_described(p), _number(p["epochs"])] for p in result["flagged_repeats"]])
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """`python -m gpt.scaling fit RESULTS [flags]`: fit, print, and write fit.json, fit.md and the plots next
    to the results. Bad input raises ConfigError (one line, exit 2 through gpt.exits.guarded)."""
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    path, opts = _parse(argv)
    results = load_results(path, opts["params"])
    result = fit(results, level=opts["level"], resamples=opts["resamples"], seed=opts["seed"],
                 compute=opts["compute"], drop_highest=opts["drop_highest"], drop_residual=opts["drop_residual"],
                 exclude_repeated=opts["exclude_repeated"])
    out_dir = Path(results["out_dir"])
    check_writable_dir("RESULTS", str(out_dir))
    written = [out_dir / "fit.json", out_dir / "fit.md"]
    if not opts["no_plots"]:
        from gpt.scaling import plots  # matplotlib only when plotting

        written += plots.plot_fit(results, result, out_dir)
        if results["sweep_dir"] and (curves := plots.plot_loss_curves(out_dir, results["rows"])):
            written.append(curves)
    result["files"] = [p.name for p in written]
    (out_dir / "fit.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "fit.md").write_text(report(result))
    if opts["json"]:
        print(json.dumps(result))
    else:
        print(report(result))
        print(f"wrote {', '.join(result['files'])} in {out_dir}")
    return 0
