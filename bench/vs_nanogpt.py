"""Our train step against nanoGPT's, side by side on the same CPU. Prints one JSON object.

    pip install torch                     # not a dependency of this project; only this script needs it
    git clone https://github.com/karpathy/nanoGPT /path/to/nanoGPT
    python bench/vs_nanogpt.py --nanogpt=/path/to/nanoGPT [--rounds=5] [--seconds=3] [--shapes=byte,gpt2,124m,default]

For each shape both sides train in float32 on the same random batches: ours is the compiled step train.py runs;
nanoGPT's is its own model.py (imported from the checkout, never copied here) and the step of its train.py
(forward with targets, backward, clip_grad_norm_ to 1.0, its configure_optimizers' AdamW, zero_grad), in
PyTorch eager with as many threads as JAX uses (every core). Each side lives in a process of its own (in one
process, nanoGPT's resident tensors slowed our 124M step by a third: 140 -> 96 tokens/s), and the two take
turns, round after round, so machine noise hits both alike: each round times enough steps for about
--seconds while the other side waits idle; the figure is the median round.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The table shapes and the default preset's: (n_layer, n_head, n_embd, block_size, batch, vocab).
SHAPES = {
    "byte": (4, 4, 256, 256, 8, 256),
    "gpt2": (4, 4, 256, 256, 8, 50257),
    "124m": (12, 12, 768, 1024, 1, 50257),
    "default": (4, 4, 128, 128, 32, 256),
}


def ours(shape, tokens_BT1):
    """A function that runs one of our optimizer steps (and waits for it)."""
    import jax
    import jax.numpy as jnp

    from gpt import sharding
    from gpt.config import load_config
    from gpt.steps import build, jit_train_step

    n_layer, n_head, n_embd, block, batch, vocab = shape
    cfg = load_config([f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}", f"--block_size={block}",
                       f"--batch_size={batch}", f"--vocab_size={vocab}", "--dtype=float32", "--dropout=0"])
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, _, shardings, init = build(cfg, mesh)
        state = [init(jax.random.key(0))]
        x = jnp.asarray(tokens_BT1[None, :, :-1], jnp.int32)
        y = jnp.asarray(tokens_BT1[None, :, 1:], jnp.int32)
        batch_xy = jax.device_put((x, y), sharding.batch_sharding(mesh, leading=1))
        compiled = jit_train_step(model, tx, cfg, shardings).lower(state[0], batch_xy).compile()

    def step():
        state[0], metrics = compiled(state[0], batch_xy)
        jax.block_until_ready(metrics["loss"])

    return step


def nanogpt(shape, tokens_BT1, checkout: Path):
    """A function that runs one nanoGPT optimizer step, as its train.py does (float32, no dropout)."""
    import torch

    torch.set_num_threads(os.cpu_count())
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    n_layer, n_head, n_embd, block, batch, vocab = shape
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block,
                                        vocab_size=-(-vocab // 64) * 64, dropout=0.0, bias=True))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.from_numpy(tokens_BT1[:, :-1].astype(np.int64))
    y = torch.from_numpy(tokens_BT1[:, 1:].astype(np.int64))

    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed_round(step, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def serve(side: str, name: str, checkout: Path) -> None:
    """A side's process: build the step, then for each "N" read on stdin run N steps and print seconds/step."""
    shape = SHAPES[name]
    tokens = np.random.default_rng(0).integers(0, shape[5], size=(shape[4], shape[3] + 1))
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the answers (nanoGPT prints its sizes)
        step = ours(shape, tokens) if side == "ours" else nanogpt(shape, tokens, checkout)
        step()  # compile / warm up
    print("ready", flush=True)
    for line in sys.stdin:
        print(timed_round(step, int(line)), flush=True)


def compare(name: str, checkout: Path, rounds: int, seconds: float) -> dict:
    sides = {side: subprocess.Popen([sys.executable, __file__, f"--serve={side}", f"--shapes={name}",
                                     f"--nanogpt={checkout}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True) for side in ("ours", "nanogpt")}

    def run(side: str, steps: int) -> float:
        sides[side].stdin.write(f"{steps}\n")
        sides[side].stdin.flush()
        return float(sides[side].stdout.readline())

    for side, process in sides.items():
        if process.stdout.readline().strip() != "ready":
            sys.exit(f"error: the {side} side of shape {name} failed to start (run it alone to see why)")
    per_round = {side: max(1, round(seconds / run(side, 1))) for side in sides}  # about `seconds` each
    times = {side: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            times[side].append(run(side, per_round[side]))
    for process in sides.values():
        process.stdin.close()
        process.wait()
    shape = SHAPES[name]
    tokens_per_step = shape[4] * shape[3]
    tok_s = {side: tokens_per_step / statistics.median(t) for side, t in times.items()}
    return {"shape": dict(zip(("n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size"), shape)),
            "tokens_per_s": tok_s, "ratio": tok_s["ours"] / tok_s["nanogpt"],
            "step_ms": {side: [1e3 * s for s in t] for side, t in times.items()}, "steps_per_round": per_round}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (its model.py is imported)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--serve", choices=("ours", "nanogpt"), help=argparse.SUPPRESS)  # a side's own process
    a = ap.parse_args()
    checkout = Path(a.nanogpt).expanduser()
    if not (checkout / "model.py").is_file():
        sys.exit(f"error: --nanogpt={a.nanogpt}: no model.py there (give a nanoGPT checkout)")
    unknown = [s for s in a.shapes.split(",") if s not in SHAPES]
    if unknown:
        sys.exit(f"error: --shapes: unknown {unknown}; use {', '.join(SHAPES)}")
    if a.serve:
        return serve(a.serve, a.shapes, checkout)
    import importlib.metadata as metadata

    results = {name: compare(name, checkout, a.rounds, a.seconds) for name in a.shapes.split(",")}
    print(json.dumps({"bench": "vs_nanogpt", "machine": cpu_model(), "cpu_count": os.cpu_count(),
                      "jax": metadata.version("jax"), "torch": metadata.version("torch"), "dtype": "float32",
                      "rounds": a.rounds, "results": results}))


if __name__ == "__main__":
    main()
