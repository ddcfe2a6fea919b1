"""Training speed and memory: tokens/s, MFU, step time and per-device bytes of a train step. Prints JSON.

    python bench/train.py [preset] [--key=value ...] [--steps=10]      # any train.py preset and keys

Runs `steps` optimizer steps on synthetic token batches (speed does not depend on the data) with the
exact compiled step train.py uses, on the mesh the mesh keys describe.
"""

import json
import sys
import time

import jax

from common import compiled_train_step, config_and_flag
from gpt import sharding
from gpt.metrics import peak_memory, run_peak_flops
from gpt.model import attention_backend, flops_per_token, param_counts


def main(argv: list[str]) -> None:
    cfg, steps = config_and_flag(argv, "steps", 10)
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        _, _, state, batch, compiled, compile_s = compiled_train_step(cfg, mesh)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
    m = cfg.model
    counts = param_counts(m, state.params)
    peak, peak_source = run_peak_flops(cfg, mesh)
    tokens_per_step = cfg.tokens_per_step
    memory = compiled.memory_analysis()
    state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    print(json.dumps({
        "bench": "train", "argv": argv, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "mesh": dict(mesh.shape), "n_params": counts, "tokens_per_step": tokens_per_step,
        "compile_s": compile_s, "step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_step / step_s,
        "mfu": flops_per_token(m, counts["matmul"]) * tokens_per_step / step_s / peak, "peak_flops": peak,
        "peak_flops_source": peak_source,
        "attention": attention_backend(cfg.model), "dtype": cfg.model.compute_dtype, "remat": cfg.model.remat,
        "jax": jax.__version__, "state_bytes_per_device": state_bytes, "peak_memory_bytes": peak_memory(),
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
