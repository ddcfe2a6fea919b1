"""python -m gpt.scaling run|collect|fit ...: the scaling tools' command line (usage errors: one line, exit 2).

    python -m gpt.scaling run GRID [--out=SWEEP_DIR] [--workers=N] [--shard=i/n] [--schedule=cosine|wsd]
    python -m gpt.scaling collect SWEEP_DIR [--against=OTHER_SWEEP_DIR]
    python -m gpt.scaling fit RESULTS [--json] [--params=total] [--compute=C] ...   (see gpt/scaling/report.py)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from gpt.exits import guarded
from gpt.config import ConfigError

USAGE = __doc__.split("\n\n")[1]


def _options(argv: list[str], allowed: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(positional arguments, {flag: value}) of argv; one line for a flag not in allowed."""
    positional, options = [], {}
    for arg in argv:
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        if key not in allowed or not eq:
            raise ConfigError(f"unknown or malformed option '{arg}': use {', '.join(allowed.values())}")
        options[key] = value
    return positional, options


def _run(argv: list[str]) -> int:
    from gpt.scaling.sweep import parse_shard, run_sweep

    positional, opts = _options(argv, {"out": "--out=SWEEP_DIR", "workers": "--workers=N", "shard": "--shard=i/n",
                                       "schedule": "--schedule=cosine|wsd"})
    if len(positional) != 1:
        raise ConfigError("run takes one grid file: python -m gpt.scaling run GRID [--out=DIR] [--workers=N] "
                          "[--shard=i/n] [--schedule=cosine|wsd]")
    workers = opts.get("workers", "1")
    if not workers.isdigit() or int(workers) < 1:
        raise ConfigError(f"workers={workers!r}: must be a positive integer")
    return run_sweep(positional[0], opts.get("out"), int(workers), parse_shard(opts.get("shard", "0/1")),
                     opts.get("schedule"))


def _sweep_dir(path: str) -> Path:
    if not (Path(path) / "points.json").is_file():
        raise ConfigError(f"{path!r} is not a sweep directory (it has no points.json)")
    return Path(path)


def _collect(argv: list[str]) -> int:
    from gpt.scaling import collect

    positional, opts = _options(argv, {"against": "--against=OTHER_SWEEP_DIR"})
    if len(positional) != 1:
        raise ConfigError(f"collect takes one sweep directory, got {positional}")
    sweep_dir = _sweep_dir(positional[0])
    rows = collect.collect(sweep_dir)
    print(collect.table(rows, len(json.loads((sweep_dir / "points.json").read_text()))))
    if "against" in opts:
        print(collect.compare(rows, collect.collect(_sweep_dir(opts["against"]))))
    return 0


def run_point(argv: list[str]) -> int:
    """One point: train it as train.py would (config resolved against its out_dir, devices checked), then
    score the whole validation split into eval.json."""
    from gpt import prepare, trainer
    from gpt.eval import evaluate
    from gpt.files import write_atomic

    cfg = trainer.check_devices(trainer.prepare_run(argv))
    trainer.train(cfg, [sys.argv[0], *argv])
    saved = trainer.checkpoint_steps(cfg.train.out_dir)
    if not saved or saved[-1] < cfg.train.max_iters:  # stopped by a signal (having saved what it trained)
        return 130
    try:
        result = evaluate(cfg.train.out_dir, split="val")
    except KeyboardInterrupt:
        return 130
    result["corpus_train_tokens"] = sum(prepare.load_meta(d)["train_tokens"]  # for epochs
                                        for _, d in prepare.prepare_all(cfg.data, quiet=True))
    write_atomic(Path(cfg.train.out_dir) / "eval.json", json.dumps(result, indent=1) + "\n")  # marks it done
    return 0


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command in ("-h", "--help", ""):
        print(USAGE)
        return 0 if command else 2
    if command == "point":  # one point of a sweep, started by `run` (train.py's flags)
        from gpt.scaling.sweep import CPUS_ENV

        if os.environ.get(CPUS_ENV):  # this worker's share of the cores, taken before JAX starts
            os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
        return guarded(lambda: run_point(rest))
    if command == "fit":
        from gpt.scaling import report

        return guarded(lambda: report.main(rest))
    runners = {"run": _run, "collect": _collect}
    if command not in runners:
        print(f"error: unknown command {command!r}: use run, collect or fit (--help shows how)", file=sys.stderr)
        return 2
    return guarded(lambda: runners[command](rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
