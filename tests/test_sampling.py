"""Sampling: cached decoding against full recomputes, greedy against argmax, and the filtering rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.config import ConfigError
from gpt.model import GPT
from gpt.logits import Rules, filter_logits, sample_logits
from gpt.sampling import Generator
from tests.helpers import check_cached_decode, random_model, tiny_model_config

# The suite's tiny model with a longer context (prompts plus 40 new tokens fit; two 32-token chunks, and a
# sliding window of half a context, are exercised) and a vocabulary that the model pads (200 -> 256).
CFG = tiny_model_config(block_size=64, vocab_size=200)


@pytest.fixture(scope="module")
def model_params():
    model, params, _ = random_model(CFG)
    return model, params


def full_logits(model, params, ids):
    """Logits of a full (uncached) forward over ids. Padded at the end to block_size so one compilation
    serves every length: causality makes the padding invisible to the positions we read."""
    padded = np.zeros((1, CFG.block_size), np.int32)
    padded[0, : len(ids)] = ids
    logits, _ = _apply({"params": params}, padded)
    return np.asarray(logits[0, : len(ids)])


_apply = jax.jit(GPT(CFG).apply)


def test_greedy_equals_step_by_step_argmax_of_full_forward(model_params):
    model, params = model_params
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]  # mixed lengths in one batch
    out = Generator(CFG, params).generate(prompts, 12, Rules(temperature=0.0), seed=0)
    for prompt, new in zip(prompts, out):
        ids = list(prompt)
        for _ in range(12):
            ids.append(int(np.argmax(full_logits(model, params, ids)[-1])))
        assert new == ids[len(prompt):]


def test_cached_decode_logits_equal_full_recompute(model_params):
    """Drive prefill + per-token cached steps by hand with left-padded mixed-length prompts."""
    model, params = model_params
    check_cached_decode(CFG, params, lambda ids: full_logits(model, params, ids), 200)


def test_min_p_draws_only_tokens_at_least_min_p_times_the_likeliest():
    logits = jax.random.normal(jax.random.key(3), (1, 60)) * 0.5
    probs = np.asarray(jax.nn.softmax(logits))[0]
    keys = jax.random.split(jax.random.key(4), 3000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Rules(1.0, min_p=0.5).traced()))(keys))[:, 0]
    allowed = set(np.flatnonzero(probs >= 0.5 * probs.max()).tolist())
    assert set(draws.tolist()) == allowed and len(allowed) > 1  # every allowed token drawn, no other


def test_top_k_never_leaves_the_k_best():
    logits = jax.random.normal(jax.random.key(0), (4, 200)) * 3
    best = set()
    for r in range(4):
        best.add(tuple(np.argsort(-np.asarray(logits[r]))[:5]))
    keys = jax.random.split(jax.random.key(1), 300)
    draws = jax.vmap(lambda k: sample_logits(logits, k, Rules(1.5, 5, 1.0).traced()))(keys)
    for r in range(4):
        allowed = set(np.argsort(-np.asarray(logits[r]))[:5].tolist())
        assert set(np.asarray(draws[:, r]).tolist()) <= allowed
        assert len(set(np.asarray(draws[:, r]).tolist())) > 1  # it did sample, not argmax


def test_top_p_never_leaves_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(2), 2000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, Rules(1.0, 0, 0.8).traced()))(keys))[:, 0]
    assert set(draws.tolist()) == {0, 1, 2}  # 0.5 + 0.25 < 0.8 <= 0.5 + 0.25 + 0.15


def numpy_filter(logits, temperature, top_k, top_p):
    """The sampling rules in plain float64 numpy, row by row: divide by the temperature, keep the top_k
    largest (0 = all), then the smallest set of most likely survivors whose probability reaches top_p
    (1 = all of them)."""
    rows = []
    for z in np.asarray(logits, np.float64) / temperature:
        order = np.argsort(-z, kind="stable")[: top_k or len(z)]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        n_keep = len(order) if top_p >= 1 else max(int(np.sum(np.cumsum(p) - p < top_p)), 1)
        kept = np.full_like(z, -np.inf)
        kept[order[:n_keep]] = z[order[:n_keep]]
        rows.append(kept)
    return np.array(rows)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_k", [0, 1, 7, 200, 500])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 1.0])
def test_filter_matches_numpy_reference(temperature, top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(4), (4, 200)) * 3)
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    want = numpy_filter(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)


def test_filter_works_on_any_leading_shape():
    logits = np.asarray(jax.random.normal(jax.random.key(7), (2, 3, 50)) * 3)
    got = np.asarray(filter_logits(jnp.asarray(logits), 0.5, 7, 0.8))
    want = numpy_filter(logits.reshape(6, 50), 0.5, 7, 0.8).reshape(2, 3, 50)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


def test_greedy_is_the_argmax_whatever_the_filters():
    logits = jax.random.normal(jax.random.key(5), (8, 200))
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.5), (50, 0.9)]:
        got = sample_logits(logits, jax.random.key(6), Rules(0.0, top_k, top_p).traced())
        np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), axis=-1))
    tied = jnp.array([[1.0, 3.0, 3.0, 0.0]] * 64)  # greedy takes the first of tied maxima, every time
    keys = jax.random.split(jax.random.key(8), 64)
    assert set(np.asarray(jax.vmap(lambda k: sample_logits(tied[:1], k, Rules(0.0, 0, 1.0).traced()))(keys)).ravel()) == {1}


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 4, 0.9), (0.7, 4, 1.0), (0.7, 0, 0.8), (1.6, 0, 1.0),
                                                      (1.0, 0, 1.0), (0.5, 0, 1.0), (0.7, 1, 1.0)])
def test_empirical_distribution_matches_the_numpy_rules(temperature, top_k, top_p):
    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    z = numpy_filter(logits, temperature, top_k, top_p)[0]
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    keys = jax.random.split(jax.random.key(3), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(jnp.asarray(logits), k, Rules(temperature, top_k, top_p).traced()))(keys))[:, 0]
    assert draws.dtype == np.int32
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, expected, atol=0.015)  # ~4 standard errors at n=20000


def test_rules_apply_in_order_temperature_then_top_k_then_top_p():
    # After temperature 0.5 the top two hold > 0.9 of the mass, so top_p=0.9 keeps only them;
    # had top-p been applied before temperature it would have kept three.
    logits = jnp.log(jnp.array([[0.4, 0.35, 0.25]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, 0.5, 0, 0.7)))[0]
    assert kept.tolist() == [True, True, False]


def test_sampling_is_reproducible_for_a_seed(model_params):
    _, params = model_params
    gen = Generator(CFG, params)
    a = gen.generate([[1, 2, 3]] * 3, 10, Rules(1.0, 0, 1.0), seed=7)
    b = gen.generate([[1, 2, 3]] * 3, 10, Rules(1.0, 0, 1.0), seed=7)
    c = gen.generate([[1, 2, 3]] * 3, 10, Rules(1.0, 0, 1.0), seed=8)
    assert a == b and a != c


def test_stops_at_end_of_text(model_params):
    model, params = model_params
    greedy = Generator(CFG, params).generate([[5, 17, 42]], 10, Rules(0.0), seed=0)[0]
    eot = greedy[3]  # pretend the 4th greedy token is end-of-text
    out = Generator(CFG, params, eot_token=eot).generate([[5, 17, 42]], 10, Rules(0.0), seed=0)[0]
    assert out == greedy[: greedy.index(eot) + 1]


def test_prompt_plus_new_tokens_beyond_context_is_an_error(model_params):
    _, params = model_params
    with pytest.raises(ConfigError, match="block_size=64"):
        Generator(CFG, params).generate([[1] * 60], 10, Rules(), seed=0)


def test_stop_callback_ends_rows_and_streaming_sees_growth(model_params):
    _, params = model_params
    gen = Generator(CFG, params)
    full = gen.generate([[5, 17, 42], [1, 2]], 40, Rules(0.0), seed=0)
    seen = []
    # Stop row 0 once it holds 3 tokens (as a stop string would); row 1 runs on.
    out = gen.generate([[5, 17, 42], [1, 2]], 40, Rules(0.0), seed=0,
                       stop=lambda ids: 3 if ids[:3] == full[0][:3] and len(ids) >= 3 else None,
                       on_chunk=lambda rows: seen.append([len(r) for r in rows]))
    assert out[0] == full[0][:3] and out[1] == full[1]
    assert seen[0][1] == Generator.CHUNK and seen[-1] == [3, 40]  # chunks of 32, then the rest


def test_sliding_window_goes_past_the_context(model_params):
    _, params = model_params
    gen = Generator(CFG, params)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    out = gen.generate(prompt, 100, Rules(0.0), seed=0, sliding_window=True)[0]
    assert len(out) == 100  # 8 + 100 tokens > block_size 64
    # The first round (half a context) is ordinary greedy decoding of the prompt.
    assert out[:32] == gen.generate(prompt, 32, Rules(0.0), seed=0)[0]
