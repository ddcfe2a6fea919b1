"""Training: the pure, jitted train/eval steps and the loop around them (logging, eval, checkpoints, signals).

train_step(state, batch) -> (state, metrics) is compiled once, ahead of time, with the state's shardings
and the state donated. Gradient accumulation is a lax.scan over micro-batches inside the step. Dropout keys
are derived from (seed, step), batches from (seed, step) too (gpt/data.py), so the state needs no RNG or
data cursor beyond its step counter and a resumed run repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from gpt import checkpoint, data, sharding
from gpt.config import Config, ConfigError, parse_args, read_args, resolve, validate
from gpt.model import GPT, attention_backend, count_params, flops_per_token
from gpt.optim import apply_updates, lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def loss_fn(params, model: GPT, x, y, dropout_key, deterministic: bool):
    rngs = {} if deterministic else {"dropout": dropout_key}
    logits, _ = model.apply({"params": params}, x, deterministic=deterministic, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(model: GPT, tx: optax.GradientTransformation, cfg: Config):
    schedule = lr_schedule(cfg.optim)
    deterministic = cfg.model.dropout == 0.0

    def train_step(state: TrainState, batch):
        """batch: (x, y), each [accumulation_steps, batch_size, block_size] int32."""
        step_key = jax.random.fold_in(jax.random.key(cfg.train.seed), state.step)

        def micro_step(grad_sum, inputs):
            x, y, i = inputs
            loss, grads = jax.value_and_grad(loss_fn)(state.params, model, x, y,
                                                      jax.random.fold_in(step_key, i), deterministic)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        n_micro = batch[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro_step, zeros, (*batch, jnp.arange(n_micro)))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule(state.step)
        params = apply_updates(state.params, direction, lr)
        loss, grad_norm = losses.mean(), optax.tree.norm(grads)
        # A non-finite loss or gradient never reaches the parameters: that step's update is dropped, and the
        # host decides (from `finite`) whether to stop the run or count the skipped batch.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(model: GPT, tx: optax.GradientTransformation, cfg: Config, shardings):
    """The train step compiled for the state's shardings, the state donated (updated in place)."""
    return jax.jit(make_train_step(model, tx, cfg), in_shardings=(shardings, None),
                   out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(model: GPT):
    def eval_step(params, batch):
        return loss_fn(params, model, batch[0], batch[1], None, deterministic=True)
    return eval_step


class Batches:
    """Loads this process's rows of the global batch for any step, straight into a sharded global array."""

    def __init__(self, cfg: Config, dataset_dir: Path, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.splits = {s: data.load_split(dataset_dir, s) for s in ("train", "val")}
        self.block = cfg.model.block_size

    def _load(self, stream: str, step: int, shape: tuple[int, int]):
        split = "val" if stream == "eval_val" else "train"
        tokens = self.splits[split]
        offsets = data.batch_offsets(self.cfg.train.seed, stream, step, shape, len(tokens), self.block)
        leading = len(shape) - 1
        global_shape = (*shape, self.block)
        target = sharding.batch_sharding(self.mesh, leading)
        rows = sharding.process_rows(target, global_shape, axis=leading)
        x, y = data.get_batch(tokens, offsets[..., rows], self.block)
        return tuple(sharding.global_batch(a, target, global_shape) for a in (x, y))

    def train(self, step: int):
        return self._load("train", step, (self.cfg.optim.gradient_accumulation_steps, self.cfg.data.batch_size))

    def eval(self, split: str, i: int):
        return self._load(f"eval_{split}", i, (self.cfg.data.batch_size,))


def peak_flops(cfg: Config) -> float:
    """Peak FLOP/s of all devices together: the config's per-device value, a known accelerator peak
    (dense bf16), or on CPU a quick measurement of a float32 matmul on this host."""
    n = jax.device_count()
    if cfg.train.peak_flops > 0:
        return cfg.train.peak_flops * n
    kind = jax.devices()[0].device_kind.lower()
    known = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
             "v5p": 459e12, "v5 lite": 197e12, "v5e": 197e12, "v6": 918e12, "v4": 275e12}
    for name, flops in known.items():
        if name in kind:
            return flops * n
    if jax.devices()[0].platform != "cpu":
        return float("nan")  # unknown accelerator: say so rather than guess; set --peak_flops
    size = 1024
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        matmul(a).block_until_ready()
    # CPU "devices" share the host's cores, so one host measurement covers all of a process's devices.
    return 10 * 2 * size**3 / (time.perf_counter() - t0) * jax.process_count()


def peak_memory() -> int | None:
    """Peak bytes allocated on this process's first device since start (None where the backend keeps no
    count, as on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gpt", "train.py", "sample.py"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Logger:
    """metrics.jsonl rows and terminal lines; only process 0 writes."""

    def __init__(self, out_dir: Path):
        self.main = jax.process_index() == 0
        self.path = out_dir / "metrics.jsonl"

    def row(self, **row) -> None:
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)


class StopFlag:
    """SIGTERM/SIGINT only set a flag; the loop saves at the end of the current step and exits cleanly.
    A second SIGINT stops at once."""

    def __init__(self):
        self.signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            # At once means at once: no unwinding through orbax's save threads. A half-written checkpoint
            # stays a temporary directory, which the next run ignores and cleans up.
            print("error: interrupted twice: stopped without saving; resume from the last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _control(step: int, stop: StopFlag, last_save: float, t) -> tuple[bool, bool]:
    """(stop now, a time-based save is due), agreed by every process. One process decides at every step;
    several exchange their flags at log steps (the same steps everywhere), so they all save the same step."""
    flags = np.array([stop.signal is not None,
                      t.checkpoint_minutes > 0 and time.monotonic() - last_save > 60 * t.checkpoint_minutes])
    if jax.process_count() > 1:
        if step % t.log_interval:
            return False, False
        flags = multihost_utils.process_allgather(flags).reshape(-1, 2).any(axis=0)
    return bool(flags[0]), bool(flags[1])


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def prepare_run(cfg: Config, argv: list[str]) -> Config:
    """Resolve the run's config against out_dir: on resume, the saved config is the base the command line
    overrides, and the architecture must match the checkpoint's."""

    validate(cfg)
    out = Path(cfg.train.out_dir)
    asked = {k for _, values in read_args(argv) for k in values}
    has_checkpoints = checkpoint.checkpoint_dir(cfg.train.out_dir).is_dir() and any(
        p.name.isdigit() for p in checkpoint.checkpoint_dir(cfg.train.out_dir).iterdir())
    if cfg.train.init_from == "resume" or cfg.train.eval_only:
        if not has_checkpoints or not (out / "config.json").is_file():
            raise ConfigError(f"no checkpoint to resume in {out}/checkpoints: train one first with --init_from=scratch")
        saved = Config.from_dict(json.loads((out / "config.json").read_text()))
        for key, value in dataclasses.asdict(saved.model).items():
            if key in asked and getattr(cfg.model, key) != value:
                raise ConfigError(f"{out} holds a model with {key}={value}, but {key}={getattr(cfg.model, key)} "
                                  "was asked; use another --out_dir or drop the override")
        cfg = parse_args(saved, argv)  # the saved run is the base; the command line changes the rest
        cfg.train.init_from = "resume"
    elif cfg.train.init_from != "scratch":  # fine-tune from a Hugging Face GPT-2 directory
        from gpt.hf import hf_model_config

        hf = hf_model_config(Path(cfg.train.init_from))
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
            if key in asked and getattr(cfg.model, key) != getattr(hf, key):
                raise ConfigError(f"init_from={cfg.train.init_from} is a model with {key}={getattr(hf, key)}, "
                                  f"but {key}={getattr(cfg.model, key)} was asked")
            setattr(cfg.model, key, getattr(hf, key))
        if "tokenizer" in asked and cfg.data.tokenizer != "gpt2":
            raise ConfigError(f"init_from={cfg.train.init_from} is a GPT-2 model: it needs tokenizer=gpt2")
        cfg.data.tokenizer = "gpt2"
    if cfg.train.init_from != "resume" and has_checkpoints and not cfg.train.overwrite:
        raise ConfigError(f"{out} already holds checkpoints: resume with --init_from=resume, "
                          "pick another --out_dir, or pass --overwrite=True to replace them")
    validate(cfg)
    return resolve(cfg)


def build(cfg: Config, mesh):
    """The model, the optimizer, and the train state's shapes, shardings and sharded initialiser on mesh
    (call under sharding.activate(mesh))."""
    model, tx = GPT(cfg.model), make_optimizer(cfg.optim)

    def init_fn(key):
        params = model.init(key, jnp.zeros((1, cfg.model.block_size), jnp.int32))["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    abstract, shardings, init = sharding.shard_init(init_fn, mesh, jax.random.key(cfg.train.seed))
    return model, tx, abstract, shardings, init


def train(cfg: Config, argv: list[str] | None = None) -> dict:
    """Run (or resume, or only evaluate) training as cfg says. Returns the last metrics."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out)
    if cfg.train.init_from != "resume" and cfg.train.overwrite and jax.process_index() == 0:
        for old in (checkpoint.checkpoint_dir(cfg.train.out_dir), out / "metrics.jsonl"):
            if old.exists():
                log.say(f"overwrite=True: removing {old}")
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    dataset_dir = data.prepare(cfg.data, quiet=jax.process_index() != 0)
    meta = data.validate(dataset_dir, cfg.data.tokenizer, cfg.model.block_size)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = meta["vocab_size"]
    elif cfg.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}")
    cfg.model.dtype = cfg.model.compute_dtype  # the saved config records what ran
    attention_backend(cfg.model)  # attention=cudnn where it cannot run: one line now, not a trace at compile
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.data.batch_size, mesh)
    with sharding.activate(mesh):
        model, tx, abstract, shardings, init = build(cfg, mesh)
        manager = checkpoint.make_manager(cfg.train.out_dir, cfg.train.keep_checkpoints)
        if cfg.train.init_from == "resume":
            step, params, opt_state, _ = checkpoint.restore(manager, None, abstract.params, abstract.opt_state)
            state = TrainState(jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), params, opt_state)
            log.say(f"resumed from {manager.directory}/{step}")
        else:
            state = init(jax.random.key(cfg.train.seed))
            if cfg.train.init_from != "scratch":
                from gpt.hf import from_hf

                params = jax.device_put(from_hf(cfg.train.init_from)[1], shardings.params)
                opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
                state = TrainState(state.step, params, opt_state)
                log.say(f"initialised from the GPT-2 weights in {cfg.train.init_from}")
        return _loop(cfg, argv or [], mesh, model, tx, state, shardings, manager, dataset_dir, meta, log)


def _loop(cfg, argv, mesh, model, tx, state, shardings, manager, dataset_dir, meta, log) -> dict:
    t = cfg.train
    n_params = count_params(state.params) - (cfg.model.padded_vocab_size - cfg.model.vocab_size) * cfg.model.n_embd
    batches = Batches(cfg, dataset_dir, mesh)
    tokens_per_step = cfg.data.batch_size * cfg.optim.gradient_accumulation_steps * cfg.model.block_size
    flops_per_step = flops_per_token(cfg.model, n_params) * tokens_per_step
    peak = peak_flops(cfg)
    start_step = int(state.step)

    eval_step = jax.jit(make_eval_step(model))

    def evaluate(params) -> dict:
        losses = {s: float(np.mean([eval_step(params, batches.eval(s, i)) for i in range(t.eval_iters)]))
                  for s in ("train", "val")}
        return {"val_loss": losses["val"], "train_loss": losses["train"]}

    ckpt_meta = {"config": cfg.to_dict(), "tokenizer": meta, "dataset_dir": str(dataset_dir)}

    def save(step: int) -> None:
        # The data position and RNG are (seed, step): batches and dropout keys derive from them alone.
        position = {"seed": t.seed, "next_step": step}
        checkpoint.save(manager, step, state.params, state.opt_state, {**ckpt_meta, "step": step, "data": position})

    attention = attention_backend(cfg.model)
    log.say(f"model: {n_params / 1e6:.2f}M parameters | mesh {dict(mesh.shape)} | {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s) | {tokens_per_step:,} tokens/step | attention {attention}")
    if t.eval_only:
        row = {"step": start_step, **evaluate(state.params)}
        log.row(**row)
        log.say(f"eval at step {start_step}: val loss {row['val_loss']:.4f}, train loss {row['train_loss']:.4f}")
        return row
    if start_step >= t.max_iters:
        log.say(f"already trained: checkpoint step {start_step} >= max_iters={t.max_iters}; nothing to do")
        return {"step": start_step}

    if jax.process_index() == 0:
        (Path(t.out_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log.row(event="start", time=time.strftime("%Y-%m-%dT%H:%M:%S"), argv=[sys.argv[0], *argv], code=code_version(),
            config=cfg.to_dict(), start_step=start_step, n_params=n_params, devices=jax.device_count(),
            device_kind=jax.devices()[0].device_kind, peak_flops=peak, attention=attention,
            jax_version=jax.__version__)

    t0 = time.perf_counter()
    compiled = jit_train_step(model, tx, cfg, shardings).lower(state, batches.train(start_step)).compile()  # ahead of time: fails before step 0
    log.say(f"compiled train step in {time.perf_counter() - t0:.1f}s")

    stop = StopFlag()
    last: dict = {}
    pending: list = []  # (step, device metrics) since the last log row: fetched together, so steps pipeline
    skipped = 0
    try:
        timer, timed_steps, run_start, last_save = time.perf_counter(), 0, time.perf_counter(), time.monotonic()
        for step in range(start_step, t.max_iters):
            if step % t.eval_interval == 0 and (step != start_step or step == 0):
                last = {"step": step, **evaluate(state.params)}
                log.row(**last)
                log.say(f"step {step}: val loss {last['val_loss']:.4f}, train loss {last['train_loss']:.4f}")
            stop_now, time_due = _control(step, stop, last_save, t)
            if step != start_step and (step % t.checkpoint_interval == 0 or time_due or stop_now):
                save(step)
                last_save = time.monotonic()
            if stop_now:
                log.say(f"{stop.signal or 'stop'}: saved checkpoint at step {step}; resume with --init_from=resume")
                return last
            if step % t.eval_interval == 0 or step % t.checkpoint_interval == 0:
                timer, timed_steps = time.perf_counter(), 0  # throughput counts training steps only

            state, metrics = compiled(state, batches.train(step))
            pending.append((step, metrics))
            timed_steps += 1
            if step % t.log_interval == 0 or step == t.max_iters - 1:
                fetched = jax.device_get(pending)  # waits for the steps to finish
                pending = []
                for bad_step, m in fetched:
                    if not m["finite"]:
                        if not t.skip_nonfinite:
                            raise FloatingPointError(
                                f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step "
                                f"{bad_step}; stopped without saving, the last good checkpoint is kept")
                        skipped += 1
                        log.say(f"warning: skipped the batch of step {bad_step}: non-finite loss or gradient")
                metrics = {k: float(v) for k, v in fetched[-1][1].items() if k != "finite"}
                elapsed = time.perf_counter() - timer
                tok_s = timed_steps * tokens_per_step / elapsed
                mfu = timed_steps * flops_per_step / elapsed / peak
                last = {"step": step, **metrics, "tokens_per_s": tok_s, "mfu": mfu if mfu == mfu else None,
                        "skipped_batches": skipped, "peak_memory_bytes": peak_memory()}  # mfu None: peak unknown
                log.row(**last)
                eta = (t.max_iters - step - 1) * tokens_per_step / tok_s
                log.say(f"step {step:>6} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                        f"grad {metrics['grad_norm']:.2f} | {tok_s:,.0f} tok/s | mfu {100 * mfu:.1f}% | eta {_fmt_time(eta)}")
                timer, timed_steps = time.perf_counter(), 0

        final = {"step": t.max_iters, **evaluate(state.params)}
        log.row(**final)
        log.say(f"step {t.max_iters}: val loss {final['val_loss']:.4f}, train loss {final['train_loss']:.4f} "
                f"({_fmt_time(time.perf_counter() - run_start)})")
        save(t.max_iters)
        return {**last, **final}
    finally:
        stop.restore()
        manager.wait_until_finished()  # async saves complete before the process exits
        manager.close()
