"""Where a train step's time goes on this machine: an XLA profile of the exact compiled step, summarised.
Prints one JSON object.

    python bench/profile_step.py [preset] [--key=value ...] [--steps=5]

Two views of the same step:
- parts: the forward pass, forward + backward (value_and_grad) and the optimizer update, each compiled and
  timed on its own, against the whole step (so backward = value_and_grad - forward);
- kernels: a jax.profiler trace of `steps` steps, every executed XLA kernel (thunk) summed by kind: dots (the
  matmul libraries' fusions: YNNPACK's `ynn_fusion`, oneDNN's, Eigen's `dot`; they may carry fused
  elementwise ops), copies and transposes (layout changes), and the other fusions (norms, GELU, softmax,
  the optimizer's elementwise update, ...), each in ms per step and as a share of the traced time.
"""

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import jax

from common import compiled_train_step, config_and_flag
from gpt import sharding
from gpt.optim import apply_updates
from gpt.steps import loss_fn


def kind(name: str) -> str:
    if re.search(r"ynn_fusion|onednn|^dot|^custom-call|__onednn", name):
        return "dots"
    if re.search(r"copy|transpose", name):
        return "copies_and_transposes"
    return "other_fusions"


def ms_per_call(f, *args, n: int = 5) -> float:
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t0) / n


def main(argv: list[str]) -> None:
    cfg, steps = config_and_flag(argv, "steps", 5)
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, state, batch, step, _ = compiled_train_step(cfg, mesh)
        x = batch[0]
        loss = jax.jit(lambda p: loss_fn(p, model, x[0], x[0], None, True))
        grad = jax.jit(lambda p: jax.value_and_grad(loss_fn)(p, model, x[0], x[0], None, True))
        grads = grad(state.params)[1]

        @jax.jit
        def update(params, opt_state, grads):
            direction, opt_state = tx.update(grads, opt_state, params)
            return apply_updates(params, direction, 1e-3), opt_state

        parts = {"forward_ms": ms_per_call(loss, state.params), "value_and_grad_ms": ms_per_call(grad, state.params),
                 "optimizer_ms": ms_per_call(update, state.params, state.opt_state, grads)}
        holder = [state]

        def train_step():
            holder[0], metrics = step(holder[0], batch)
            return metrics["loss"]

        parts["step_ms"] = ms_per_call(train_step)
        parts["backward_ms"] = parts["value_and_grad_ms"] - parts["forward_ms"]
        trace_dir = tempfile.mkdtemp()
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            train_step()
        jax.block_until_ready(holder[0].step)
        jax.profiler.stop_trace()
    events = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind, by_kernel = collections.Counter(), collections.Counter()
    for e in events:  # executed kernels only: not the executor's own spans, waits or Python frames
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name.startswith("$") or re.search(
                r"ThunkExecutor|Await|PjitFunction|stop_trace", name):
            continue
        by_kind[kind(name)] += e["dur"] / steps / 1e3
        by_kernel[name] += e["dur"] / steps / 1e3
    traced = sum(by_kind.values())
    print(json.dumps({
        "bench": "profile_step", "argv": argv, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "tokens_per_step": cfg.tokens_per_step, "parts": parts, "traced_ms_per_step": traced,
        "kernels_ms_per_step": dict(by_kind.most_common()),
        "kernels_share": {k: v / traced for k, v in by_kind.most_common()},
        "slowest_kernels_ms": dict(by_kernel.most_common(10)),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
