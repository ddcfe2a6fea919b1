"""Checkpoints with orbax: out_dir/checkpoints/<step>/{params,opt_state,meta}.

Three items per step, so sampling restores `params` and `meta` without touching the optimizer state.
`meta` (JSON) holds the step, the resolved flat config and the tokenizer/corpus description: everything
needed to rebuild the model and its tokenizer from the checkpoint alone. Orbax writes each step into a
temporary directory and renames it when complete, saves asynchronously, and keeps `keep_checkpoints`.
Restores land straight in the target sharding given by the abstract (ShapeDtypeStruct) tree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def checkpoint_dir(out_dir: str) -> Path:
    return Path(out_dir).resolve() / "checkpoints"


def make_manager(out_dir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    options = (ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0) if read_only
               else ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True))
    return ocp.CheckpointManager(checkpoint_dir(out_dir), options=options)


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    """Start an async save; force=True so saves off orbax's own interval are never skipped."""
    manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)))


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
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying step {steps[i + 1]}", file=sys.stderr)
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
