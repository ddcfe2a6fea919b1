"""The training run: the config resolved once against out_dir, then the loop around the compiled step
(evaluation, logging, checkpoints, signals).

    cfg = prepare_run(argv)   # preset + overrides (+ the saved run on resume), validated and resolved
    train(cfg, command)       # runs, resumes or only evaluates; returns the last metrics

The pure pieces live elsewhere: the jitted steps in gpt/steps.py, batches in gpt/data.py, peaks, versions
and metrics.jsonl in gpt/metrics.py, checkpoints in gpt/checkpoint.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gpt import checkpoint, data, metrics, prepare, sharding, sources, track
from gpt.config import (ARCHITECTURE_KEYS, Config, ConfigError, ModelConfig, apply_layers, check_writable_dir,
                        read_args, resolve, save_steps, split_init_from, validate)
from gpt.model import attention_backend, flops_per_token, param_counts
from gpt.runlock import RunLock
from gpt.steps import TrainState, abstract_batch, build, jit_train_step, make_eval_step
from gpt.tokenizer import get_tokenizer, token_bytes


def prepare_run(argv: list[str]) -> Config:
    """The run's config, resolved once: the preset and command line over the defaults, or on resume over the
    saved run (whose architecture they may not change), the shape of an HF model for init_from=DIR, the
    vocabulary from the tokenizer, then validated with every automatic value filled in. Touches no device.
    init_from=RUN_DIR[@STEP] or an HF directory fixes the architecture and tokenizer to the source's."""
    layers = read_args(argv)
    asked = {k for _, values in layers for k in values}
    cfg = apply_layers(Config(), layers)
    validate(cfg)
    track.parse_log_to(cfg.train.log_to)  # an unknown tracker: one line before anything starts
    out = Path(cfg.train.out_dir)
    has_checkpoints = bool(checkpoint_steps(cfg.train.out_dir))
    if cfg.train.init_from == "resume" or cfg.train.eval_only:
        if not has_checkpoints or not (out / "config.json").is_file():
            raise ConfigError(f"no checkpoint to resume in {out}/checkpoints: train one first with --init_from=scratch")
        saved = Config.from_dict(json.loads((out / "config.json").read_text()))
        for key in ARCHITECTURE_KEYS:  # how the run computes (dtype, remat, attention, ...) may change
            value = getattr(saved.model, key)
            if key in asked and getattr(cfg.model, key) != value:
                raise ConfigError(f"{out} holds a model with {key}={value}, but {key}={getattr(cfg.model, key)} "
                                  "was asked; use another --out_dir or drop the override")
        cfg = apply_layers(saved, layers)  # the saved run is the base; the command line changes the rest
        cfg.train.init_from = "resume"
    elif cfg.train.init_from != "scratch":  # continue another run, or fine-tune a Hugging Face GPT-2
        source, tokenizer = _init_source(cfg.train.init_from)
        for key in ARCHITECTURE_KEYS:
            if key in asked and getattr(cfg.model, key) != getattr(source, key):
                raise ConfigError(f"init_from={cfg.train.init_from} is a model with {key}={getattr(source, key)}, "
                                  f"but {key}={getattr(cfg.model, key)} was asked")
            setattr(cfg.model, key, getattr(source, key))
        if "tokenizer" in asked and cfg.data.tokenizer != tokenizer:
            raise ConfigError(f"init_from={cfg.train.init_from} was trained with tokenizer={tokenizer}: it needs that one")
        cfg.data.tokenizer = tokenizer
    if cfg.train.init_from != "resume" and has_checkpoints and not cfg.train.overwrite:
        raise ConfigError(f"{out} already holds checkpoints: resume with --init_from=resume, "
                          "pick another --out_dir, or pass --overwrite=True to replace them")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = get_tokenizer(cfg.data.tokenizer).vocab_size
    validate(cfg)
    check_writable_dir("out_dir", cfg.train.out_dir)
    for component in sources.parse_dataset(cfg.data.dataset):  # a bad spec, a missing file: one line now
        prepare.check_preparable(cfg.data, component)
    return resolve(cfg)


def check_devices(cfg: Config) -> Config:
    """What can still refuse a prepared run once the devices are known, before anything is allocated: the
    mesh, the batch split over it, and the plan's lower bound on memory per device."""
    from gpt import plan

    sharding.initialize_distributed(cfg.mesh)  # before anything touches a device
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.data.batch_size, mesh)
    plan.check(cfg, dict(mesh.shape))
    return cfg


