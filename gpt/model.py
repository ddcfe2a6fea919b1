"""The GPT-2 architecture in Flax (Linen): one class per concept, as nanoGPT's model.py.

Learned token and position embeddings, pre-LayerNorm blocks of causal multi-head attention and a 4x
tanh-GELU MLP, a final LayerNorm, and an LM head tied to the token embedding. Initialisation is GPT-2's:
normal(0.02), with the residual projections scaled by 1/sqrt(2 * n_layer).

ModelConfig's switches turn it into the modern recipe piece by piece (the defaults are GPT-2, exactly):
`norm` RMSNorm instead of LayerNorm (`norm_scale=False`: no learned scale), `position=rope` rotary
position on q and k instead of the learned table, `mlp` ReLU² or SwiGLU, `qk_norm` RMSNorm of each head's
queries and keys, `tie_embeddings=False` a head matrix of its own, `logit_softcap` c*tanh(logits/c),
`n_kv_head` grouped-query attention (fewer key/value heads, a smaller KV cache), `zero_init` zero output
projections. The parameter tree changes only where a switch needs other parameters.

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", ...); gpt/sharding.py maps
them to mesh axes, so no layer here knows how it is sharded. Parameters are float32; `dtype` sets the
compute precision of the matmuls.

Attention in training runs on the kernel `attention_backend` picks: cuDNN's fused flash attention
(`jax.nn.dot_product_attention`) on NVIDIA GPUs (bf16/fp16), and everywhere else `attention`: the
[batch, heads, T, T] scores made by two batched matmuls, as the decoder computes them. `remat` recomputes each block's activations in the backward
pass instead of keeping them, by one of `REMAT_POLICIES`.

Decoding uses an explicit KV cache: a tuple of (k, v) per layer, [batch, kv_heads, cache_len, head_dim], passed
in and returned, so the decode loop stays a pure function under jit.
"""

from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt.config import ConfigError, ModelConfig

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon


def _init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _norm(cfg: ModelConfig, name: str, axis: str = "embed", rms: bool = False) -> nn.Module:
    """GPT-2's LayerNorm (a bias if cfg.bias) or RMSNorm (x / rms(x), no mean, no bias), over the last axis (named
    `axis`), computed in float32; a learned scale unless norm_scale=False."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), (axis,))
    if rms or cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=LN_EPS, use_scale=cfg.norm_scale, dtype=jnp.float32, name=name,
                          scale_init=scale_init)
    return nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.bias, use_scale=cfg.norm_scale, dtype=jnp.float32, name=name,
                        scale_init=scale_init, bias_init=_zeros((axis,)))


class Dense(nn.Module):
    """y = x @ kernel + bias, contracting x's last `n_in` axes; `axes` names the kernel's axes logically.
    (Flax's DenseGeneral initialises a flat kernel and reshapes it, which breaks logical axis names.)"""

    features: tuple[int, ...]
    axes: tuple
    cfg: ModelConfig
    std: float = 0.02
    n_in: int = 1

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _init(self.std, self.axes), (*x.shape[-self.n_in:], *self.features))
        y = jnp.tensordot(x.astype(self.cfg.compute_dtype), kernel.astype(self.cfg.compute_dtype), axes=self.n_in)
        if self.cfg.bias:
            y = y + self.param("bias", _zeros(self.axes[self.n_in:]), self.features).astype(self.cfg.compute_dtype)
        return y


def _cuda_capability() -> float:
    """The first device's CUDA compute capability (9.0 on an H100); 0 for anything that is not a CUDA GPU."""
    try:
        return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
    except ValueError:  # not a CUDA version number (ROCm's "gfx90a")
        return 0.0


