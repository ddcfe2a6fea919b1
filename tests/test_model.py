"""The Flax model against an independent numpy forward pass of the same weights, and its structure."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.config import ModelConfig
from gpt.hf import to_hf
from gpt.model import GPT, param_counts
from tests.helpers import random_model, tiny_model_config
from tests.reference import numpy_gpt2


# The suite's tiny model with a vocabulary of 200, which the model pads to 256: the padded logits are tested.
TINY = tiny_model_config(vocab_size=200)


def test_logits_match_numpy_reference():
    model, params, idx = random_model(TINY)
    logits, _ = model.apply({"params": params}, idx)
    reference = numpy_gpt2(to_hf(TINY, params), np.asarray(idx), TINY.n_head)
    assert logits.shape == (2, TINY.block_size, 256)  # vocabulary padded to a multiple of 128
    np.testing.assert_allclose(np.asarray(logits[..., :200]), reference[..., :200], rtol=1e-4, atol=1e-4)


def test_padded_vocabulary_is_never_predicted():
    model, params, idx = random_model(TINY)
    logits, _ = model.apply({"params": params}, idx)
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs[..., 200:].max()) == 0.0
    assert int(jnp.argmax(logits, -1).max()) < 200


def test_causality_future_tokens_do_not_change_the_past():
    model, params, idx = random_model(TINY)
    changed = idx.at[:, 10:].set((idx[:, 10:] + 7) % TINY.vocab_size)
    a, _ = model.apply({"params": params}, idx)
    b, _ = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def test_gpt2_initialisation():
    cfg = ModelConfig(n_layer=6, n_head=4, n_embd=128, block_size=64, vocab_size=256)
    model = GPT(cfg)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: hasattr(x, "value"))
    assert np.std(params["wte"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(params["h_0"]["attn"]["c_attn"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert np.std(params["h_0"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(residual, rel=0.05)
    assert np.std(params["h_0"]["attn"]["c_proj"]["kernel"]) == pytest.approx(residual, rel=0.05)
    assert np.all(params["h_0"]["ln_1"]["scale"] == 1) and np.all(params["h_0"]["attn"]["c_attn"]["bias"] == 0)
    # Every parameter is named with logical axes, one name per dimension.
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names")):
        assert len(leaf.names) == leaf.value.ndim
    # GPT-2's count: 12*L*C^2 + 13*L*C + 2C (final LN) + (V + T)*C, biases included, the padding rows not.
    c, L = cfg.n_embd, cfg.n_layer
    blocks = 12 * L * c * c + 13 * L * c + 2 * c
    counts = param_counts(cfg, params)
    assert counts["total"] == blocks + (cfg.vocab_size + cfg.block_size) * c
    assert counts["non_embedding"] == blocks  # Kaplan et al.'s N
    assert counts["matmul"] == blocks + cfg.vocab_size * c  # MFU's N: the tied head is a matmul, wpe is not


def test_bfloat16_compute_stays_close_to_float32():
    model, params, idx = random_model(TINY)
    lo, _ = GPT(ModelConfig(**{**TINY.__dict__, "dtype": "bfloat16"})).apply({"params": params}, idx)
    hi, _ = model.apply({"params": params}, idx)
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lo[..., :200]), np.asarray(hi[..., :200]), atol=0.1)


def test_no_bias_variant_has_no_bias_parameters():
    cfg = ModelConfig(**{**TINY.__dict__, "bias": False})
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert not any("bias" in p for p in paths)
