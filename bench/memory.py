"""Bytes per device of one train step for every remat policy, with and without the chunked cross-entropy,
as the planner compiles them (nothing is allocated). Prints one JSON object per variant.

    python bench/memory.py [preset] [--key=value ...] [--chunk=128]

Each variant is the exact step train.py would run, lowered and compiled from abstract shapes
(gpt/plan.py's compiled_plan): `peak` is arguments + outputs - donated + temporaries per device.
"""

import dataclasses
import json
import sys
import time

from common import config_and_flag
from gpt import plan, sharding
from gpt.config import REMAT_CHOICES


def main(argv: list[str]) -> None:
    cfg, chunk = config_and_flag(argv, "chunk", 128)
    mesh = sharding.make_mesh(cfg.mesh)
    for remat in REMAT_CHOICES:
        for loss_chunk in (0, chunk):
            variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat, loss_chunk=loss_chunk))
            t0 = time.perf_counter()
            report = plan.compiled_plan(variant, mesh, remedies=False)
            print(json.dumps({
                "remat": remat, "loss_chunk": loss_chunk, "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
                "block_size": cfg.model.block_size, "batch_size": cfg.data.batch_size,
                "vocab": cfg.model.padded_vocab_size, "dtype": cfg.model.compute_dtype,
                "peak_mib": round(report["bytes_per_device"]["peak"] / 2**20, 1),
                "temporaries_mib": round(report["bytes_per_device"]["temporaries"] / 2**20, 1),
                "xla_cost_gflops": round(report["flops_per_step"]["xla_cost_analysis"] / 1e9, 1),
                "compile_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
