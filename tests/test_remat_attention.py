"""Rematerialisation and the attention backend: switches that change memory and speed, never the numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.config import REMAT_CHOICES, ConfigError, ModelConfig
from gpt.model import GPT, REMAT_POLICIES, attention_backend, init_params
from tests.helpers import tiny_model_config

CFG = tiny_model_config(block_size=16, vocab_size=200, dtype="float32")  # float32 on every platform
ON_GPU = jax.default_backend() == "gpu"


def loss_and_grads(cfg: ModelConfig, params, idx):
    def loss(p):
        logits, _ = GPT(cfg).apply({"params": p}, idx[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), idx[:, 1:, None], -1))
    return jax.value_and_grad(loss)(params)


def test_every_remat_policy_gives_the_same_loss_and_gradients():
    params = nn.unbox(init_params(CFG, jax.random.key(0)))
    idx = jax.random.randint(jax.random.key(1), (2, CFG.block_size + 1), 0, CFG.vocab_size)
    ref_loss, ref_grads = loss_and_grads(CFG, params, idx)
    for policy in REMAT_POLICIES:
        cfg = ModelConfig(**{**vars(CFG), "remat": policy})
        loss, grads = loss_and_grads(cfg, params, idx)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6), policy
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=f"{policy} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("chunk", [0, 1, 4, 16])
def test_chunked_cross_entropy_gives_the_same_loss_and_gradients(chunk):
    """steps.loss_fn with loss_chunk (the LM head and loss a chunk of positions at a time, recomputed in the
    backward pass) against the whole-sequence log-softmax above, padded vocabulary (200 -> 256) included."""
    from gpt.steps import loss_fn

    params = nn.unbox(init_params(CFG, jax.random.key(0)))
    idx = jax.random.randint(jax.random.key(1), (2, CFG.block_size + 1), 0, CFG.vocab_size)
    ref_loss, ref_grads = loss_and_grads(CFG, params, idx)
    model = GPT(ModelConfig(**{**vars(CFG), "loss_chunk": chunk}))
    loss, grads = jax.value_and_grad(loss_fn)(params, model, idx[:, :-1], idx[:, 1:], None, True)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=f"chunk {chunk} {jax.tree_util.keystr(path)}")


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    """The contract of loss_chunk, read from XLA's buffer assignment of the compiled gradient: all its
    temporaries together stay below one [B, T, vocab] float32 logits array (the unchunked step needs several)."""
    from gpt.steps import loss_fn

    b, t, vocab = 8, 64, 8192
    temporaries = {}
    for chunk in (0, 8):
        cfg = tiny_model_config(block_size=t, vocab_size=vocab, loss_chunk=chunk, dtype="float32")
        model, params = GPT(cfg), nn.unbox(init_params(cfg, jax.random.key(0)))
        x = jnp.zeros((b, t), jnp.int32)
        grad = jax.jit(jax.grad(lambda p, a, y: loss_fn(p, model, a, y, None, True)))
        temporaries[chunk] = grad.lower(params, x, x).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = b * t * vocab * 4
    assert temporaries[8] < logits_bytes < temporaries[0], temporaries


def test_a_loss_chunk_that_does_not_divide_the_context_is_refused():
    from gpt.config import load_config

    with pytest.raises(ConfigError, match="loss_chunk=48: must be 0 or a divisor of block_size=128"):
        load_config(["--loss_chunk=48"])


def test_every_remat_choice_has_a_policy():
    assert ("none", *REMAT_POLICIES) == REMAT_CHOICES


def test_remat_really_recomputes():
    # The jaxpr of the backward pass holds a remat (checkpoint) call only when a policy is on.
    params = nn.unbox(init_params(CFG, jax.random.key(0)))
    idx = jnp.zeros((1, CFG.block_size + 1), jnp.int32)
    plain = str(jax.make_jaxpr(lambda p: loss_and_grads(CFG, p, idx))(params))
    full = str(jax.make_jaxpr(lambda p: loss_and_grads(ModelConfig(**{**vars(CFG), "remat": "full"}), p, idx))(params))
    assert "remat" not in plain and "checkpoint" not in plain
    assert "remat" in full or "checkpoint" in full


@pytest.mark.skipif(ON_GPU, reason="checks the refusal on a machine without an NVIDIA GPU")
def test_cudnn_is_refused_in_one_line_where_it_cannot_run():
    assert attention_backend(CFG) == "xla"  # auto on a CPU
    assert attention_backend(ModelConfig(**{**vars(CFG), "attention": "xla"})) == "xla"
    with pytest.raises(ConfigError, match="attention=cudnn cannot run here: it needs an NVIDIA GPU"):
        attention_backend(ModelConfig(**{**vars(CFG), "attention": "cudnn"}))


@pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla_on_a_gpu():
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=128, vocab_size=512, dtype="bfloat16")
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    idx = jax.random.randint(jax.random.key(1), (2, cfg.block_size + 1), 0, cfg.vocab_size)
    xla_loss, xla_grads = loss_and_grads(ModelConfig(**{**vars(cfg), "attention": "xla"}), params, idx)
    cudnn_loss, cudnn_grads = loss_and_grads(ModelConfig(**{**vars(cfg), "attention": "cudnn"}), params, idx)
    assert float(cudnn_loss) == pytest.approx(float(xla_loss), rel=1e-2)
    for g, r in zip(jax.tree.leaves(cudnn_grads), jax.tree.leaves(xla_grads)):
        assert np.linalg.norm(np.asarray(g - r, np.float32)) <= 3e-2 * np.linalg.norm(np.asarray(r, np.float32)) + 1e-6
