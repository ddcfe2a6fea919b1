"""Know before launch: whether a configuration fits its devices, and what a step costs.

Two checks, one cheap and one exact:
- `check` is closed-form, instant for any size (n_layer=10^12 included), and runs before every training
  run is built: it refuses a run whose *unavoidable* bytes per device (parameters, AdamW's two moments,
  gradients, one micro-batch's float32 logits and what each layer must keep for the backward pass) exceed
  the device's memory. Those are lower bounds, so it never refuses a run that would fit.
- `compiled_plan` (`train.py --dry_run`) lowers and compiles the exact train step for the configured mesh
  from abstract shapes (nothing is allocated) and reads XLA's memory and cost analyses: the figure to trust.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from gpt.config import Config, ModelConfig

GiB = 2**30
STATED_MFU = 0.4  # the model FLOP utilisation the time estimate assumes (nanochat and llm.c report ~40%)


class DoesNotFit(Exception):
    """The configuration needs more memory per device than there is; one line for the user (exit 3)."""


def n_params(m: ModelConfig) -> int:
    """Parameters as init_params creates them (the vocabulary's padding rows included): the closed form of
    the model's tree for every architecture switch, so sizes too large to build can still be counted."""
    d, head_dim, hidden = m.n_embd, m.n_embd // m.n_head, m.mlp_hidden
    per_norm = int(m.norm_scale) + int(m.norm == "layernorm" and m.bias)  # values per normalised feature
    qkv_width = (m.n_head + 2 * m.kv_heads) * head_dim
    mlp_in = 2 * hidden if m.mlp == "swiglu" else hidden
    biases = qkv_width + d + mlp_in + d if m.bias else 0
    block = 2 * per_norm * d + _block_matrices(m) + biases + (2 * head_dim * int(m.norm_scale) if m.qk_norm else 0)
    embeddings = m.padded_vocab_size * d * (1 if m.tie_embeddings else 2)
    return embeddings + (m.block_size * d if m.position == "learned" else 0) + m.n_layer * block + per_norm * d


def _block_matrices(m: ModelConfig) -> int:
    """The weights of one block's matrices (q/k/v, attention's c_proj, c_fc, the MLP's c_proj): what Muon updates."""
    d = m.n_embd
    qkv_width = (m.n_head + 2 * m.kv_heads) * (d // m.n_head)
    return d * qkv_width + d * d + d * m.mlp_hidden * (2 if m.mlp == "swiglu" else 1) + m.mlp_hidden * d


def device_memory(cfg: Config) -> tuple[int, str]:
    """(bytes one device can hold, where the figure comes from): the device_memory_gb key, else what the
    accelerator reports, else on a CPU the host's RAM shared by its simulated devices."""
    if cfg.train.device_memory_gb > 0:
        return int(cfg.train.device_memory_gb * GiB), "device_memory_gb"
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
        return int(limit), f"{device.device_kind} bytes_limit"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // jax.local_device_count(), f"host RAM / {jax.local_device_count()} CPU device(s)"


def lower_bound(cfg: Config, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Bytes per device no implementation of this step can avoid, by part."""
    m, bytes_per_value = cfg.model, 2 if cfg.model.compute_dtype == "bfloat16" else 4
    state_shards = mesh_shape["fsdp"] * mesh_shape["tensor"]
    tokens = _rows_per_device(cfg, mesh_shape) * m.block_size
    p = n_params(m)
    return {
        "parameters": 4 * p // state_shards,  # float32
        # AdamW's mu and nu, float32; Muon keeps one momentum for the blocks' matrices
        "optimizer_state": (8 * p - (4 * m.n_layer * _block_matrices(m) if cfg.optim.optimizer == "muon" else 0))
                           // state_shards,
        "gradients": 4 * p // state_shards,
        "batch": 2 * 4 * tokens * cfg.optim.gradient_accumulation_steps,  # inputs and targets, int32
        "logits": 4 * tokens * m.padded_vocab_size // mesh_shape["tensor"],  # one micro-batch, float32
        "saved_activations": int(m.n_layer * tokens * m.n_embd * bytes_per_value * _saved_per_layer(m)),
    }


def _rows_per_device(cfg: Config, mesh_shape: dict[str, int]) -> int:
    """Sequences of one micro-batch on each device: the batch splits over data x fsdp."""
    return -(-cfg.data.batch_size // (mesh_shape["data"] * mesh_shape["fsdp"]))


def _saved_per_layer(m: ModelConfig) -> float:
    """Activations per token, in units of n_embd, that a layer surely keeps for the backward pass: its input
    under any remat policy; with remat=none also q, k, v (k and v with kv_heads of n_head heads) and the
    attention output, which nothing recomputes short of redoing the attention (the MLP's and the norms' are
    left out: XLA might recompute those)."""
    return 1 if m.remat != "none" else 3 + 2 * m.kv_heads / m.n_head


def check(cfg: Config, mesh_shape: dict[str, int]) -> dict:
    """Raise DoesNotFit when even the lower bound exceeds a device's memory; else the bound and memory."""
    need = lower_bound(cfg, mesh_shape)
    memory, source = device_memory(cfg)
    total = sum(need.values())
    if total > memory:
        raise DoesNotFit(f"does not fit: each device needs at least {total / GiB:,.2f} GiB ("
                         + ", ".join(f"{k} {v / GiB:,.2f}" for k, v in need.items() if v >= GiB / 100)
                         + f") but holds {memory / GiB:,.2f} GiB ({source}); "
                         + _remedies(cfg, mesh_shape, need, memory))
    return {"lower_bound_bytes": need, "device_memory_bytes": memory, "device_memory_source": source}


def _remedies(cfg: Config, mesh_shape: dict[str, int], need: dict[str, int], memory: int) -> str:
    """What would make the lower bound `need` fit, computed from it: more fsdp shards for the state, fewer
    rows per micro-step (with more accumulation, so tokens per step stay) for the activations."""
    state = need["parameters"] + need["optimizer_state"] + need["gradients"]
    per_row = (need["logits"] + need["saved_activations"]) / _rows_per_device(cfg, mesh_shape)
    hints = []
    if state > memory / 2:
        shards = mesh_shape["fsdp"] * mesh_shape["tensor"]
        hints.append(f"shard the state over >= {math.ceil(state * shards / (memory / 2))} devices "
                     "(mesh_fsdp x mesh_tensor) so it takes half a device")
    free = memory - state - need["batch"]
    rows = int(free // per_row) if free > 0 else 0
    if rows >= 1 and per_row * cfg.data.batch_size > free:
        hints.append(f"at most {rows} sequences per device per micro-step: lower batch_size and raise "
                     "gradient_accumulation_steps to keep the tokens per step")
    return "; ".join(hints) or "use a smaller model"


def compile_step(cfg: Config, mesh):
    """(the exact train step of cfg compiled for mesh, the train state's abstract shapes): from abstract
    shapes only, nothing allocated."""
    from gpt import sharding
    from gpt.steps import abstract_batch, build, jit_train_step

    with sharding.activate(mesh):
        model, tx, abstract, shardings, _ = build(cfg, mesh)
        batch = abstract_batch(cfg, mesh)
        return jit_train_step(model, tx, cfg, shardings).lower(abstract, (batch, batch)).compile(), abstract


def compiled_plan(cfg: Config, mesh, remedies: bool = True) -> dict:
    """Lower and compile the exact train step on mesh from abstract shapes; XLA's figures per device.
    When it does not fit (and remedies), the remedies are compiled too and listed, each with its peak."""
    from gpt.metrics import run_peak_flops
    from gpt.model import flops_per_token, param_counts

    shape = dict(mesh.shape)
    bound = check(cfg, shape)
    compiled, abstract = compile_step(cfg, mesh)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    counts = param_counts(cfg.model, abstract.params)
    state_bytes = {name: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
                   for name, tree in (("parameters", abstract.params), ("optimizer_state", abstract.opt_state))}
    # The state is donated, so its output aliases its input: peak = arguments + outputs - aliased + temporaries.
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    model_flops = flops_per_token(cfg.model, counts["matmul"]) * cfg.tokens_per_step
    n_devices = math.prod(shape.values())
    peak_flops, peak_source = run_peak_flops(cfg, mesh)
    step_s = None if math.isnan(peak_flops) else model_flops / (STATED_MFU * peak_flops)
    report = {
        "fits": peak <= bound["device_memory_bytes"],
        "mesh": shape, "devices": n_devices, "platform": jax.devices()[0].platform,
        "parameters": {"total": counts["total"], "non_embedding": counts["non_embedding"]},
        "bytes_per_device": {**state_bytes, "arguments": memory.argument_size_in_bytes,
                             "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                             "temporaries": memory.temp_size_in_bytes, "peak": peak},
        "device_memory_bytes": bound["device_memory_bytes"], "device_memory_source": bound["device_memory_source"],
        "lower_bound_bytes": sum(bound["lower_bound_bytes"].values()),
        "tokens_per_step": cfg.tokens_per_step,
        # XLA's cost analysis counts a loop body once: with gradient accumulation (a scan over micro-steps) or
        # loss_chunk it reports one micro-step's or one chunk's FLOPs, not the step's.
        "flops_per_step": {"xla_cost_analysis": cost.get("flops", float("nan")) * n_devices if cost else None,
                           "model_6n_plus_attention": model_flops},
        "peak_flops": peak_flops, "peak_flops_source": peak_source, "at_mfu": STATED_MFU,
        "step_seconds": step_s, "hours_to_max_iters": step_s * cfg.train.max_iters / 3600 if step_s else None,
    }
    if not report["fits"] and remedies:
        report["remedies"] = _compiled_remedies(cfg, mesh, bound["device_memory_bytes"])
    return report


def _compiled_remedies(cfg: Config, mesh, memory: int) -> list[str]:
    """Each remedy compiled and measured like the plan itself, with its peak and whether it fits."""
    options = []
    if cfg.model.remat != "full":
        options.append(("--remat=full", dataclasses.replace(cfg.model, remat="full"), cfg.data, cfg.optim))
    if cfg.data.batch_size % 2 == 0:
        half, twice = cfg.data.batch_size // 2, 2 * cfg.optim.gradient_accumulation_steps
        options.append((f"--batch_size={half} --gradient_accumulation_steps={twice}", cfg.model,
                        dataclasses.replace(cfg.data, batch_size=half),
                        dataclasses.replace(cfg.optim, gradient_accumulation_steps=twice)))
    found = []
    for flags, model_cfg, data_cfg, optim_cfg in options:
        other = dataclasses.replace(cfg, model=model_cfg, data=data_cfg, optim=optim_cfg)
        try:
            other_peak = compiled_plan(other, mesh, remedies=False)["bytes_per_device"]["peak"]
        except DoesNotFit:
            continue
        found.append(f"{flags}: peak {other_peak / GiB:.2f} GiB per device"
                     + (" (fits)" if other_peak <= memory else f" (still {other_peak / GiB - memory / GiB:.2f} GiB over)"))
    return found
