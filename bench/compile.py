"""Compile time of the train step against depth, with and without scan_layers. Prints one JSON object per
variant. The persistent compilation cache is off, so every figure is a fresh compile.

    python bench/compile.py [--key=value ...] [--depths=6,24]

Each variant lowers and compiles the exact step train.py runs, from abstract shapes (nothing allocated).
"""

import dataclasses
import json
import sys
import time

import jax

from gpt import sharding
from gpt.config import load_config
from gpt.steps import build, jit_train_step


def compile_seconds(cfg) -> float:
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, abstract, shardings, _ = build(cfg, mesh)
        shape = (cfg.optim.gradient_accumulation_steps, cfg.data.batch_size, cfg.model.block_size)
        batch = jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=sharding.batch_sharding(mesh, 1))
        t0 = time.perf_counter()
        jit_train_step(model, tx, cfg, shardings).lower(abstract, (batch, batch)).compile()
        return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    jax.config.update("jax_enable_compilation_cache", False)
    depths = next((a.split("=")[1] for a in argv if a.startswith("--depths=")), "6,24")
    cfg = load_config([a for a in argv if not a.startswith("--depths=")])
    cfg.model.vocab_size = cfg.model.vocab_size or 256
    for scan in (False, True):
        for depth in map(int, depths.split(",")):
            variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=depth, scan_layers=scan))
            print(json.dumps({"scan_layers": scan, "n_layer": depth, "n_embd": cfg.model.n_embd,
                              "remat": cfg.model.remat, "compile_s": round(compile_seconds(variant), 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
