"""The optimizer: gradient clipping then AdamW, weight decay on matrices only, warmup + cosine schedule.

Gradient accumulation happens inside the train step (gpt/trainer.py), so no accumulation state ever
outlives a step and a checkpoint between steps is always complete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gpt.config import OptimConfig


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
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    return optax.chain(*clip, optax.adamw(lr_schedule(o), b1=o.beta1, b2=o.beta2,
                                          weight_decay=o.weight_decay, mask=decay_mask))