def is_run_dir(path: str) -> bool:
    """A directory this trainer wrote (it has checkpoints/), as opposed to a Hugging Face model directory."""
    return checkpoint.checkpoint_dir(path).is_dir()


def checkpoint_steps(out_dir: str) -> list[int]:
    directory = checkpoint.checkpoint_dir(out_dir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _init_source(init_from: str) -> tuple[ModelConfig, str]:
    """The model config and tokenizer of what init_from names: RUN_DIR[@STEP] (whose step must exist) or an
    HF GPT-2 directory."""
    path, step = split_init_from(init_from)
    if not is_run_dir(path):
        from gpt.hf import hf_model_config

        return hf_model_config(Path(init_from)), "gpt2"
    steps = checkpoint_steps(path)
    if not steps or not (Path(path) / "config.json").is_file():
        raise ConfigError(f"init_from={init_from}: {path} holds no finished checkpoint to start from")
    if step >= 0 and step not in steps:
        raise ConfigError(f"init_from={init_from}: {path} has checkpoints at steps {steps}, not {step}")
    source = Config.from_dict(json.loads((Path(path) / "config.json").read_text()))
    return source.model, source.data.tokenizer


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


def _fmt_epochs(epochs: dict[str, float]) -> str:
    """The data position for the terminal: 0.42, or web 0.42 / code 1.30 for a mixture."""
    if len(epochs) == 1:
        return f"{next(iter(epochs.values())):.2f}"
    return " / ".join(f"{name} {e:.2f}" for name, e in epochs.items())


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: Config, command: list[str] | None = None) -> dict:
    """Run (or resume, or only evaluate) training as the resolved cfg says. Returns the last metrics.
    command: the command line, recorded in the start row."""
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = metrics.Logger(out)
    lock = RunLock(out) if jax.process_index() == 0 else None
    refusal = None
    try:
        note = lock.acquire() if lock else None
        if note:
            log.say(f"warning: {note}")
    except ConfigError as e:
        refusal, lock = e, None
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)) and not refusal:
        refusal = ConfigError(f"process 0 could not take the run lock of {out}: see its error")
    if refusal:
        raise refusal
    try:
        if jax.process_index() == 0:  # opened only now, so a refused run leaves no tracker run behind
            log = metrics.Logger(out, track.open_trackers(track.parse_log_to(cfg.train.log_to), out, out.name,
                                                          cfg.to_dict()))
        return _train(cfg, command or sys.argv, out, log)
    finally:
        try:
            log.close()
        finally:
            if lock:
                lock.release()


