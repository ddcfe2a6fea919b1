"""A sweep's table, rebuilt from its runs' own files: one summary row per finished point.

A point is finished when its run directory holds eval.json (the whole-split evaluation the sweep writes
after training). Everything else in a row comes from the run's config.json and metrics.jsonl, so
`python -m gpt.scaling collect SWEEP_DIR` can be run at any time, on any machine that sees the directory.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gpt.config import Config
from gpt.files import log_rows, write_atomic
from gpt.scaling.grid import counts, flops

# The summary's columns, in order (config, a nested dict, is left out of the CSV).
COLUMNS = ("name", "out_dir", "mode", "branch_of", "n_layer", "n_head", "n_embd", "block_size", "vocab_size",
           "params_total", "params_non_embedding", "steps", "tokens_per_step", "tokens", "compute_budget",
           "flops_6nd", "flops_attention", "flops", "flops_spent", "epochs", "repeats_data", "val_loss", "val_loss_se",
           "val_bpb", "val_tokens", "best_val_loss", "final_train_loss", "wall_s", "tokens_per_s")


def _segments(rows: list[dict]) -> list[list[dict]]:
    """metrics.jsonl split at its start rows: one list per process that trained the run."""
    segments: list[list[dict]] = []
    for row in rows:
        if row.get("event") == "start":
            segments.append([])
        elif segments:
            segments[-1].append(row)
    return segments


def summarize(sweep_dir: Path, point: dict) -> dict | None:
    """The summary row of one point (a dict from points.json), or None if it has not finished."""
    run = Path(sweep_dir) / point["name"]
    if not (run / "eval.json").is_file():
        return None
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    evaluation = json.loads((run / "eval.json").read_text())
    rows, _ = log_rows(run / "metrics.jsonl")
    starts = [r for r in rows if r.get("event") == "start"]
    m, steps = cfg.model, cfg.train.max_iters
    tokens = steps * cfg.tokens_per_step
    trained_here = (steps - (starts[0]["start_step"] if starts else 0)) * cfg.tokens_per_step  # a branch: its cooldown
    train_rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    speeds = sorted(r["tokens_per_s"] for r in train_rows)
    val_losses = [r["val_loss"] for r in rows if "val_loss" in r] + [evaluation["loss"]]
    epochs = tokens / evaluation["corpus_train_tokens"]
    return {
        "name": point["name"], "out_dir": point["name"], "mode": point["mode"], "branch_of": point["branch_of"],
        "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
        "vocab_size": m.vocab_size, **counts(cfg), "steps": steps, "tokens_per_step": cfg.tokens_per_step,
        "tokens": tokens, "compute_budget": point["compute_budget"], **flops(cfg, tokens),
        "flops_spent": flops(cfg, trained_here)["flops"], "epochs": epochs, "repeats_data": epochs > 1,
        "val_loss": evaluation["loss"], "val_loss_se": evaluation["loss_se"], "val_bpb": evaluation["bpb"],
        "val_tokens": evaluation["tokens"], "best_val_loss": min(val_losses),
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "wall_s": sum(max((r.get("elapsed_s", 0.0) for r in seg), default=0.0) for seg in _segments(rows)),
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
        "config": cfg.to_dict(),
    }


def collect(sweep_dir: Path) -> list[dict]:
    """Rebuild SWEEP_DIR/summary.jsonl and summary.csv from the finished points; returns the rows."""
    sweep_dir = Path(sweep_dir)
    points = json.loads((sweep_dir / "points.json").read_text())
    rows = [row for point in points if (row := summarize(sweep_dir, point))]
    write_atomic(sweep_dir / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([[r[c] for c in COLUMNS] for r in rows])
    write_atomic(sweep_dir / "summary.csv", text.getvalue())
    return rows


def table(rows: list[dict], planned: int) -> str:
    """A readable table of the rows, and what the sweep spent against independent runs of every point."""
    head = f"{'point':<24} {'mode':<10} {'N (non-emb)':>12} {'tokens':>10} {'FLOPs':>9} {'epochs':>6} " \
           f"{'val loss':>15} {'bpb':>6} {'wall':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<24} {r['mode']:<10} {r['params_non_embedding']:>12,} {r['tokens']:>10,} "
                     f"{r['flops']:>9.2e} {r['epochs']:>6.2f} {r['val_loss']:>8.4f}±{r['val_loss_se']:.4f} "
                     f"{r['val_bpb']:>6.3f} {r['wall_s']:>6.0f}s" + ("  (repeats data)" if r["repeats_data"] else ""))
    spent, alone = sum(r["flops_spent"] for r in rows), sum(r["flops"] for r in rows)
    lines.append(f"{len(rows)} of {planned} points finished; training compute {spent:.3e} FLOPs"
                 + (f", {100 * (1 - spent / alone):.0f}% less than running each point alone ({alone:.3e})"
                    if spent < alone else ""))
    return "\n".join(lines)


def compare(rows: list[dict], other: list[dict]) -> str:
    """The same grid run two ways (say WSD branches against independent cosine runs): each point's final
    validation loss in both and their difference, and the compute and wall time each spent in all."""
    theirs = {r["name"]: r for r in other}
    shared = [r for r in rows if r["name"] in theirs]
    lines = [f"{'point':<24} {'loss':>8} {'other':>8} {'diff':>8}"]
    for r in shared:
        lines.append(f"{r['name']:<24} {r['val_loss']:>8.4f} {theirs[r['name']]['val_loss']:>8.4f} "
                     f"{r['val_loss'] - theirs[r['name']]['val_loss']:>+8.4f}")
    if shared:
        diffs = [abs(r["val_loss"] - theirs[r["name"]]["val_loss"]) for r in shared]
        spent = sum(r["flops_spent"] for r in shared), sum(theirs[r["name"]]["flops_spent"] for r in shared)
        wall = sum(r["wall_s"] for r in shared), sum(theirs[r["name"]]["wall_s"] for r in shared)
        lines.append(f"{len(shared)} points in both: mean |diff| {sum(diffs) / len(diffs):.4f}, max {max(diffs):.4f}; "
                     f"compute {spent[0]:.3e} vs {spent[1]:.3e} FLOPs ({spent[0] / spent[1]:.2f}x), "
                     f"training wall time {wall[0]:.0f} s vs {wall[1]:.0f} s ({wall[0] / wall[1]:.2f}x)")
    return "\n".join(lines)