def attention_backend(cfg: ModelConfig) -> str:
    """The kernel that runs training attention for cfg on this JAX backend: "cudnn" or "xla".

    `auto` takes cuDNN flash attention where it can run (an NVIDIA GPU of sm80+, bf16/fp16, head_dim a multiple of 8
    up to 128: the shapes jax's cuDNN path accepts on every cuDNN 9 version) and XLA otherwise."""
    head_dim = cfg.n_embd // cfg.n_head
    reasons = []
    if _cuda_capability() < 8.0:
        reasons.append(f"it needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper, ...) and this "
                       f"is {jax.devices()[0].device_kind} ({jax.default_backend()})")
    if cfg.compute_dtype not in ("bfloat16", "float16"):
        reasons.append(f"it needs dtype bfloat16 and the compute dtype is {cfg.compute_dtype}")
    if head_dim % 8 or head_dim > 128:
        reasons.append(f"it needs head_dim (n_embd / n_head) a multiple of 8 up to 128, not {head_dim}")
    if cfg.attention == "cudnn" and reasons:
        raise ConfigError(f"attention=cudnn cannot run here: {'; '.join(reasons)}; use attention=auto or xla")
    if cfg.attention == "auto":
        return "xla" if reasons else "cudnn"
    return cfg.attention


# Which activations a rematerialised block keeps for the backward pass (the rest it recomputes).
REMAT_POLICIES = {
    "full": None,  # keep only the block's input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_in"),  # MaxText's "minimal"
}


def rope_tables(cfg: ModelConfig, positions_BT):
    """cos and sin [B, T, 1, head_dim / 2] of the rotary angles (Su et al. 2021) at positions [B, T]: the pair
    (i, i + head_dim/2) of a head turns by position * rope_theta^(-2i / head_dim), as GPT-NeoX and Llama do.
    Computed once per call and shared by every layer."""
    head_dim = cfg.n_embd // cfg.n_head
    inv_freq = cfg.rope_theta ** -(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angle_BTF)[:, :, None], jnp.sin(angle_BTF)[:, :, None]


def apply_rope(x_BTNH, rope):
    """Rotate each head's (first half, second half) pairs of x [B, T, heads, head_dim] by rope_tables' angles."""
    cos, sin = rope
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def attention(q, k, v, mask):
    """Attention of q [B, T, heads, hd] over k, v [B, kv_heads, S, hd] (a KV cache, or this chunk's keys and
    values) where mask [B or 1, 1, T, S] allows. With grouped-query attention (kv_heads < heads) each key/value
    head serves heads / kv_heads consecutive query heads, read in place (never repeated in memory).

    Keys and values are heads-major so these two matmuls read them in place: with the [B, S, heads, hd] layout
    XLA transposed the whole cache on every decoded token. In training the same form beat the XLA path of
    jax.nn.dot_product_attention on a CPU by 12% per step at GPT-2 small's shape (137 -> 153 tokens/s;
    its softmax ran on a layout that cost XLA:CPU 2.5x more time)."""
    b, t, n_head, head_dim = q.shape
    q = q.reshape(b, t, k.shape[1], n_head // k.shape[1], head_dim)  # [B, T, kv_heads, group, hd]
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k.astype(q.dtype)).astype(jnp.float32) / math.sqrt(head_dim)
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bkgts,bksh->btkgh", probs.astype(q.dtype), v.astype(q.dtype)).reshape(b, t, n_head, head_dim)


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, rope, cache, cache_index, deterministic):
        cfg = self.cfg
        n_head, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        if cfg.kv_heads == n_head:
            # q, k, v in one matmul, kept as separate (3, heads, head_dim) axes so tensor parallelism splits heads.
            qkv = Dense((3, n_head, head_dim), ("embed", None, "heads", "head_dim"), cfg, name="c_attn")(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:  # grouped-query attention: queries for every head, keys and values for kv_heads
            q = Dense((n_head, head_dim), ("embed", "heads", "head_dim"), cfg, name="c_q")(x)
            kv = Dense((2, cfg.kv_heads, head_dim), ("embed", None, "kv_heads", "head_dim"), cfg, name="c_kv")(x)
            k, v = kv[:, :, 0], kv[:, :, 1]
        if cfg.qk_norm:  # bounds the attention logits whatever the weights grow to
            q = _norm(cfg, "q_norm", "head_dim", rms=True)(q).astype(q.dtype)
            k = _norm(cfg, "k_norm", "head_dim", rms=True)(k).astype(k.dtype)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None and mask is None and attention_backend(cfg) == "cudnn":  # training on an NVIDIA GPU
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        elif cache is None:  # training and evaluation elsewhere, or a masked prefill: causal unless mask says
            if mask is None:
                mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
            y = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        else:  # decoding: write this chunk's keys/values at cache_index, attend over the whole cache
            k, v = (_write_cache(c, x.transpose(0, 2, 1, 3).astype(c.dtype), cache_index) for c, x in zip(cache, (k, v)))
            cache = (k, v)
            y = attention(q, k, v, mask)
        y = Dense((cfg.n_embd,), ("heads", "head_dim", "embed"), cfg, std=_output_std(cfg), n_in=2, name="c_proj")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic), cache


