"""The optimizer: gradient clipping then AdamW, weight decay on matrices only, warmup then a cosine or
warmup-stable-decay schedule.

The optax chain stops short of the learning rate: it returns the AdamW direction (Adam's normalised moment
plus the decoupled weight decay), and the train step scales it by -lr_schedule(step) with the step it also
logs. So the logged learning rate is the applied one, also after a skipped (non-finite) batch, whose update
and moment changes are dropped while the step, which picks the data, moves on.

Gradient accumulation happens inside the train step, so no accumulation state ever outlives a step and a
checkpoint between steps is always complete.
"""

from __future__ import annotations

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
    wsd: warmup-stable-decay (Hägele et al. 2024): learning_rate held until the cooldown, then linearly down
    to min_lr over the last cooldown_frac of lr_decay_iters, then flat. Until its cooldown a wsd run is the
    same whatever its length, which is what lets a sweep branch short cooldowns off one long run."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = o.learning_rate * (step + 1) / (o.warmup_iters + 1)
        if not o.decay_lr:
            return jnp.where(step < o.warmup_iters, warmup, o.learning_rate)
        start = o.warmup_iters if o.schedule == "cosine" else cooldown_start(o.cooldown_frac, o.lr_decay_iters)
        ratio = jnp.clip((step - start) / max(o.lr_decay_iters - start, 1), 0.0, 1.0)
        shape = 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) if o.schedule == "cosine" else 1.0 - ratio
        return jnp.where(step < o.warmup_iters, warmup, o.min_lr + shape * (o.learning_rate - o.min_lr))

    return schedule


def decay_mask(params):
    """Decay weight matrices and embeddings; never biases or LayerNorm parameters."""
    # The name is the last dict key of the path: boxed parameters (at init) end in `.value`, not in a key.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: [getattr(k, "key", None) for k in path if hasattr(k, "key")][-1] in ("kernel", "embedding"),
        params)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    """Clipping, then optax.adamw's chain without its last link (the learning rate): the update direction,
    to be scaled by -lr_schedule(o)(step); see apply_updates."""
    clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    return optax.chain(*clip, optax.scale_by_adam(b1=o.beta1, b2=o.beta2),
                       optax.add_decayed_weights(o.weight_decay, mask=decay_mask))


def apply_updates(params, direction, lr):
    """params - lr * direction: AdamW's step (weight decay included, scaled by the learning rate as optax's
    and torch.optim.AdamW's decoupled decay is)."""
    return jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), params, direction)
