"""One run's curves from its metrics.jsonl, as one PNG: a look at a run without a notebook.

    python -m gpt.plot OUT_DIR [--out=FILE.png]      # default OUT_DIR/curves.png; prints the path written

Four panels: train and validation loss against the step, the same against tokens trained on (with validation
bits per byte on a second axis where the log has them), the learning rate, and throughput. The log is read as
the trainer writes it: a start row per (re)start carrying the config, train rows (`loss`), evaluation rows
(`val_loss`). A resumed run repeats the steps after its last checkpoint, so the last row of each step wins:
those are the values the run continued from. A resume may change the batch, so the tokens a step trains on
are taken from the start row in force at that step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt.config import ConfigError, help_text, opt, parse_args
from gpt.files import log_rows

USAGE = "usage: python -m gpt.plot OUT_DIR [--out=FILE.png]"


@dataclass
class PlotArgs:
    out: str = opt("", "the PNG to write; empty = OUT_DIR/curves.png")


@dataclass
class RunLog:
    """metrics.jsonl reduced to one row per step: train rows and eval rows, each sorted by step, and the
    tokens per step from each start row, keyed by the step it started at."""

    train: list[dict]
    evals: list[dict]
    tokens_per_step: dict[int, int]
    n_params: int | None


def read_log(out_dir: str) -> RunLog:
    """The run's metrics.jsonl, the last row of each step kept. A line that is not JSON (the tail of a killed
    run) is skipped with a warning; a log with neither train nor eval rows is refused."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"no metrics.jsonl in {out_dir}: plot a run directory that train.py wrote")
    rows, skipped = log_rows(path)
    train, evals, tokens_per_step, n_params = {}, {}, {}, None
    for row in rows:
        if row.get("event") == "start":
            per_step = step_tokens(row.get("config", {}))
            if per_step:
                tokens_per_step[row.get("start_step", 0)] = per_step
            n_params = (row.get("n_params") or {}).get("total", n_params)
        elif "val_loss" in row and "step" in row:
            evals[row["step"]] = row
        elif "loss" in row and "step" in row:
            train[row["step"]] = row
    if skipped:
        print(f"warning: skipped {skipped} lines of {path} that are not JSON rows", file=sys.stderr)
    if not train and not evals:
        raise ConfigError(f"{path} holds no train or eval rows: nothing to plot yet")
    return RunLog([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], tokens_per_step, n_params)


def step_tokens(config: dict) -> int | None:
    """Tokens one optimizer step trains on, from a start row's flat config (Config.tokens_per_step, read from
    the logged keys so an older log, whose config this code may no longer parse, still plots)."""
    try:
        return config["batch_size"] * config.get("gradient_accumulation_steps", 1) * config["block_size"]
    except (KeyError, TypeError):
        return None


def tokens_at(steps: np.ndarray, tokens_per_step: dict[int, int]) -> np.ndarray:
    """Tokens trained on before each step: each start row's tokens per step from its start step until the next
    start row's (steps before the first start row count at its rate)."""
    starts = sorted(tokens_per_step)
    ends = [*starts[1:], np.inf]
    tokens = np.zeros(len(steps))
    for i, (start, end) in enumerate(zip(starts, ends)):
        begin = 0 if i == 0 else start
        tokens += tokens_per_step[start] * np.clip(np.asarray(steps, float) - begin, 0, end - begin)
    return tokens


def column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have `key` (older logs lack some keys)."""
    kept = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    steps, values = zip(*kept) if kept else ((), ())
    return np.asarray(steps, float), np.asarray(values, float)


def plot_run(out_dir: str, out: str | None = None) -> Path:
    """Draw the run's curves (module docstring) into out (default OUT_DIR/curves.png); returns the path."""
    log = read_log(out_dir)  # before matplotlib: a bad directory is refused fast
    try:
        from matplotlib.figure import Figure  # a Figure of its own draws with Agg: no GUI, no global state
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from None

    fig = Figure(figsize=(12, 8), layout="constrained")
    by_step, by_tokens, lr, speed = fig.subplots(2, 2).flat
    curves = {"train loss (batch)": column(log.train, "loss"), "train loss (eval)": column(log.evals, "train_loss"),
              "val loss": column(log.evals, "val_loss")}
    styles = {"train loss (batch)": dict(alpha=0.5, lw=1), "train loss (eval)": dict(ls="--", marker="."),
              "val loss": dict(marker="o", ms=3)}
    for name, (steps, values) in curves.items():
        if len(steps):
            by_step.plot(steps, values, label=name, **styles[name])
            if log.tokens_per_step:
                by_tokens.plot(tokens_at(steps, log.tokens_per_step), values, label=name, **styles[name])
    by_step.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    by_step.legend()
    if log.tokens_per_step:
        by_tokens.set(xlabel="tokens", ylabel="loss (nats/token)", title="loss against tokens trained on")
        by_tokens.xaxis.set_major_formatter(EngFormatter())
        lines = by_tokens.get_lines()
        steps, bpb = column(log.evals, "val_bpb")
        if len(steps):  # bits per byte compare across tokenizers; older logs lack them
            bits = by_tokens.twinx()
            lines += bits.plot(tokens_at(steps, log.tokens_per_step), bpb, color="tab:purple", ls=":", marker="s",
                               ms=3, label="val bits/byte")
            bits.set_ylabel("val bits per byte")
        by_tokens.legend(handles=lines)  # one legend for both y axes
    else:
        by_tokens.text(0.5, 0.5, "no start row with the batch shape:\ntokens per step unknown",
                       ha="center", va="center", transform=by_tokens.transAxes)
    lr.plot(*column(log.train, "lr"))
    lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    speed.plot(*column(log.train, "tokens_per_s"))
    speed.set(xlabel="step", ylabel="tokens / s", title="throughput", ylim=(0, None))
    speed.yaxis.set_major_formatter(EngFormatter())
    size = f", {log.n_params / 1e6:.2f}M parameters" if log.n_params else ""
    fig.suptitle(f"{Path(out_dir).resolve().name}{size}")

    path = Path(out) if out else Path(out_dir) / "curves.png"
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e})") from None
    return path


def main(argv: list[str]) -> int:
    """`python -m gpt.plot OUT_DIR [--out=FILE.png]`: draw and print the path. Bad input raises ConfigError;
    the command line below turns it into one line and exit code 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(PlotArgs(), USAGE))
        return 0
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) != 1:
        raise ConfigError(f"give one run directory, not {len(positional)}: {USAGE}")
    args = parse_args(PlotArgs(), [a for a in argv if a.startswith("--")], allow_preset=False)
    print(plot_run(positional[0], args.out or None))
    return 0


if __name__ == "__main__":
    from gpt.exits import guarded

    sys.exit(guarded(lambda: main(sys.argv[1:])))
