"""A scaling sweep end to end, as a user runs it: `python -m gpt.scaling run` on a micro-grid (two sizes,
three token budgets, tiny models, a few steps each), interrupted with Ctrl-C and resumed without re-running
finished points, then collected and fitted with its plots; and the same grid in WSD branch mode."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

GRID = """[sweep]
shapes = [{{n_layer = 1, n_embd = 32, n_head = 2}}, {{n_layer = 2, n_embd = 32, n_head = 2}}]
tokens = [4096, 8192, 16384]
schedule = "{schedule}"
warmup_frac = 0.25

[train]
block_size = 32
batch_size = 8
eval_interval = 8
eval_iters = 2
log_interval = 4
data_dir = "{data_dir}"
"""


def sweep(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "gpt.scaling", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_micro_grid_runs_is_interrupted_resumes_and_is_fitted(tmp_path, data_dir):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(schedule="cosine", data_dir=data_dir))
    out = tmp_path / "sweep"
    first = sweep("run", grid, f"--out={out}")
    deadline = time.monotonic() + 300
    while not list(out.glob("*/eval.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGINT)  # the runner alone (a terminal's Ctrl-C would reach the point too)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/eval.json")}
    assert 1 <= len(finished) < 6

    second = sweep("run", grid, f"--out={out}")
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    assert "6 of 6 points finished" in stdout
    for name, mtime in finished.items():  # finished points were not run again
        assert (out / name / "eval.json").stat().st_mtime_ns == mtime
        assert len([r for r in rows(out / name / "metrics.jsonl") if r.get("event") == "start"]) == 1
        assert f"start {name}" not in stdout
    summary = rows(out / "summary.jsonl")
    assert len(summary) == 6 and (out / "summary.csv").is_file()
    for r in summary:
        cfg = json.loads((out / r["name"] / "config.json").read_text())
        assert r["tokens"] == cfg["max_iters"] * 8 * 32 and r["steps"] == cfg["max_iters"]
        assert r["flops_spent"] == r["flops"] and r["mode"] == "cosine"
        assert 0 < r["epochs"] < 1 and r["repeats_data"] is False
        assert r["val_tokens"] > 100_000 and r["val_bpb"] == pytest.approx(r["val_loss"] / 0.6931471805599453)
    # the longer runs of each size reach a lower loss on the whole validation split
    for layers in (1, 2):
        by_tokens = sorted((r["tokens"], r["val_loss"]) for r in summary if r["n_layer"] == layers)
        assert [loss for _, loss in by_tokens] == sorted((loss for _, loss in by_tokens), reverse=True)
    # the runner fitted the finished grid and drew its plots
    for name in ("fit.json", "fit.md", "loss_vs_compute.png", "fit_vs_observed.png", "loss_curves.png"):
        assert (out / name).is_file(), name
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "ci"} <= set(json.loads((out / "fit.json").read_text()))
    # collect rebuilds the same table from the runs' own files
    (out / "summary.jsonl").unlink()
    assert sweep("collect", out).wait(timeout=120) == 0
    assert rows(out / "summary.jsonl") == summary


def test_the_wsd_mode_branches_cooldowns_and_spends_less(tmp_path, data_dir):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(schedule="wsd", data_dir=data_dir))
    run = sweep("run", grid, f"--out={tmp_path / 'sweep'}", "--workers=2")
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert "2 worker(s), 1 CPU core(s) each" in stdout
    summary = {r["name"]: r for r in rows(tmp_path / "sweep" / "summary.jsonl")}
    assert len(summary) == 6
    branches = [r for r in summary.values() if r["mode"] == "wsd-branch"]
    assert len(branches) == 4
    for r in branches:
        trunk = summary[r["branch_of"]]
        assert trunk["mode"] == "wsd" and trunk["n_layer"] == r["n_layer"]
        assert r["flops_spent"] == pytest.approx(r["flops"] * round(0.2 * r["steps"]) / r["steps"])  # cooldown only
        start = next(x for x in rows(tmp_path / "sweep" / r["name"] / "metrics.jsonl") if x.get("event") == "start")
        assert start["start_step"] == r["steps"] - round(0.2 * r["steps"])
    assert "less than running each point alone" in stdout