def _train(cfg: Config, command: list[str], out: Path, log: metrics.Logger) -> dict:
    if cfg.train.init_from != "resume" and cfg.train.overwrite and jax.process_index() == 0:
        for old in (checkpoint.checkpoint_dir(cfg.train.out_dir), out / "metrics.jsonl", out / "tensorboard",
                    out / "wandb"):
            if old.exists():
                log.say(f"overwrite=True: removing {old}")
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    corpora = data.load_corpora(cfg.data, cfg.model.block_size, quiet=jax.process_index() != 0)
    vocab_size = corpora[0].meta["vocab_size"]
    if cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}")
    attention_backend(cfg.model)  # attention=cudnn where it cannot run: one line now, not a trace at compile
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.data.batch_size, mesh)
    with sharding.activate(mesh):
        model, tx, abstract, shardings, init = build(cfg, mesh)
        manager = checkpoint.make_manager(cfg.train.out_dir, cfg.train.keep_checkpoints, keep_steps=save_steps(cfg.train))
        if cfg.train.init_from == "resume":
            meta = checkpoint.read_meta(manager, manager.latest_step())
            checkpoint.check_layouts(meta, cfg, f"{out} step {meta['step']}", with_opt_state=True)
            if isinstance(meta.get("corpus"), dict):  # written before corpus format 2: its batches cannot be repeated
                raise ConfigError(f"{out} was trained on a corpus prepared before format 2 (another validation split and "
                                  "data order): start a new run from its weights with --init_from=RUN_DIR instead")
            if "corpus" in meta and meta["corpus"] != data.identity(corpora):
                raise ConfigError(f"{out} was trained on the corpus {meta['corpus']}, but dataset={cfg.data.dataset} "
                                  f"is {data.identity(corpora)}: resume with the same corpus, or start a new run")
            step, params, opt_state, _ = checkpoint.restore(manager, None, abstract.params, abstract.opt_state)
            state = TrainState(jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), params, opt_state)
            log.say(f"resumed from {manager.directory}/{step}")
        elif is_run_dir(split_init_from(cfg.train.init_from)[0]):
            state = _start_from_run(cfg, tx, abstract, shardings, log)
        else:
            state = init(jax.random.key(cfg.train.seed))
            if cfg.train.init_from != "scratch":
                from gpt.hf import from_hf

                params = jax.device_put(from_hf(cfg.train.init_from, cfg.model.scan_layers)[1], shardings.params)
                state = TrainState(state.step, params, jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
                log.say(f"initialised from the GPT-2 weights in {cfg.train.init_from}")
        run = Run(cfg, mesh, model, tx, shardings, manager, data.Batches(cfg, corpora, mesh), log,
                  {"config": cfg.to_dict(), "tokenizer": {"tokenizer": cfg.data.tokenizer, "vocab_size": vocab_size},
                   "corpus": data.identity(corpora),
                   **checkpoint.layouts(cfg)})
        return run.loop(state, command)


def _start_from_run(cfg: Config, tx, abstract: TrainState, shardings: TrainState, log: metrics.Logger) -> TrainState:
    """The state of init_from=RUN_DIR[@STEP]: its parameters, and its optimizer state and step (so schedule
    and data order go on where it stopped: how a WSD sweep branches a cooldown), or with reset_optimizer a
    fresh optimizer state at step 0."""
    path, step = split_init_from(cfg.train.init_from)
    manager = checkpoint.make_manager(path, read_only=True)
    step = max(manager.all_steps()) if step < 0 else step
    reset = cfg.train.reset_optimizer
    checkpoint.check_layouts(checkpoint.read_meta(manager, step), cfg, f"{path} step {step}",
                             with_opt_state=not reset)
    try:
        _, params, opt_state, _ = checkpoint.restore(manager, step, abstract.params,
                                                     None if reset else abstract.opt_state)
    except ValueError as e:  # orbax: the saved optimizer tree is not this run's (grad_clip switched on or off)
        raise ConfigError(f"init_from={cfg.train.init_from}: its optimizer state does not fit this run's optimizer "
                          f"({str(e).splitlines()[0][:120]}); pass --reset_optimizer=True") from None
    finally:
        manager.close()
    log.say(f"initialised from {path} step {step}"
            f"{': its parameters only, a fresh optimizer state from step 0' if reset else ''}")
    if reset:
        opt_state, step = jax.jit(tx.init, out_shardings=shardings.opt_state)(params), 0
    return TrainState(jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), params, opt_state)


