"""Training: learning at all, checkpoints that round-trip exactly, and resume that repeats the uninterrupted run."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from gpt import checkpoint, sharding
from gpt.cli import run_train
from gpt.optim import lr_schedule
from gpt.steps import build, make_train_step
from tests.helpers import TINY


def init_state(cfg):
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, abstract, _, init = build(cfg, mesh)
        return model, tx, abstract, init(jax.random.key(0))


def test_tiny_model_overfits_one_batch(tiny_cfg):
    cfg = tiny_cfg("--learning_rate=1e-2", "--max_iters=150", "--warmup_iters=10", "--weight_decay=0")
    model, tx, _, state = init_state(cfg)
    step = jax.jit(make_train_step(model, tx, cfg))
    x = jax.random.randint(jax.random.key(1), (1, 8, 32), 0, 256)
    batch = (x[:, :, :-1], x[:, :, 1:])
    losses = []
    for _ in range(150):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.0  # ~ln(256) at initialisation
    assert losses[-1] < 0.5, losses[-10:]


def test_gradient_accumulation_equals_one_big_batch(tiny_cfg):
    cfg1 = tiny_cfg("--batch_size=8", "--gradient_accumulation_steps=1")
    cfg2 = tiny_cfg("--batch_size=4", "--gradient_accumulation_steps=2")
    x = jax.random.randint(jax.random.key(1), (8, 33), 0, 256)
    results = []
    for cfg, shape in ((cfg1, (1, 8, 32)), (cfg2, (2, 4, 32))):
        model, tx, _, state = init_state(cfg)
        state, metrics = jax.jit(make_train_step(model, tx, cfg))(
            state, (x[:, :-1].reshape(shape), x[:, 1:].reshape(shape)))
        results.append((state.params, float(metrics["loss"])))
    assert abs(results[0][1] - results[1][1]) < 1e-5
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_dropout_is_on_in_the_train_step_exactly_when_asked(tiny_cfg):
    """The train step's loss equals the deterministic (eval) loss on the same weights and batch when
    dropout=0, and differs when dropout>0; the step says whether the update was finite as a boolean."""
    from gpt.steps import make_eval_step

    x = jax.random.randint(jax.random.key(1), (1, 8, 33), 0, 256)
    batch = (x[..., :-1], x[..., 1:])
    for dropout in (0.0, 0.3):
        cfg = tiny_cfg(f"--dropout={dropout}")
        model, tx, _, state = init_state(cfg)
        eval_loss = float(jax.jit(make_eval_step(model))(state.params, (batch[0][0], batch[1][0]),
                                                          jnp.ones(256, jnp.int32))[0])
        _, metrics = jax.jit(make_train_step(model, tx, cfg))(state, batch)
        assert metrics["finite"].dtype == jnp.bool_ and bool(metrics["finite"])
        if dropout == 0.0:
            assert abs(float(metrics["loss"]) - eval_loss) < 1e-6
        else:
            assert abs(float(metrics["loss"]) - eval_loss) > 1e-3


def test_a_step_whose_gradient_norm_overflows_is_dropped_though_its_loss_is_finite(tiny_cfg):
    """ln_f's scale at 1e20 makes logits (and a loss) of ~1e19, finite, and gradients whose squared norm
    overflows float32: the update must not reach the parameters or the optimizer state."""
    cfg = tiny_cfg()
    model, tx, _, state = init_state(cfg)
    params = {**state.params, "ln_f": {**state.params["ln_f"], "scale": jnp.full_like(state.params["ln_f"]["scale"], 1e20)}}
    state = type(state)(state.step, params, state.opt_state)
    x = jax.random.randint(jax.random.key(1), (1, 8, 33), 0, 256)
    new, metrics = jax.jit(make_train_step(model, tx, cfg))(state, (x[..., :-1], x[..., 1:]))
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"]) and int(new.step) == 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_schedule_warms_up_then_decays_to_min_lr(tiny_cfg):
    o = tiny_cfg("--learning_rate=1e-3", "--warmup_iters=10", "--lr_decay_iters=100", "--min_lr=1e-4").optim
    lr = lr_schedule(o)
    assert float(lr(0)) < float(lr(5)) < float(lr(9)) <= 1e-3
    assert abs(float(lr(10)) - 1e-3) < 1e-9
    assert abs(float(lr(100)) - 1e-4) < 1e-9 and abs(float(lr(500)) - 1e-4) < 1e-9


def test_checkpoint_round_trip_is_exact(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    model, tx, abstract, state = init_state(cfg)
    state, _ = jax.jit(make_train_step(model, tx, cfg))(state, (jnp.ones((1, 8, 32), jnp.int32),) * 2)
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    checkpoint.save(manager, 1, state.params, state.opt_state, {"hello": "world"})
    manager.wait_until_finished()
    step, params, opt_state, meta = checkpoint.restore(manager, None, abstract.params, abstract.opt_state)
    assert step == 1 and meta == {"hello": "world"}
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(opt_state) == jax.tree.structure(state.opt_state)


def _rows(out_dir):
    return [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]


def test_resumed_run_repeats_the_uninterrupted_run(data_dir, tmp_path):
    common = [*TINY, f"--data_dir={data_dir}", "--max_iters=8", "--warmup_iters=2", "--lr_decay_iters=8",
              "--dropout=0.1", "--checkpoint_interval=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train([*common, f"--out_dir={full}"]) == 0
    assert run_train([*common, f"--out_dir={part}", "--max_iters=4"]) == 0
    assert run_train([f"--out_dir={part}", "--init_from=resume", "--max_iters=8"]) == 0
    train = lambda d: {r["step"]: r["loss"] for r in _rows(d) if "loss" in r}
    evals = lambda d: {r["step"]: r["val_loss"] for r in _rows(d) if "val_loss" in r}
    assert [s for s in train(part) if s >= 4] == [4, 5, 6, 7]
    for s in (4, 5, 6, 7):
        assert train(part)[s] == train(full)[s]  # bit-identical on CPU
    assert evals(part)[8] == evals(full)[8]
    # Resuming a finished run says so and succeeds without training.
    assert run_train([f"--out_dir={part}", "--init_from=resume"]) == 0


def test_metrics_rows(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_train([*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--log_interval=3"]) == 0
    rows = _rows(out)
    start = rows[0]
    assert start["event"] == "start" and start["config"]["n_layer"] == 2 and "code" in start and "argv" in start
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [0, 3, 6, 7]
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s"} <= set(r)
        assert r["tokens_per_s"] > 0
        assert 0 <= r["data_wait_s"] < 60
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and all("loss" not in r and "train_loss" in r for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # train_s (the speedrun's clock) counts training steps only: it grows with every row, starts at 0 before the
    # first step, and stays below the wall time since the start, which also holds compilation and evaluations.
    clock = [r for r in rows if "train_s" in r]
    assert [r["step"] for r in clock] == [0, 0, 3, 4, 6, 7, 8] and clock[0]["train_s"] == 0
    assert all(a["train_s"] <= b["train_s"] for a, b in zip(clock, clock[1:])) and clock[-1]["train_s"] > 0
    assert all(r["train_s"] < r["elapsed_s"] for r in clock if "elapsed_s" in r)
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == 256 and saved["warmup_iters"] == 0 and saved["lr_decay_iters"] == 8
    # The config keeps what was asked (auto resumes right on another machine); the start row says what ran.
    assert saved["dtype"] == "auto"
    assert start["compute_dtype"] == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    assert set(start["versions"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"}
    assert start["n_params"]["matmul"] < start["n_params"]["total"] and start["peak_flops_source"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