def _write_cache(cache_BHSD, new_BHTD, index):
    """new written into the cache at slot index along the sequence axis: one index for every row, or (a [B]
    vector) each row's own, as a server batching requests of different lengths needs."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache_BHSD, new_BHTD, (0, 0, index, 0))
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0)))(cache_BHSD, new_BHTD, index)


def _output_std(cfg: ModelConfig) -> float:
    """Init std of the projections into the residual stream: GPT-2's 0.02 / sqrt(2 * n_layer), or 0 (zero_init)."""
    return 0.0 if cfg.zero_init else 0.02 / math.sqrt(2 * cfg.n_layer)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        if cfg.mlp == "swiglu":  # silu(x W_gate) * (x W_up): gate and up in one matmul, as (2, hidden) axes
            gate_up = Dense((2, cfg.mlp_hidden), ("embed", None, "mlp"), cfg, name="c_fc")(x)
            h = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        else:
            h = Dense((cfg.mlp_hidden,), ("embed", "mlp"), cfg, name="c_fc")(x)
            h = nn.gelu(h, approximate=True) if cfg.mlp == "gelu" else jnp.square(nn.relu(h))  # gelu_new or ReLU²
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        h = Dense((cfg.n_embd,), ("mlp", "embed"), cfg, std=_output_std(cfg), name="c_proj")(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, rope, cache, cache_index, deterministic):
        y, cache = CausalSelfAttention(self.cfg, name="attn")(
            _norm(self.cfg, "ln_1")(x), mask, rope, cache, cache_index, deterministic)
        x = x + checkpoint_name(y, "attn_out")
        x = x + MLP(self.cfg, name="mlp")(checkpoint_name(_norm(self.cfg, "ln_2")(x), "mlp_in"), deterministic)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), cache


class GPT(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, idx, positions=None, mask=None, cache=None, cache_index=0, deterministic=True, head=True):
        """Logits [B, T, padded_vocab] (float32) for token ids idx [B, T], and the updated cache; with
        head=False the final hidden states [B, T, n_embd] instead (for lm_head applied in chunks).

        positions: [B, T] position ids (default 0..T-1). mask: [B, 1, T, S] boolean attention mask; None means
        plain causal attention over idx itself. cache: per-layer (k, v) from init_cache, written at cache_index
        (one slot for all rows, or a [B] vector of each row's own).
        """
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(idx.shape[1]), idx.shape)
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=cfg.compute_dtype, name="wte",
                       embedding_init=_init(0.02, ("vocab", "embed")))
        x, rope = wte(idx), None
        if cfg.position == "learned":
            x = x + nn.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.compute_dtype, name="wpe",
                             embedding_init=_init(0.02, ("pos", "embed")))(positions)
        else:
            rope = rope_tables(cfg, positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        block = Block
        if cfg.remat != "none":  # deterministic (argument 6, counting self) is a Python bool: static
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(6,),
                             prevent_cse=not cfg.scan_layers)  # scan already keeps XLA from merging recomputes
        if cfg.scan_layers:  # one block traced once, its parameters stacked on a leading "layers" axis
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast), length=cfg.n_layer,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_cache = stack(cfg, name="h")(x, mask, rope, cache, cache_index, deterministic)
        else:
            new_cache = []
            for i in range(cfg.n_layer):
                x, layer_cache = block(cfg, name=f"h_{i}")(
                    x, mask, rope, None if cache is None else cache[i], cache_index, deterministic)
                new_cache.append(layer_cache)
            new_cache = tuple(new_cache) if cache is not None else None
        x = _norm(cfg, "ln_f")(x)
        w_DV = wte.embedding.T if cfg.tie_embeddings else self.param(  # as head_weights reads it
            "lm_head", _init(0.0 if cfg.zero_init else 0.02, ("embed", "vocab")), (cfg.n_embd, cfg.padded_vocab_size))
        return (lm_head(cfg, w_DV, x) if head else x), new_cache