class Run:
    """One run's loop and what it writes: evaluation and train rows, checkpoints, the start row."""

    def __init__(self, cfg: Config, mesh, model, tx, shardings, manager, batches: data.Batches,
                 log: metrics.Logger, checkpoint_meta: dict):
        self.cfg, self.mesh, self.model, self.tx, self.shardings = cfg, mesh, model, tx, shardings
        self.manager, self.batches, self.log, self.checkpoint_meta = manager, batches, log, checkpoint_meta
        self.eval_step = jax.jit(make_eval_step(model))
        self.token_bytes = jnp.asarray(token_bytes(cfg.data.tokenizer))
        self.save_steps = save_steps(cfg.train)
        self.mfu_warned = False
        self.last_saved: int | None = None
        self.started = time.perf_counter()  # train and final rows log elapsed_s since (compile included)

    def evaluate(self, params) -> dict:
        """Mean loss over eval_iters fixed batches of each split, and the validation bits per byte (the
        batches' nats over their targets' UTF-8 bytes: comparable across tokenizers)."""
        t = self.cfg.train
        results = {s: np.array(jax.device_get([self.eval_step(params, self.batches.eval(s, i), self.token_bytes)
                                               for i in range(t.eval_iters)]), np.float64)
                   for s in ("train", "val")}  # [eval_iters, (mean loss, target bytes)]
        val_nats = results["val"][:, 0].sum() * self.cfg.data.batch_size * self.cfg.model.block_size
        return {"val_loss": float(results["val"][:, 0].mean()), "train_loss": float(results["train"][:, 0].mean()),
                "val_bpb": float(val_nats / (np.log(2) * results["val"][:, 1].sum()))}

    def save(self, state: TrainState, step: int) -> None:
        # Batches and dropout keys derive from (seed, step) alone: the step is the whole data position.
        checkpoint.save(self.manager, step, state.params, state.opt_state, {**self.checkpoint_meta, "step": step})
        self.last_saved = step

    def check_disk(self, state: TrainState) -> None:
        """Warn at start when out_dir cannot hold keep_checkpoints + 1 checkpoints of this state."""
        size = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
        need, free = size * (self.cfg.train.keep_checkpoints + 1), shutil.disk_usage(self.cfg.train.out_dir).free
        if free < need:
            self.log.say(f"warning: {self.cfg.train.out_dir} has {free / 1e9:.2f} GB free, but keep_checkpoints="
                         f"{self.cfg.train.keep_checkpoints} + 1 checkpoints of {size / 1e9:.2f} GB need {need / 1e9:.2f} GB")

    def mfu(self, achieved_flops: float) -> float | None:
        """achieved / peak; above 1 the peak was measured too low (a busy moment): re-measure once and warn,
        and never report an MFU above 1. None where the peak is unknown."""
        mfu = achieved_flops / self.peak_flops
        if mfu > 1 and not self.mfu_warned:
            self.mfu_warned = True
            self.peak_flops, self.peak_source = metrics.run_peak_flops(self.cfg, self.mesh, remeasure=True)
            self.log.say(f"warning: MFU {100 * mfu:.0f}% is above 100%: the peak ({self.peak_source}) was too low; "
                         f"re-measured it as {self.peak_flops:.3g} FLOP/s")
            mfu = achieved_flops / self.peak_flops
        return mfu if mfu == mfu and mfu <= 1 else None

    def control(self, step: int, stop: StopFlag, last_save: float) -> tuple[bool, bool]:
        """(stop now, a time-based save is due), agreed by every process. One process decides at every step;
        several exchange their flags at log steps (the same steps everywhere), so they all save the same step."""
        t = self.cfg.train
        flags = np.array([stop.signal is not None,
                          t.checkpoint_minutes > 0 and time.monotonic() - last_save > 60 * t.checkpoint_minutes])
        if jax.process_count() > 1:
            if step % t.log_interval:
                return False, False
            flags = multihost_utils.process_allgather(flags).reshape(-1, 2).any(axis=0)
        return bool(flags[0]), bool(flags[1])

    def start(self, state: TrainState) -> None:
        cfg = self.cfg
        self.counts = param_counts(cfg.model, state.params)
        self.flops_per_step = flops_per_token(cfg.model, self.counts["matmul"]) * cfg.tokens_per_step
        self.peak_flops, self.peak_source = metrics.run_peak_flops(cfg, self.mesh)
        self.attention = attention_backend(cfg.model)
        self.log.say(f"model: {self.counts['total'] / 1e6:.2f}M parameters | mesh {dict(self.mesh.shape)} | "
                     f"{jax.device_count()} {jax.devices()[0].platform} device(s) | {cfg.tokens_per_step:,} tokens/step"
                     f" | {cfg.model.compute_dtype} | attention {self.attention}")
        if jax.process_index() == 0 and not cfg.train.eval_only:
            (Path(cfg.train.out_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def loop(self, state: TrainState, command: list[str]) -> dict:
        cfg, t, log = self.cfg, self.cfg.train, self.log
        start_step = int(state.step)
        self.start(state)
        self.check_disk(state)
        if t.eval_only:
            row = {"step": start_step, **self.evaluate(state.params)}
            log.row(**row)
            log.say(f"eval at step {start_step}: val loss {row['val_loss']:.4f}, train loss {row['train_loss']:.4f}")
            return row
        if start_step >= t.max_iters:
            log.say(f"already trained: checkpoint step {start_step} >= max_iters={t.max_iters}; nothing to do")
            return {"step": start_step}
        log.row(event="start", time=time.strftime("%Y-%m-%dT%H:%M:%S"), argv=list(command), code=metrics.code_version(),
                versions=metrics.versions(), config=cfg.to_dict(), start_step=start_step,
                n_params=self.counts, devices=jax.device_count(),
                device_kind=jax.devices()[0].device_kind, compute_dtype=cfg.model.compute_dtype,
                attention=self.attention, peak_flops=self.peak_flops, peak_flops_source=self.peak_source)

        t0 = time.perf_counter()
        batch = abstract_batch(cfg, self.mesh)
        compiled = jit_train_step(self.model, self.tx, cfg, self.shardings).lower(
            state, (batch, batch)).compile()  # ahead of time: fails before step 0
        log.say(f"compiled train step in {time.perf_counter() - t0:.1f}s")

        stop = StopFlag()
        prefetch = data.Prefetch(self.batches.train, start_step, t.max_iters)
        last: dict = {}
        pending: list = []  # (step, device metrics) since the last log row: fetched together, so steps pipeline
        skipped = 0
        try:
            timer, timed_steps, run_start, last_save = time.perf_counter(), 0, time.perf_counter(), time.monotonic()
            waited = 0.0  # prefetch.wait_s when the timer started
            train_s = 0.0  # seconds of training steps in this process: no compile, evaluation or checkpoint time
            for step in range(start_step, t.max_iters):
                stop_now, time_due = self.control(step, stop, last_save)
                evaluate_now = step % t.eval_interval == 0 and (step != start_step or step == 0)
                save_now = step != start_step and (step % t.checkpoint_interval == 0 or step in self.save_steps
                                                   or time_due or stop_now)
                if step != start_step and (evaluate_now or save_now):
                    jax.block_until_ready(state.step)  # the steps since the last row end here, before the pause
                    train_s += time.perf_counter() - timer
                if evaluate_now:
                    last = {"step": step, **self.evaluate(state.params), "train_s": train_s}
                    log.row(**last)
                    log.say(f"step {step}: val loss {last['val_loss']:.4f}, train loss {last['train_loss']:.4f}")
                if save_now:
                    self.save(state, step)
                    last_save = time.monotonic()
                if stop_now:
                    log.say(f"{stop.signal or 'stop'}: saved checkpoint at step {step}; resume with --init_from=resume")
                    return last
                if evaluate_now or save_now:
                    timer, timed_steps, waited = time.perf_counter(), 0, prefetch.wait_s  # training steps only

                state, step_metrics = compiled(state, prefetch.get(step))
                pending.append((step, step_metrics))
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
                    values = {k: float(v) for k, v in fetched[-1][1].items() if k != "finite"}
                    elapsed = time.perf_counter() - timer
                    train_s += elapsed
                    tok_s = timed_steps * cfg.tokens_per_step / elapsed
                    mfu = self.mfu(timed_steps * self.flops_per_step / elapsed)
                    last = {"step": step, **values, "tokens_per_s": tok_s, "mfu": mfu, "skipped_batches": skipped,
                            "data_wait_s": (prefetch.wait_s - waited) / timed_steps,
                            "elapsed_s": time.perf_counter() - self.started, "train_s": train_s,
                            "peak_memory_bytes": metrics.peak_memory(), **self.batches.position(step + 1)}
                    log.row(**last)
                    eta = (t.max_iters - step - 1) * cfg.tokens_per_step / tok_s
                    log.say(f"step {step:>6} | loss {values['loss']:.4f} | lr {values['lr']:.2e} | "
                            f"grad {values['grad_norm']:.2f} | {tok_s:,.0f} tok/s | "
                            f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | epoch {_fmt_epochs(last['epoch'])} | "
                            f"eta {_fmt_time(eta)}")
                    timer, timed_steps, waited = time.perf_counter(), 0, prefetch.wait_s

            final = {"step": t.max_iters, **self.evaluate(state.params), "elapsed_s": time.perf_counter() - self.started,
                     "train_s": train_s}
            log.row(**final)
            log.say(f"step {t.max_iters}: val loss {final['val_loss']:.4f}, train loss {final['train_loss']:.4f} "
                    f"({_fmt_time(time.perf_counter() - run_start)})")
            self.save(state, t.max_iters)
            return {**last, **final}
        finally:
            prefetch.close()
            # Wait for the last async save while our handlers still hold SIGINT/SIGTERM: a Ctrl-C now only sets
            # the flag instead of cutting orbax's finalisation short.
            try:
                checkpoint.wait(self.manager, self.last_saved)
            finally:
                self.manager.close()
                stop.restore()
