"""Starting a run from another run's checkpoint (init_from=RUN_DIR[@STEP]), the steps save_steps keeps,
and the validation bits per byte in every evaluation row.

The contract a WSD sweep relies on: a cooldown branched at step s off a longer wsd run ends exactly where a
run of the branch's own length would have, because parameters, optimizer state, step (so the learning rate
and the batches) all carry over."""

import json
import math

import jax
import numpy as np
import pytest

from gpt import checkpoint, trainer
from gpt.config import ConfigError
from tests.helpers import TINY

WSD = ["--schedule=wsd", "--cooldown_frac=0.2", "--warmup_iters=2", "--eval_interval=100"]


def run(data_dir, out, *flags):
    """Train in this process; returns the rows of out/metrics.jsonl."""
    cfg = trainer.prepare_run([*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", *flags])
    trainer.train(cfg, ["test"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out):
    return jax.tree.leaves(checkpoint.load_params(str(out), -1, trainer.Config().mesh)[1])


def test_a_wsd_cooldown_branched_off_a_longer_run_equals_the_run_of_its_own_length(data_dir, tmp_path):
    trunk, branch, alone = tmp_path / "trunk", tmp_path / "branch", tmp_path / "alone"
    run(data_dir, trunk, *WSD, "--max_iters=20", "--save_steps=8", "--keep_checkpoints=1")
    assert trainer.checkpoint_steps(str(trunk)) == [8, 20]  # save_steps are kept past keep_checkpoints
    # a 10-step wsd run cools down over its last 2 steps: from step 8, where the trunk was still stable
    branch_rows = run(data_dir, branch, *WSD, "--max_iters=10", f"--init_from={trunk}@8")
    alone_rows = run(data_dir, alone, *WSD, "--max_iters=10")
    train = [{r["step"]: (r["loss"], r["lr"]) for r in rows if "loss" in r} for rows in (branch_rows, alone_rows)]
    assert sorted(train[0]) == [8, 9]  # the branch trained steps 8 and 9 only
    for step in (8, 9):
        np.testing.assert_allclose(train[0][step], train[1][step], rtol=1e-5)
    assert train[0][9][1] < train[0][8][1]  # it did cool down
    for a, b in zip(final_params(branch), final_params(alone)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    start = next(r for r in branch_rows if r.get("event") == "start")
    assert start["start_step"] == 8 and start["config"]["init_from"] == f"{trunk}@8"


def test_reset_optimizer_keeps_the_parameters_and_starts_over_at_step_0(data_dir, tmp_path):
    source_rows = run(data_dir, tmp_path / "a", "--max_iters=6", "--eval_interval=6")
    rows = run(data_dir, tmp_path / "b", "--max_iters=4", "--eval_interval=4", "--warmup_iters=2",
               f"--init_from={tmp_path / 'a'}", "--reset_optimizer=True")
    # step 0's evaluation sees the source's final parameters (evaluation batches are fixed)
    assert rows[1]["step"] == 0 and rows[1]["val_loss"] == pytest.approx(source_rows[-1]["val_loss"], rel=1e-6)
    first_train = next(r for r in rows if "loss" in r)
    assert first_train["step"] == 0 and first_train["lr"] == pytest.approx(3e-3 / 3, rel=1e-6)  # a new warmup


@pytest.mark.parametrize("flags, message", [
    (["--init_from={src}@5"], "has checkpoints at steps [4, 8], not 5"),
    (["--init_from={src}", "--n_layer=3"], "is a model with n_layer=2, but n_layer=3 was asked"),
    (["--init_from={src}", "--tokenizer=gpt2"], "was trained with tokenizer=byte"),
    (["--init_from={src}/nowhere"], "init_from="),
    (["--save_steps=4,x"], "save_steps='4,x': must be comma-separated"),
    (["--schedule=step"], "schedule='step': use cosine, linear or wsd"),
    (["--schedule=wsd", "--cooldown_frac=0"], "cooldown_frac=0.0: must be in (0, 1]"),
    (["--schedule=wsd", "--warmup_iters=7"], "runs into the wsd cooldown"),
    (["--schedule=wsd", "--cooldown_frac=0.95", "--max_iters=100"], "warmup_iters=10 runs into the wsd cooldown"),
])
def test_bad_starts_are_refused_in_one_line(data_dir, tmp_path, flags, message):
    src = tmp_path / "src"
    if any("{src}" in f for f in flags):
        run(data_dir, src, "--eval_interval=4")
    with pytest.raises(ConfigError) as e:
        trainer.prepare_run([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'new'}",
                             *(f.format(src=src) for f in flags)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_evaluation_row_has_bits_per_byte(data_dir, tmp_path):
    """Byte tokens are one byte each: bits per byte is the loss in bits."""
    evals = [r for r in run(data_dir, tmp_path / "run") if "val_loss" in r]
    assert len(evals) == 3
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-6)
