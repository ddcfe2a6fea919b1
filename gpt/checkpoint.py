"""Checkpoints with orbax: out_dir/checkpoints/<step>/{params,opt_state,meta}.

Three items per step, so sampling restores `params` and `meta` without touching the optimizer state.
`meta` (JSON) holds the step, the resolved flat config, the tokenizer/corpus description and the layouts of
the parameter and optimizer-state trees: everything needed to rebuild the model and its tokenizer from the
checkpoint alone, and to refuse (in one line) a checkpoint whose trees this code no longer writes. Orbax
writes each step into a temporary directory and renames it when complete, saves asynchronously, and keeps
`keep_checkpoints`. Restores land straight in the target sharding given by the abstract tree.
"""

from __future__ import annotations

import errno
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gpt import sharding
from gpt.config import Config, ConfigError, MeshConfig, ModelConfig
from gpt.exits import one_line
from gpt.model import init_params, layout
from gpt.optim import STATE_LAYOUT


def checkpoint_dir(out_dir: str) -> Path:
    return Path(out_dir).resolve() / "checkpoints"


def make_manager(out_dir: str, keep: int = 3, read_only: bool = False,
                 keep_steps: set[int] = frozenset()) -> ocp.CheckpointManager:
    """keep: how many of the latest checkpoints to keep; keep_steps: steps kept besides (save_steps)."""
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0)
    elif keep_steps:
        policy = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                               preservation_policy=policy.AnyPreservationPolicy(
                                                   [policy.LatestN(keep), policy.CustomSteps(sorted(keep_steps))]))
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(out_dir), options=options)


def layouts(cfg: Config) -> dict:
    """The tree layouts this code writes for cfg, as recorded in every checkpoint's meta: the optimizer's
    state is a tree of the layout version's shape for the optimizer named."""
    return {"model_layout": layout(cfg.model), "opt_state_layout": STATE_LAYOUT, "optimizer": cfg.optim.optimizer}


def check_layouts(meta: dict, cfg: Config, where: str, with_opt_state: bool) -> None:
    """Refuse, in one line, a checkpoint whose trees differ from what this code builds for cfg. A checkpoint
    from before layouts were recorded has layout 1 of both (they were introduced with those layouts) and
    AdamW's state (the only optimizer then)."""
    model_cfg, ours = cfg.model, layouts(cfg)
    theirs = {"model_layout": meta.get("model_layout", {"version": 1}), "opt_state_layout": meta.get("opt_state_layout", 1)}
    scanned = theirs["model_layout"].get("scan_layers", False)
    if {**theirs["model_layout"], "scan_layers": 0} == {**ours["model_layout"], "scan_layers": 0} and \
            scanned != model_cfg.scan_layers:
        raise ConfigError(f"{where} holds parameters in the {'stacked' if scanned else 'per-layer'} layout of "
                          f"scan_layers={scanned}: run with --scan_layers={scanned} (layouts are not converted)")
    if theirs["model_layout"] != ours["model_layout"]:
        raise ConfigError(f"{where} holds parameters of model layout {theirs['model_layout']}, but this code builds "
                          f"{ours['model_layout']}: restore it with the version of this code that wrote it")
    if with_opt_state and theirs["opt_state_layout"] != ours["opt_state_layout"]:
        raise ConfigError(f"{where} holds optimizer state of layout {theirs['opt_state_layout']}, but this code "
                          f"writes layout {ours['opt_state_layout']}, so training cannot resume from it exactly; "
                          "its parameters still sample, export and fine-tune (init_from after exporting)")
    if with_opt_state and meta.get("optimizer", "adamw") != cfg.optim.optimizer:
        raise ConfigError(f"{where} holds the optimizer state of optimizer={meta.get('optimizer', 'adamw')}, but "
                          f"optimizer={cfg.optim.optimizer} was asked: keep the optimizer to resume, or start from "
                          "its parameters with --init_from=RUN_DIR --reset_optimizer=True")


class SaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, an I/O error); the message is one line."""


def _save_error(manager: ocp.CheckpointManager, step: int, error: BaseException) -> SaveError:
    """One line saying what failed and what is kept; the failed save's temporary directory removed."""
    cause, reason = error, None
    while cause is not None and reason is None:  # orbax wraps the OS error in its own exceptions
        if isinstance(cause, OSError):
            reason = f"{cause.strerror or cause} ({errno.errorcode.get(cause.errno, cause.errno)})"
        cause = cause.__cause__ or cause.__context__
    reason = reason or one_line(error)
    try:  # an earlier save may still be in flight: let it finish before cleaning up
        manager.wait_until_finished()
    except Exception:  # noqa: BLE001 - that failure is the one being reported, or reported by the next line
        pass
    if jax.process_index() == 0:  # nothing is in flight now: every temporary directory is a failed save's
        for tmp in Path(manager.directory).glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
    kept = sorted(s for s in (p.name for p in Path(manager.directory).iterdir()) if s.isdigit() and int(s) != step)
    last = f"step {kept[-1]} (resume from it with --init_from=resume)" if kept else "none"
    return SaveError(f"could not save checkpoint {step} in {manager.directory}: {reason}; "
                     f"the last complete checkpoint is {last}")


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    """Start an async save; force=True so saves off orbax's own interval are never skipped. A failure (of
    this save, or of the previous one that orbax waits for first) raises SaveError."""
    try:
        manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # noqa: BLE001 - orbax raises many types; the cause chain holds the OS error
        raise _save_error(manager, step, e) from e


def wait(manager: ocp.CheckpointManager, step: int) -> None:
    """Wait for the async save of `step` to finish; SaveError if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise _save_error(manager, step, e) from e


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager: ocp.CheckpointManager, step: int | None, abstract_params, abstract_opt_state=None):
    """Restore `step` (None = the latest that restores cleanly). Returns (step, params, opt_state, meta).

    A latest checkpoint that fails to restore (truncated, corrupted) is reported and skipped in favour of
    the one before it; an explicitly requested step is never silently replaced.
    """
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    broken = []
    for i, s in enumerate(steps):
        try:
            out = manager.restore(s, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for damaged files
            if step is not None or i == len(steps) - 1:
                raise
            print(f"warning: checkpoint {s} in {manager.directory} does not restore "
                  f"({one_line(e)}); trying step {steps[i + 1]}", file=sys.stderr)
            broken.append(s)
            continue
        _set_aside(manager, broken)
        return s, out["params"], out.get("opt_state"), out["meta"]


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename damaged checkpoints to <step>.broken-<time> (kept for inspection, never deleted), so the
    resumed run can save those steps again."""
    if not steps:
        return
    if jax.process_index() == 0:
        for s in steps:
            src = Path(manager.directory) / str(s)
            dst = src.with_name(f"{s}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            src.rename(dst)
            print(f"warning: moved the damaged checkpoint to {dst}", file=sys.stderr)
    multihost_utils.sync_global_devices("checkpoint set aside")
    manager.reload()


def abstract_params(model_cfg: ModelConfig, mesh):
    """The parameters' shapes (ShapeDtypeStructs carrying their shardings on mesh) and their shardings."""
    with sharding.activate(mesh):
        abstract, shardings, _ = sharding.shard_init(lambda key: init_params(model_cfg, key), mesh, jax.random.key(0))
    return abstract, shardings


def load_params(out_dir: str, step: int, mesh_cfg: MeshConfig):
    """(model config, parameters, meta, step) of a checkpoint in out_dir (step -1: the latest), the parameters
    only (no optimizer state) and placed straight into their shardings on the mesh mesh_cfg describes."""
    manager = make_manager(out_dir, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise ConfigError(f"no checkpoint in {checkpoint_dir(out_dir)}: train one with train.py first")
    if step >= 0 and step not in steps:
        raise ConfigError(f"step={step}: {out_dir} has checkpoints at steps {sorted(steps)}")
    meta = read_meta(manager, max(steps) if step < 0 else step)
    cfg = Config.from_dict(meta["config"])
    check_layouts(meta, cfg, f"{out_dir} step {meta['step']}", with_opt_state=False)
    abstract, _ = abstract_params(cfg.model, sharding.make_mesh(mesh_cfg))
    restored_step, params, _, meta = restore(manager, None if step < 0 else step, abstract)
    manager.close()
    return cfg.model, params, meta, restored_step
