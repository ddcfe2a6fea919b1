"""Compile time of the train step against depth, with and without scan_layers. Prints one JSON object per
variant. The persistent compilation cache is off, so every figure is a fresh compile.

    python bench/compile.py [--key=value ...] [--depths=6,24]

Each figure is plan.compile_step: the train state's abstract shapes, then the exact step train.py runs,
lowered and compiled (nothing allocated).
"""

import dataclasses
import json
import sys
import time

import jax

from common import config_and_flag
from gpt import plan, sharding


def compile_seconds(cfg) -> float:
    t0 = time.perf_counter()
    plan.compile_step(cfg, sharding.make_mesh(cfg.mesh))
    return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    jax.config.update("jax_enable_compilation_cache", False)
    cfg, depths = config_and_flag(argv, "depths", "6,24")
    for scan in (False, True):
        for depth in map(int, depths.split(",")):
            variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layer=depth, scan_layers=scan))
            print(json.dumps({"scan_layers": scan, "n_layer": depth, "n_embd": cfg.model.n_embd,
                              "remat": cfg.model.remat, "compile_s": round(compile_seconds(variant), 2)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
