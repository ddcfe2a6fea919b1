"""The training run's contracts that the review found broken, each with a test that failed before its fix:
the logged learning rate is the applied one after a skipped batch; a Ctrl-C during the last checkpoint's
finalisation cannot cut it short; a checkpoint of another tree layout or another corpus is refused in one
line; MFU never reads above 100%."""

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gpt import checkpoint, sharding, trainer
from gpt.config import load_config
from gpt.steps import build, make_train_step
from tests.helpers import TINY


def test_logged_lr_is_the_applied_lr_after_a_skipped_batch(data_dir):
    cfg = load_config([*TINY, "--vocab_size=256", "--warmup_iters=4", "--grad_clip=0", "--weight_decay=0"])
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, _, _, init = build(cfg, mesh)
        state = init(jax.random.key(0))
        step = jax.jit(make_train_step(model, tx, cfg))
        tokens = jax.random.randint(jax.random.key(1), (1, cfg.data.batch_size, cfg.model.block_size), 0, 256)
        batch = (tokens, jnp.roll(tokens, -1, axis=-1))
        good = state.params
        poisoned = jax.tree.map(lambda x: x, good)
        poisoned["ln_f"]["bias"] = jnp.full_like(good["ln_f"]["bias"], jnp.nan)
        skipped, m0 = step(state.replace(params=poisoned), batch)  # a non-finite loss: the update is dropped
        assert not bool(m0["finite"]) and int(skipped.step) == 1
        after, m1 = step(skipped.replace(params=good), batch)
    assert bool(m1["finite"])
    # Adam's first real update moves every parameter by lr * g / (|g| + eps), so by ~lr wherever |g| >> eps:
    # the step size of a bias (no weight decay here) is the learning rate that was applied.
    moved = np.abs(np.asarray(after.params["h_0"]["mlp"]["c_fc"]["bias"] - good["h_0"]["mlp"]["c_fc"]["bias"]))
    assert np.median(moved) == pytest.approx(float(m1["lr"]), rel=1e-3)
    assert float(m1["lr"]) != pytest.approx(float(m0["lr"]))  # the two steps' rates differ (warmup): a real check


def test_ctrl_c_while_the_last_checkpoint_finalises_does_not_cut_it_short(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    calls = {"final_saved": False, "in_save": False, "signalled": False}
    original_save, original_wait = checkpoint.save, ocp.CheckpointManager.wait_until_finished

    def save(manager, step, *args):
        calls["in_save"] = True  # orbax waits for the previous save inside save(): not the wait meant here
        original_save(manager, step, *args)
        calls["in_save"], calls["final_saved"] = False, step == cfg.train.max_iters

    def wait(manager):  # the user presses Ctrl-C just as the run waits for its last save to finalise
        if calls["final_saved"] and not calls["in_save"] and not calls["signalled"]:
            calls["signalled"] = True
            os.kill(os.getpid(), signal.SIGINT)
        original_wait(manager)

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    trainer.train(cfg, ["test"])  # before the fix: KeyboardInterrupt from inside the wait
    assert calls["signalled"]
    assert cfg.train.max_iters in checkpoint.make_manager(cfg.train.out_dir, read_only=True).all_steps()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored afterwards


def _meta_file(out_dir, step):
    return out_dir / "checkpoints" / str(step) / "meta" / "metadata"


@pytest.mark.slow
def test_checkpoints_of_another_layout_or_corpus_are_refused_in_one_line(cli, data_dir, tmp_path):
    out = tmp_path / "run"
    assert cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    path = _meta_file(out, 8)
    meta = json.loads(path.read_text())

    other = tmp_path / "other.txt"
    other.write_text("a different corpus, long enough for a block of 32 tokens. " * 20)
    r = cli("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=10", f"--dataset={other}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "was trained on the corpus" in errors[0]

    path.write_text(json.dumps({**meta, "opt_state_layout": 1}))  # an optimizer state this code no longer writes
    r = cli("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=10")
    assert r.returncode == 2 and "optimizer state of layout 1" in r.stderr and "Traceback" not in r.stderr
    sample = ["sample.py", f"--out_dir={out}", "--max_new_tokens=4", "--num_samples=1"]
    assert cli(*sample).returncode == 0  # its parameters still sample

    path.write_text(json.dumps({**meta, "model_layout": {"version": 0}}))
    r = cli(*sample)
    assert r.returncode == 2 and "model layout {'version': 0}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_mfu_never_reads_above_100_percent(cli, data_dir, tmp_path):
    # A per-device peak of 1 FLOP/s makes every step "faster than the peak": the run warns and reports no MFU.
    r = cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--peak_flops=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "above 100%" in r.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    mfus = [row["mfu"] for row in rows if "mfu" in row]
    assert mfus and all(m is None or m <= 1 for m in mfus)


def test_a_save_that_fails_says_so_in_one_line_and_keeps_the_last_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()  # checkpoints at 4 and 8
    original = ocp.CheckpointManager.save

    def full_disk(manager, step, *args, **kwargs):
        if step == 8:  # the disk fills during the second save: orbax wraps the OS error in its own
            try:
                raise OSError(28, "No space left on device")
            except OSError as e:
                raise RuntimeError("orbax: saving failed") from e
        return original(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(checkpoint.SaveError) as error:
        trainer.train(cfg, ["test"])
    message = str(error.value)
    assert "\n" not in message and "could not save checkpoint 8" in message and "No space left on device" in message
    assert "ENOSPC" in message and "the last complete checkpoint is step 4" in message
    monkeypatch.undo()
    out = Path(cfg.train.out_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]  # no temporary directory left
    _, params, _, step = checkpoint.load_params(cfg.train.out_dir, -1, cfg.mesh)
    assert step == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert not (out / "run.lock").exists()  # the lock went with the run
