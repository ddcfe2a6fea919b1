"""The optimizer: gradient clipping then AdamW (or Muon for the blocks' matrices), weight decay on matrices
only, warmup then a cosine, linear or warmup-stable-decay schedule.

The optax chain stops short of the learning rate: it returns the update direction (AdamW's: Adam's normalised
moment plus the decoupled weight decay; or Muon's for the blocks' matrices), and the train step scales it by -lr_schedule(step) with the step it also
logs. So the logged learning rate is the applied one, also after a skipped (non-finite) batch, whose update
and moment changes are dropped while the step, which picks the data, moves on.

Gradient accumulation happens inside the train step, so no accumulation state ever outlives a step and a
checkpoint between steps is always complete.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from gpt.config import OptimConfig, cooldown_start

# The optimizer state's tree layout, recorded in checkpoints (gpt/checkpoint.py). 1: optax.adamw with the
# schedule inside (a schedule count in the state); 2: the direction only, the schedule read from the step.
STATE_LAYOUT = 2


def lr_schedule(o: OptimConfig):
    """Linear warmup to learning_rate (nanoGPT's), then
    cosine: nanoGPT's cosine down to min_lr at lr_decay_iters, then flat;
    linear: a straight line down to min_lr at lr_decay_iters, then flat;
    wsd: warmup-stable-decay (Hägele et al. 2024): learning_rate held until the cooldown, then linearly down
    to min_lr over the last cooldown_frac of lr_decay_iters, then flat. Until its cooldown a wsd run is the
    same whatever its length, which is what lets a sweep branch short cooldowns off one long run."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = o.learning_rate * (step + 1) / (o.warmup_iters + 1)
        if not o.decay_lr:
            return jnp.where(step < o.warmup_iters, warmup, o.learning_rate)
        start = cooldown_start(o.cooldown_frac, o.lr_decay_iters) if o.schedule == "wsd" else o.warmup_iters
        ratio = jnp.clip((step - start) / max(o.lr_decay_iters - start, 1), 0.0, 1.0)
        shape = 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) if o.schedule == "cosine" else 1.0 - ratio
        return jnp.where(step < o.warmup_iters, warmup, o.min_lr + shape * (o.learning_rate - o.min_lr))

    return schedule


def decay_mask(params):
    """Decay weight matrices, embeddings and an untied head; never biases or norm parameters."""
    # The name is the last dict key of the path: boxed parameters (at init) end in `.value`, not in a key.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: [getattr(k, "key", None) for k in path if hasattr(k, "key")][-1] in ("kernel", "embedding", "lm_head"),
        params)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    """Clipping, then the update direction, to be scaled by -lr_schedule(o)(step) (see apply_updates):
    adamw: optax.adamw's chain without its last link (the learning rate);
    muon: Muon (Jordan et al. 2024, as optax.contrib.scale_by_muon: Nesterov momentum, then five quintic
    Newton-Schulz steps that orthogonalise it) for the blocks' matrices (muon_views), scaled by
    sqrt(max(1, fan_out / fan_in)) as Muon's authors do and by muon_learning_rate / learning_rate so that the
    one schedule gives them their own peak; AdamW for everything else (embeddings, an untied head, norms,
    biases), as nanochat does. Weight decay is decoupled in both, on decay_mask's leaves."""
    clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    adamw = [optax.scale_by_adam(b1=o.beta1, b2=o.beta2), optax.add_decayed_weights(o.weight_decay, mask=decay_mask)]
    if o.optimizer == "adamw":  # one flat chain: the state tree STATE_LAYOUT 2 names, which checkpoints hold
        return optax.chain(*clip, *adamw)
    muon = optax.chain(optax.contrib.scale_by_muon(beta=o.muon_momentum, weight_dimension_numbers=muon_views),
                       _scale_by_width(), optax.add_decayed_weights(o.weight_decay),
                       optax.scale(o.muon_learning_rate / o.learning_rate))
    labels = lambda params: jax.tree.map(lambda view: "adamw" if view is None else "muon", muon_views(params),
                                         is_leaf=lambda x: x is None or isinstance(x, MuonView))
    return optax.chain(*clip, optax.partition({"muon": muon, "adamw": optax.chain(*adamw)}, labels))


MuonView = optax.contrib.MuonDimensionNumbers

# How Muon sees each hidden matrix of a block: (reduction axes, output axes) of its kernel, the axes x is
# contracted with and the axes it produces; every other axis holds separate matrices (c_attn's q/k/v axis,
# c_kv's k/v axis, SwiGLU's gate/up axis, and the layer axis of scan_layers' stacked blocks). So q, k and v
# are each orthogonalised as an [embed, heads * head_dim] matrix, and attention's c_proj as [heads * head_dim,
# embed].
_VIEWS = {
    ("attn", "c_attn"): ((0,), (2, 3)),  # [embed, 3, heads, head_dim]
    ("attn", "c_q"): ((0,), (1, 2)),  # [embed, heads, head_dim]
    ("attn", "c_kv"): ((0,), (2, 3)),  # [embed, 2, kv_heads, head_dim]
    ("attn", "c_proj"): ((0, 1), (2,)),  # [heads, head_dim, embed]
    ("mlp", "c_fc"): ((0,), (-1,)),  # [embed, mlp], or SwiGLU's [embed, 2, mlp]
    ("mlp", "c_proj"): ((0,), (1,)),  # [mlp, embed]
}


def muon_views(params):
    """For each parameter, the MuonView of a block matrix that Muon updates, or None (AdamW's)."""

    def view(path, x):
        keys = [getattr(k, "key", None) for k in path if hasattr(k, "key")]
        axes = _VIEWS.get(tuple(keys[-3:-1])) if keys[-1] == "kernel" else None
        if axes is None:
            return None
        stacked = keys[0] == "h"  # scan_layers: a leading layer axis
        shift = lambda axes: tuple(a % (x.ndim - stacked) + stacked for a in axes)
        return MuonView(shift(axes[0]), shift(axes[1]))

    return jax.tree_util.tree_map_with_path(view, params)


def _scale_by_width() -> optax.GradientTransformation:
    """Scale each orthogonalised matrix by sqrt(max(1, fan_out / fan_in)) (Muon's rule; fans from muon_views),
    so a wide output keeps the per-entry update size of a square matrix. (optax.contrib.muon does this with
    a scale_by_shape that optax 0.2.8 does not export.)"""

    def update(updates, state, params=None):
        def scale(u, view):
            fan_in = math.prod(u.shape[a] for a in view.reduction_axis)
            fan_out = math.prod(u.shape[a] for a in view.output_axis)
            return u * math.sqrt(max(1.0, fan_out / fan_in))
        return jax.tree.map(scale, updates, muon_views(updates), is_leaf=lambda x: isinstance(x, MuonView)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_updates(params, direction, lr):
    """params - lr * direction: AdamW's step (weight decay included, scaled by the learning rate as optax's
    and torch.optim.AdamW's decoupled decay is)."""
    return jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), params, direction)
