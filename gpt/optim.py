"""The optimizer: gradient clipping then AdamW, weight decay on matrices only, warmup + cosine schedule.

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

from gpt.config import OptimConfig

# The optimizer state's tree layout, recorded in checkpoints (gpt/checkpoint.py). 1: optax.adamw with the
# schedule inside (a schedule count in the state); 2: the direction only, the schedule read from the step.
STATE_LAYOUT = 2


def lr_schedule(o: OptimConfig):
    """nanoGPT's schedule: linear warmup to learning_rate, cosine down to min_lr at lr_decay_iters, then flat."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = o.learning_rate * (step + 1) / (o.warmup_iters + 1)
        if not o.decay_lr:
            return jnp.where(step < o.warmup_iters, warmup, o.learning_rate)
        span = max(o.lr_decay_iters - o.warmup_iters, 1)
        ratio = jnp.clip((step - o.warmup_iters) / span, 0.0, 1.0)
        cosine = o.min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (o.learning_rate - o.min_lr)
        return jnp.where(step < o.warmup_iters, warmup, cosine)

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