def head_weights(cfg: ModelConfig, params):
    """The LM head's matrix [n_embd, padded_vocab]: the token embedding's transpose (tied), or its own."""
    return params["wte"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def lm_head(cfg: ModelConfig, w_DV, x):
    """Logits (float32) from final hidden states x [..., n_embd] and the head's matrix w [n_embd, padded_vocab],
    soft-capped to +-logit_softcap when set. The vocabulary's padding rows are never predicted: the loss and the
    samplers see the true vocabulary."""
    dtype = cfg.compute_dtype
    logits = jnp.dot(x.astype(dtype), w_DV.astype(dtype)).astype(jnp.float32)
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, logits, jnp.finfo(jnp.float32).min)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple:
    """Per layer (k, v), each [batch, kv_heads, length, head_dim]; with scan_layers one (k, v) whose arrays
    carry a leading layer axis, as the scanned block reads and writes them."""
    shape = (batch, cfg.kv_heads, length, cfg.n_embd // cfg.n_head)
    if cfg.scan_layers:
        return tuple(jnp.zeros((cfg.n_layer, *shape), cfg.compute_dtype) for _ in "kv")
    return tuple((jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)) for _ in range(cfg.n_layer))


def stack_layers(params: dict, n_layer: int) -> dict:
    """Looped layout (h_0 ... h_{n-1}) -> scanned layout (one "h", every leaf with a leading layer axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *layers: jnp.stack(layers), *(params[f"h_{i}"] for i in range(n_layer)))
    return out


def unstack_layers(params: dict, n_layer: int) -> dict:
    """Scanned layout -> looped layout: the inverse of stack_layers."""
    out = {k: v for k, v in params.items() if k != "h"}
    out.update({f"h_{i}": jax.tree.map(lambda x: x[i], params["h"]) for i in range(n_layer)})
    return out


# The parameter tree's layout. Bump it when a change makes older checkpoints' trees differ (renamed, reshaped
# or stacked parameters); gpt/checkpoint.py refuses a checkpoint of another layout with one line.
LAYOUT_VERSION = 1


def layout(cfg: ModelConfig) -> dict:
    """What a checkpoint's parameter tree depends on beyond the shapes in cfg: recorded in its meta."""
    return {"version": LAYOUT_VERSION, **({"scan_layers": True} if cfg.scan_layers else {})}


def init_params(cfg: ModelConfig, key):
    """Fresh parameters for cfg, boxed with their logical axis names: the one place the model is initialised
    (the trainer shards it, checkpoint restores and the HF loader take its shapes)."""
    return GPT(cfg).init(key, jnp.zeros((1, cfg.block_size), jnp.int32))["params"]


def param_counts(cfg: ModelConfig, params) -> dict[str, int]:
    """The parameter counts people mean, by name (the vocabulary's padding rows are never counted):
    total: every parameter, a tied LM head once;
    non_embedding: without the token and position embeddings (and an untied head), as Kaplan et al. (2020) count N;
    matmul: the N of MFU's 6N, the weights used in matrix products: all but the position embedding (a tied
    token embedding is the LM head's matrix; an untied one is only looked up), as nanoGPT's estimate_mfu counts it."""
    return counts_of(cfg, sum(x.size for x in jax.tree_util.tree_leaves(params)))


def counts_of(cfg: ModelConfig, padded: int) -> dict[str, int]:
    """param_counts from the number of parameters init_params makes (`padded`: the vocabulary's padding rows
    included), for sizes counted without being built (gpt/plan.py's n_params)."""
    vocab_matrices = 1 if cfg.tie_embeddings else 2  # the token embedding, and an untied head
    total = padded - vocab_matrices * (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    wpe = cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0
    embedding = cfg.vocab_size * cfg.n_embd
    return {"total": total, "non_embedding": total - vocab_matrices * embedding - wpe,
            "matmul": total - wpe - (vocab_matrices - 1) * embedding}


def attention_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of attention's scores and weighted sum: 12*L*C*T (PaLM appendix B)."""
    return 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def flops_per_token(cfg: ModelConfig, n_matmul_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6N for the matmuls (N = param_counts' matmul),
    plus attention's."""
    return 6 * n_matmul_params + attention_flops_per_token(cfg)
