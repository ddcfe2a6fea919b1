"""The GPT-2 architecture in Flax (Linen): one class per concept, as nanoGPT's model.py.

Learned token and position embeddings, pre-LayerNorm blocks of causal multi-head attention and a 4x
tanh-GELU MLP, a final LayerNorm, and an LM head tied to the token embedding. Initialisation is GPT-2's:
normal(0.02), with the residual projections scaled by 1/sqrt(2 * n_layer).

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", ...); gpt/sharding.py maps
them to mesh axes, so no layer here knows how it is sharded. Parameters are float32; `dtype` sets the
compute precision of the matmuls.

Attention in training runs on the kernel `attention_backend` picks: cuDNN's fused flash attention
(`jax.nn.dot_product_attention`) on NVIDIA GPUs (bf16/fp16), and everywhere else `attention`: the
[batch, heads, T, T] scores made by two batched matmuls, as the decoder computes them. `remat` recomputes each block's activations in the backward
pass instead of keeping them, by one of `REMAT_POLICIES`.

Decoding uses an explicit KV cache: a tuple of (k, v) per layer, [batch, heads, cache_len, head_dim], passed
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


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_bias=cfg.bias, dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=_zeros(("embed",)))


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


def attention(q, k, v, mask):
    """Attention of q [B, T, heads, hd] over k, v [B, heads, S, hd] (a KV cache, or this chunk's keys and
    values) where mask [B or 1, 1, T, S] allows.

    Keys and values are heads-major so these two matmuls read them in place: with the [B, S, heads, hd] layout
    XLA transposed the whole cache on every decoded token. In training the same form beat the XLA path of
    jax.nn.dot_product_attention on a CPU by 12% per step at GPT-2 small's shape (137 -> 153 tokens/s;
    its softmax ran on a layout that cost XLA:CPU 2.5x more time)."""
    scores = jnp.einsum("btnh,bnsh->bnts", q, k.astype(q.dtype)).astype(jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bnts,bnsh->btnh", probs.astype(q.dtype), v.astype(q.dtype))


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, cache, cache_index, deterministic):
        cfg = self.cfg
        n_head, head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        # q, k, v in one matmul, kept as separate (3, heads, head_dim) axes so tensor parallelism splits heads.
        qkv = Dense((3, n_head, head_dim), ("embed", None, "heads", "head_dim"), cfg, name="c_attn")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is None and mask is None and attention_backend(cfg) == "cudnn":  # training on an NVIDIA GPU
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        elif cache is None:  # training and evaluation elsewhere, or a masked prefill: causal unless mask says
            if mask is None:
                mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, None]
            y = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        else:  # decoding: write this chunk's keys/values at cache_index, attend over the whole cache
            k, v = (jax.lax.dynamic_update_slice(c, x.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, cache_index, 0))
                    for c, x in zip(cache, (k, v)))
            cache = (k, v)
            y = attention(q, k, v, mask)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        y = Dense((cfg.n_embd,), ("heads", "head_dim", "embed"), cfg, std=residual_std, n_in=2, name="c_proj")(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.cfg
        h = Dense((4 * cfg.n_embd,), ("embed", "mlp"), cfg, name="c_fc")(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "seq", "mlp"))  # GPT-2's gelu_new
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        h = Dense((cfg.n_embd,), ("mlp", "embed"), cfg, std=residual_std, name="c_proj")(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, mask, cache, cache_index, deterministic):
        y, cache = CausalSelfAttention(self.cfg, name="attn")(
            _layer_norm(self.cfg, "ln_1")(x), mask, cache, cache_index, deterministic)
        x = x + checkpoint_name(y, "attn_out")
        x = x + MLP(self.cfg, name="mlp")(checkpoint_name(_layer_norm(self.cfg, "ln_2")(x), "mlp_in"), deterministic)
        return nn.with_logical_constraint(x, ("batch", "seq", "embed")), cache


class GPT(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, idx, positions=None, mask=None, cache=None, cache_index=0, deterministic=True, head=True):
        """Logits [B, T, padded_vocab] (float32) for token ids idx [B, T], and the updated cache; with
        head=False the final hidden states [B, T, n_embd] instead (for lm_head applied in chunks).

        positions: [B, T] position ids (default 0..T-1). mask: [B, 1, T, S] boolean attention mask; None means
        plain causal attention over idx itself. cache: per-layer (k, v) from init_cache, written at cache_index.
        """
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(idx.shape[1]), idx.shape)
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=cfg.compute_dtype, name="wte",
                       embedding_init=_init(0.02, ("vocab", "embed")))
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.compute_dtype, name="wpe",
                       embedding_init=_init(0.02, ("pos", "embed")))
        x = nn.Dropout(cfg.dropout)(wte(idx) + wpe(positions), deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        block = Block
        if cfg.remat != "none":  # deterministic (argument 5, counting self) is a Python bool: static
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(5,),
                             prevent_cse=not cfg.scan_layers)  # scan already keeps XLA from merging recomputes
        if cfg.scan_layers:  # one block traced once, its parameters stacked on a leading "layers" axis
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast), length=cfg.n_layer,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, new_cache = stack(cfg, name="h")(x, mask, cache, cache_index, deterministic)
        else:
            new_cache = []
            for i in range(cfg.n_layer):
                x, layer_cache = block(cfg, name=f"h_{i}")(
                    x, mask, None if cache is None else cache[i], cache_index, deterministic)
                new_cache.append(layer_cache)
            new_cache = tuple(new_cache) if cache is not None else None
        x = _layer_norm(cfg, "ln_f")(x)
        return (lm_head(cfg, wte.embedding, x) if head else x), new_cache


def lm_head(cfg: ModelConfig, embedding, x):
    """Logits (float32) from final hidden states x [..., n_embd]: the head tied to the token embedding. The
    vocabulary's padding rows are never predicted: the loss and the samplers see the true vocabulary."""
    dtype = cfg.compute_dtype
    logits = jnp.dot(x.astype(dtype), embedding.astype(dtype).T).astype(jnp.float32)
    return jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, logits, jnp.finfo(jnp.float32).min)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple:
    """Per layer (k, v), each [batch, heads, length, head_dim]; with scan_layers one (k, v) whose arrays
    carry a leading layer axis, as the scanned block reads and writes them."""
    shape = (batch, cfg.n_head, length, cfg.n_embd // cfg.n_head)
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
    total: every parameter, the tied LM head once;
    non_embedding: without the token and position embeddings, as Kaplan et al. (2020) count N;
    matmul: the N of MFU's 6N, the weights used in matrix products: all but the position embedding (the tied
    token embedding is the LM head's matrix), as nanoGPT's estimate_mfu counts it."""
    return counts_of(cfg, sum(x.size for x in jax.tree_util.tree_leaves(params)))


def counts_of(cfg: ModelConfig, padded: int) -> dict[str, int]:
    """param_counts from the number of parameters init_params makes (`padded`: the vocabulary's padding rows
    included), for sizes counted in closed form (gpt/plan.py's n_params) rather than built."""
    total = padded - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    wpe = cfg.block_size * cfg.n_embd
    return {"total": total, "non_embedding": total - cfg.vocab_size * cfg.n_embd - wpe, "matmul": total - wpe}


def attention_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token of attention's scores and weighted sum: 12*L*C*T (PaLM appendix B)."""
    return 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def flops_per_token(cfg: ModelConfig, n_matmul_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6N for the matmuls (N = param_counts' matmul),
    plus attention's."""
    return 6 * n_matmul_params + attention_flops_per_token(cfg)
