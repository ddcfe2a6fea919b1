"""The scaling plots (gpt/scaling/plots.py): which PNG files a fit writes, the loss curves read from each
run's metrics.jsonl, and the whole `fit` command on a sweep directory."""

import json

import numpy as np
import pytest

from gpt.scaling import fit as scaling
from gpt.scaling import plots, report
from tests.helpers import run_command
from tests.test_scaling_fit import isoflop_points, noisy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, path


def test_a_fit_with_isoflop_profiles_writes_three_plots(tmp_path):
    results = isoflop_points(sizes=5)
    result = scaling.fit(results, resamples=10, drop_highest=1)
    written = plots.plot_fit(results, result, tmp_path)
    assert [p.name for p in written] == ["loss_vs_compute.png", "isoflop.png", "fit_vs_observed.png"]
    for path in written:
        assert_png(path)


def test_without_isoflop_profiles_the_isoflop_plot_is_skipped(tmp_path):
    N = np.geomspace(1e6, 1e9, 8)  # one token count: L(N), and every point its own budget
    results = {"N": N, "D": np.full(8, 1e10), "loss": noisy(2 + 50 / N ** 0.3, 0.01, seed=0)}
    result = scaling.fit(results, resamples=10)
    assert result["law"] == "L(N)" and "skipped" in result["approach2"]
    written = plots.plot_fit(results, result, tmp_path)
    assert [p.name for p in written] == ["loss_vs_compute.png", "fit_vs_observed.png"]
    assert not (tmp_path / "isoflop.png").exists()


def write_run(run_dir, evals: list[tuple[int, float]], batch_size=4, accumulation=2, block_size=16):
    """A run's metrics.jsonl as the trainer writes it: a start row with the config, train and eval rows."""
    run_dir.mkdir(parents=True)
    config = {"batch_size": batch_size, "gradient_accumulation_steps": accumulation, "block_size": block_size}
    rows = [{"event": "start", "config": config, "start_step": 0}]
    for step, val_loss in evals:
        rows += [{"step": step, "val_loss": val_loss, "train_loss": val_loss}, {"step": step, "loss": 9.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loss_curves_count_tokens_per_step_and_keep_a_resumed_runs_latest_eval(tmp_path):
    write_run(tmp_path / "a", [(0, 5.0), (10, 4.0), (20, 3.5), (20, 3.4)])  # step 20 evaluated again on resume
    tokens, val_loss = plots._loss_curve(tmp_path / "a")
    np.testing.assert_array_equal(tokens, [0, 10 * 4 * 2 * 16, 20 * 4 * 2 * 16])
    np.testing.assert_array_equal(val_loss, [5.0, 4.0, 3.4])
    write_run(tmp_path / "b", [(0, 5.0), (10, 3.0)])
    rows = [{"out_dir": "a", "params_non_embedding": 1e6}, {"out_dir": "b", "params_non_embedding": 4e6},
            {"out_dir": "never_started", "params_non_embedding": 2e6}]
    assert_png(plots.plot_loss_curves(tmp_path, rows))
    assert plots.plot_loss_curves(tmp_path, rows[2:]) is None
    assert not (tmp_path / "never_started").exists()


@pytest.fixture
def sweep_dir(tmp_path):
    """A collected IsoFLOP sweep: summary.jsonl and each point's metrics.jsonl."""
    points = isoflop_points(budgets=(1e17, 1e18, 1e19), sizes=5)
    rows = []
    for i, (n, d, c, loss) in enumerate(zip(points["N"], points["D"], points["compute_budget"], points["loss"])):
        name = f"point{i:02d}"
        rows.append({"name": name, "out_dir": name, "n_layer": 2, "n_embd": 64, "params_total": 1.1 * n,
                     "params_non_embedding": n, "tokens": d, "flops": 6 * n * d, "compute_budget": c,
                     "val_loss": loss, "repeats_data": False, "epochs": 0.5})
        write_run(tmp_path / name, [(0, 11.0), (100, loss + 1), (200, loss)])
    (tmp_path / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_the_fit_command_on_a_sweep_writes_its_tables_and_plots(sweep_dir, capsys):
    code, out, err = run_command(report.main, [str(sweep_dir), "--resamples=20", "--compute=1e20"], capsys)
    assert code == 0, err
    names = ["fit.json", "fit.md", "loss_vs_compute.png", "isoflop.png", "fit_vs_observed.png", "loss_curves.png"]
    assert f"wrote {', '.join(names)} in {sweep_dir}" in out
    for name in names[2:]:
        assert_png(sweep_dir / name)
    result = json.loads((sweep_dir / "fit.json").read_text())
    assert result["params"] == "non_embedding" and result["files"] == names
    assert (sweep_dir / "fit.md").read_text() in out  # what is printed is what fit.md holds
