"""The train state and the pure, jitted train and eval steps.

train_step(state, batch) -> (state, metrics) is compiled once, ahead of time, with the state's shardings
and the state donated. Gradient accumulation is a lax.scan over micro-batches inside the step. Dropout keys
derive from (seed, step), as batches do (gpt/data.py), so the state needs no RNG or data cursor beyond its
step counter, and a resumed run repeats the uninterrupted run exactly.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from gpt import sharding
from gpt.config import Config
from gpt.model import GPT, head_weights, init_params, lm_head
from gpt.optim import apply_updates, lr_schedule, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def loss_fn(params, model: GPT, x, y, dropout_key, deterministic: bool):
    """Mean next-token cross-entropy of token ids x [B, T] against targets y [B, T]."""
    rngs = {} if deterministic else {"dropout": dropout_key}
    chunk = model.cfg.loss_chunk
    out, _ = model.apply({"params": params}, x, deterministic=deterministic, rngs=rngs, head=not chunk)
    if chunk:
        return chunked_cross_entropy(model.cfg, head_weights(model.cfg, params), out, y, chunk)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def chunked_cross_entropy(cfg, w_DV, h_BTD, y_BT, chunk: int):
    """The LM head and cross-entropy `chunk` positions at a time: each chunk's [B, chunk, vocab] logits are
    made and consumed in one step of a scan, and recomputed (jax.checkpoint) in the backward pass instead of
    kept, so the [B, T, vocab] float32 logits never exist whole. Equal to the unchunked mean."""
    b, t, d = h_BTD.shape
    h_NBCD = h_BTD.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)
    y_NBC = y_BT.reshape(b, t // chunk, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(h_BCD, y_BC):
        return optax.softmax_cross_entropy_with_integer_labels(lm_head(cfg, w_DV, h_BCD), y_BC).sum()

    return jax.lax.map(lambda hy: chunk_loss(*hy), (h_NBCD, y_NBC)).sum() / (b * t)


def make_train_step(model: GPT, tx: optax.GradientTransformation, cfg: Config):
    schedule = lr_schedule(cfg.optim)
    deterministic = cfg.model.dropout == 0.0

    def train_step(state: TrainState, batch):
        """batch: (x, y), each [accumulation_steps, batch_size, block_size] int32."""
        step_key = jax.random.fold_in(jax.random.key(cfg.train.seed), state.step)

        def micro_step(grad_sum, inputs):
            x, y, i = inputs
            loss, grads = jax.value_and_grad(loss_fn)(state.params, model, x, y,
                                                      jax.random.fold_in(step_key, i), deterministic)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        n_micro = batch[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro_step, zeros, (*batch, jnp.arange(n_micro)))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule(state.step)
        params = apply_updates(state.params, direction, lr)
        loss, grad_norm = losses.mean(), optax.tree.norm(grads)
        # A non-finite loss or gradient never reaches the parameters: that step's update is dropped, and the
        # host decides (from `finite`) whether to stop the run or count the skipped batch.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def jit_train_step(model: GPT, tx: optax.GradientTransformation, cfg: Config, shardings):
    """The train step compiled for the state's shardings, the state donated (updated in place)."""
    return jax.jit(make_train_step(model, tx, cfg), in_shardings=(shardings, None),
                   out_shardings=(shardings, None), donate_argnums=0)


def abstract_batch(cfg: Config, mesh):
    """Shape, dtype and sharding of one step's inputs (and, alike, its targets): what the step is compiled
    for ahead of time, without reading a batch."""
    shape = (cfg.optim.gradient_accumulation_steps, cfg.data.batch_size, cfg.model.block_size)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh, 1))


def make_eval_step(model: GPT):
    def eval_step(params, batch, token_bytes):
        """(mean loss, UTF-8 bytes of the targets) of one batch; token_bytes: [vocab] bytes per token id."""
        loss = loss_fn(params, model, batch[0], batch[1], None, deterministic=True)
        return jnp.stack([loss, jnp.take(token_bytes, batch[1]).sum().astype(loss.dtype)])
    return eval_step


def build(cfg: Config, mesh):
    """The model, the optimizer, and the train state's shapes, shardings and sharded initialiser on mesh
    (call under sharding.activate(mesh))."""
    model, tx = GPT(cfg.model), make_optimizer(cfg.optim)

    def init_fn(key):
        params = init_params(cfg.model, key)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    abstract, shardings, init = sharding.shard_init(init_fn, mesh, jax.random.key(cfg.train.seed))
    return model, tx, abstract, shardings, init
