"""gpt/plot.py on a synthetic metrics.jsonl of a resumed run: the last row of each step wins, tokens follow
the batch of the start row in force, a PNG is written, and bad input is one line with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gpt.plot import main, plot_run, read_log, tokens_at
from tests.helpers import REPO, run_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start_row(start_step: int, batch_size: int) -> dict:
    config = {"batch_size": batch_size, "gradient_accumulation_steps": 2, "block_size": 16, "n_layer": 2}
    return {"event": "start", "config": config, "start_step": start_step, "n_params": {"total": 12345}}


def write_log(out_dir, rows: list[dict], tail: str = "") -> None:
    out_dir.mkdir(exist_ok=True)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def train_row(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * min(1, (step + 1) / 4), "grad_norm": 1.0,
            "tokens_per_s": 1000.0 + step, "mfu": None}


@pytest.fixture
def resumed_run(tmp_path):
    """Steps 0-7 at 4 x 2 x 16 = 128 tokens per step (no val_bpb: an older log), killed; resumed from the
    step-5 checkpoint at 8 x 2 x 16 = 256 tokens per step up to step 12; a torn last line from a kill."""
    first = [start_row(0, 4), *(train_row(s, 5.0 - 0.1 * s) for s in range(8)),
             {"step": 0, "val_loss": 5.5, "train_loss": 5.4}, {"step": 5, "val_loss": 4.6, "train_loss": 4.5}]
    resumed = [start_row(5, 8), {"step": 5, "val_loss": 4.6, "train_loss": 4.5, "val_bpb": 6.6},
               *(train_row(s, 4.0 - 0.1 * s) for s in range(5, 13)),
               {"step": 10, "val_loss": 4.0, "train_loss": 3.9, "val_bpb": 5.8}]
    write_log(tmp_path / "run", first + resumed, tail='{"step": 13, "lo')
    return tmp_path / "run"


def test_the_last_row_of_each_step_wins_and_tokens_follow_the_batch_in_force(resumed_run, capsys):
    log = read_log(str(resumed_run))
    assert [r["step"] for r in log.train] == list(range(13))
    assert log.train[4]["loss"] == pytest.approx(4.6) and log.train[5]["loss"] == pytest.approx(3.5)  # resumed
    assert [r["step"] for r in log.evals] == [0, 5, 10] and log.evals[1]["val_bpb"] == 6.6
    assert log.tokens_per_step == {0: 128, 5: 256} and log.n_params == 12345
    assert "skipped 1 lines" in capsys.readouterr().err  # the torn line, said once
    np.testing.assert_array_equal(tokens_at(np.array([0, 3, 5, 10]), log.tokens_per_step),
                                  [0, 3 * 128, 5 * 128, 5 * 128 + 5 * 256])


def test_a_png_is_written_where_asked(resumed_run, tmp_path):
    for out, expected in ((None, resumed_run / "curves.png"), (str(tmp_path / "c.png"), tmp_path / "c.png")):
        path = plot_run(str(resumed_run), out)
        assert path == expected and path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 10_000


def test_a_log_without_start_rows_or_train_rows_still_plots(tmp_path):
    write_log(tmp_path / "run", [{"step": 0, "val_loss": 5.5, "train_loss": 5.4}])  # an --eval_only log
    assert plot_run(str(tmp_path / "run")).read_bytes().startswith(PNG_SIGNATURE)


def test_the_command_prints_the_path_it_wrote(resumed_run, capsys):
    code, out, _ = run_command(main, [str(resumed_run), f"--out={resumed_run / 'x.png'}"], capsys)
    assert code == 0 and out == f"{resumed_run / 'x.png'}\n"
    assert (resumed_run / "x.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("case, message", [
    ("no_log", "no metrics.jsonl in"),
    ("only_start", "holds no train or eval rows"),
    ("unknown_flag", "unknown key 'outt' (did you mean 'out'?)"),
    ("no_dir", "give one run directory, not 0"),
    ("two_dirs", "give one run directory, not 2"),
    ("unwritable", "cannot write"),
])
def test_bad_input_is_one_line_and_exit_2(resumed_run, tmp_path, capsys, case, message):
    write_log(tmp_path / "started", [start_row(0, 4)])
    argv = {"no_log": [str(tmp_path)], "only_start": [str(tmp_path / "started")],
            "unknown_flag": [str(resumed_run), "--outt=x.png"], "no_dir": ["--out=x.png"],
            "two_dirs": [str(resumed_run), str(resumed_run)],
            "unwritable": [str(resumed_run), f"--out={tmp_path / 'no' / 'such' / 'x.png'}"]}[case]
    code, out, err = run_command(main, argv, capsys)
    assert code == 2 and out == ""
    err_lines = [line for line in err.splitlines() if not line.startswith("warning: skipped")]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and message in err, err


def test_python_m_gpt_plot(resumed_run):
    r = subprocess.run([sys.executable, "-m", "gpt.plot", str(resumed_run)], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0 and r.stdout == f"{resumed_run / 'curves.png'}\n", r.stderr
    r = subprocess.run([sys.executable, "-m", "gpt.plot"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: give one run directory") and len(r.stderr.splitlines()) == 1
