"""Train a few steps of a tiny model on a given mesh; run as a script on 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py OUT.json DATA_DIR d,f,t ...
    XLA_FLAGS=...                                       python tests/sharded_steps.py restore OUT.npz RUN_DIR d,f,t

For each mesh (data,fsdp,tensor) it saves the losses, final parameters, per-device shard bytes and each
parameter's sharding (its PartitionSpec, and the shape of the shard one device holds), which
tests/test_sharding.py checks against the rules and against the same function run on one device.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository root importable, for tests.helpers
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from gpt import sharding
from gpt.config import load_config
from gpt.data import Batches, load_corpora
from gpt.steps import build, jit_train_step
from tests.helpers import TINY_TRAIN, flags, tiny_model_flags

# The suite's tiny model with 4 heads, so that tensor=4 splits them, and its batch of 8 sequences.
TINY_TP = [*tiny_model_flags(n_head=4), *flags({"batch_size": TINY_TRAIN["batch_size"], "vocab_size": 256})]
N_STEPS = 3


def run_steps(data_dir: str, mesh_sizes: tuple[int, int, int]):
    cfg = load_config([*TINY_TP, f"--data_dir={data_dir}", f"--mesh_data={mesh_sizes[0]}",
                       f"--mesh_fsdp={mesh_sizes[1]}", f"--mesh_tensor={mesh_sizes[2]}"])
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, abstract, shardings, init = build(cfg, mesh)
        state = init(jax.random.key(0))
        step = jit_train_step(model, tx, cfg, shardings)
        batches = Batches(cfg, load_corpora(cfg.data, cfg.model.block_size, quiet=True), mesh)
        losses = []
        for s in range(N_STEPS):
            state, metrics = step(state, batches.train(s))
            losses.append(float(metrics["loss"]))
    params = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    shard_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    specs = {jax.tree_util.keystr(p): list(x.sharding.spec) for p, x in leaves}
    # What one device really holds: [global shape, shape of its shard, whether every device holds it all].
    layout = {jax.tree_util.keystr(p): [list(x.shape), list(x.addressable_shards[0].data.shape),
                                        bool(x.sharding.is_fully_replicated)] for p, x in leaves}
    return losses, params, shard_bytes, specs, layout


def restored_params(out_dir: str, mesh_sizes: tuple[int, int, int]) -> dict:
    """The latest checkpoint's parameters restored onto the given mesh, as numpy arrays by path."""
    from gpt.config import MeshConfig
    from gpt.checkpoint import load_params

    _, params, _, _ = load_params(out_dir, -1, MeshConfig(*mesh_sizes))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


if __name__ == "__main__":
    import json

    if sys.argv[1] == "restore":  # restore OUT.npz RUN_DIR d,f,t
        np.savez(sys.argv[2], **restored_params(sys.argv[3], tuple(int(v) for v in sys.argv[4].split(","))))
        sys.exit(0)
    out, data_dir, meshes = sys.argv[1], sys.argv[2], sys.argv[3:]
    result = {}
    for m in meshes:
        losses, params, shard_bytes, specs, layout = run_steps(data_dir, tuple(int(v) for v in m.split(",")))
        result[m] = {"losses": losses, "shard_bytes": shard_bytes, "specs": specs, "layout": layout}
        np.savez(f"{out}.{m.replace(',', '_')}.npz", **params)
    with open(out, "w") as fh:
        json.dump(result, fh)
