"""Beam search and the logits processors against transformers: the same random GPT-2 (saved by transformers,
loaded by gpt.hf) gives the same beams and scores as `generate(num_beams=K, do_sample=False)`, and the
processors equal transformers' on random logits. Also: every returned score equals a full recompute of its
hypothesis without the cache (so the cache was reordered right), K = 1 with early stopping is greedy, and no
hypothesis runs past end-of-text. Needs torch and transformers (`pip install -e ".[test,parity]"`, as CI does)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gpt.hf import from_hf  # noqa: E402
from gpt.logits import Rules, min_p_filter, no_repeat_ngram, repetition_penalty  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.sampling import Beams, Generator  # noqa: E402

VOCAB, EOT = 16, 15  # a small vocabulary, so that end-of-text is often among the candidates


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 with peaked predictions (initializer_range 0.3: few near-ties between candidates) whose
    end-of-text embedding is doubled, so that most hypotheses end with it well before the length limit."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.3, bos_token_id=EOT, eos_token_id=EOT)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight[EOT] *= 2.0
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


def hf_beams(model, prompts, max_new, k, length_penalty, early_stopping, returns):
    """transformers' beams of equal-length prompts (its left padding would enter its repetition penalty, so
    no padding here): per prompt [(new ids, score)]."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, num_beams=k,
                             do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                             num_return_sequences=returns, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=EOT, eos_token_id=EOT)
    hypotheses = []
    for row, score in zip(out.sequences[:, ids.shape[1]:].tolist(), out.sequences_scores.tolist()):
        new = row[: row.index(EOT) + 1] if EOT in row else row  # finished ones are padded with end-of-text
        hypotheses.append((new, score))
    return [hypotheses[i: i + returns] for i in range(0, len(hypotheses), returns)]


def assert_same(ours, theirs, where):
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs], (where, ours, theirs)
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], rtol=1e-5, err_msg=str(where))


PROMPTS = [[3, 1, 4, 8], [6, 2], [11, 12, 13, 14, 1, 10, 7]]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.0, False), (2.0, False), (2.0, "never"),
                                                            (1.0, True)])
def test_beams_and_scores_equal_transformers(hf_dir, k, length_penalty, early_stopping):
    path, model = hf_dir
    cfg, params = from_hf(path)
    gen = Generator(cfg, params, eot_token=EOT)
    beams = Beams(k, length_penalty, str(early_stopping).lower(), k)
    for prompt in PROMPTS:
        assert_same(gen.beam_search([prompt], 24, Rules(0.0), beams)[0],
                    hf_beams(model, [prompt], 24, k, length_penalty, early_stopping, k)[0], prompt)
    # A batch: a prompt whose pool can no longer change waits (masked) while the others go on.
    batch = [[3, 1, 4, 8], [6, 2, 9, 9], [11, 12, 13, 14], [5, 5, 5, 5]]
    for ours, theirs in zip(gen.beam_search(batch, 24, Rules(0.0), beams),
                            hf_beams(model, batch, 24, k, length_penalty, early_stopping, k)):
        assert_same(ours, theirs, "batch")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_beams_with_the_processors_equal_transformers(hf_dir, k):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens inside beam search (on log-probabilities, as
    transformers applies them), and for k = 1 in greedy decoding (on logits), against generate()."""
    path, model = hf_dir
    cfg, params = from_hf(path)
    gen = Generator(cfg, params, eot_token=EOT)
    rules = Rules(0.0, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=5)
    prompt = [3, 1, 4, 8]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, num_beams=k,
                             do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=5,
                             num_return_sequences=k, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=EOT, eos_token_id=EOT)
    rows = [r[: r.index(EOT) + 1] if EOT in r else r for r in out.sequences[:, len(prompt):].tolist()]
    if k == 1:
        assert gen.generate([prompt], 20, rules, seed=0)[0] == rows[0]
        return
    ours = gen.beam_search([prompt], 20, rules, Beams(k, 1.0, "false", k))[0]
    assert [i for i, _ in ours] == rows
    np.testing.assert_allclose([s for _, s in ours], out.sequences_scores.tolist(), rtol=1e-5)
    assert all(len(i) >= 5 for i, _ in ours)


def test_min_new_tokens_holds_back_an_early_end(hf_dir):
    path, _ = hf_dir
    cfg, params = from_hf(path)
    gen = Generator(cfg, params, eot_token=EOT)
    early = [p for p in [*PROMPTS, [1, 6], [4, 3], [1, 12]] if len(gen.generate([p], 20, Rules(0.0), seed=0)[0]) < 5]
    assert early  # greedy ends some of these within 4 tokens; with min_new_tokens=5, none
    assert all(len(ids) >= 5 for ids in gen.generate(early, 20, Rules(0.0, min_new_tokens=5), seed=0))


def test_scanned_layers_and_no_end_of_text_beam_alike(hf_dir):
    """The cache reorder on a scanned model's cache (batch axis 1) gives the beams of the looped one; without an
    end-of-text token (the byte tokenizer) a batch of prompts runs every hypothesis to the length limit."""
    from dataclasses import replace

    path, _ = hf_dir
    cfg, params = from_hf(path)
    scanned = Generator(replace(cfg, scan_layers=True), from_hf(path, scan_layers=True)[1], eot_token=EOT)
    beams = Beams(3, 1.0, "false", 3)
    looped = Generator(cfg, params, eot_token=EOT).beam_search(PROMPTS, 12, Rules(0.0), beams)
    for a, b in zip(looped, scanned.beam_search(PROMPTS, 12, Rules(0.0), beams)):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)
    for hyps in Generator(cfg, params, eot_token=None).beam_search(PROMPTS, 12, Rules(0.0), beams):
        assert [len(i) for i, _ in hyps] == [12, 12, 12]


def test_k1_is_greedy_and_no_beam_runs_past_end_of_text(hf_dir):
    path, _ = hf_dir
    cfg, params = from_hf(path)
    gen = Generator(cfg, params, eot_token=EOT)
    greedy = gen.generate(PROMPTS, 24, Rules(0.0), seed=0)
    single = gen.beam_search(PROMPTS, 24, Rules(0.0), Beams(1, 1.0, "true", 1))
    assert [hyps[0][0] for hyps in single] == greedy
    ended = 0
    for hyps in gen.beam_search(PROMPTS, 24, Rules(0.0), Beams(4, 1.0, "false", 4)):
        for ids, _ in hyps:
            assert EOT not in ids[:-1]
            ended += ids[-1] == EOT
    assert ended >= 6  # of 12: the finished pool was exercised


def test_every_score_is_its_hypothesis_recomputed_without_the_cache(hf_dir):
    """Batched prompts of different lengths (left-padded): each hypothesis's score equals its log-probability
    from one full forward pass of prompt + hypothesis over its length ** length_penalty."""
    path, _ = hf_dir
    cfg, params = from_hf(path)
    model = GPT(cfg)
    for length_penalty in (1.0, 0.5):
        results = Generator(cfg, params, eot_token=EOT).beam_search(PROMPTS, 16, Rules(0.0),
                                                                    Beams(3, length_penalty, "false", 3))
        for prompt, hyps in zip(PROMPTS, results):
            for ids, score in hyps:
                logits, _ = model.apply({"params": params}, jnp.asarray([prompt + ids]))  # plain causal, no cache
                logp = np.asarray(jax.nn.log_softmax(logits[0, :, :VOCAB].astype(jnp.float32), axis=-1), np.float64)
                total = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(ids))
                assert score == pytest.approx(total / len(ids) ** length_penalty, rel=1e-5)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    ids, scores = rng.integers(0, 50, (4, 12)), rng.normal(size=(4, 50)).astype(np.float32)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(scores)).numpy()
    ours = repetition_penalty(jnp.asarray(scores), jnp.asarray(ids), jnp.ones(ids.shape, bool), penalty)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = np.random.default_rng(n)
    ids = rng.integers(0, 6, (5, 20))  # a small alphabet: many repeated n-grams
    scores = rng.normal(size=(5, 6)).astype(np.float32)
    theirs = NoRepeatNGramLogitsProcessor(n)(torch.tensor(ids), torch.tensor(scores)).numpy()
    ours = no_repeat_ngram(jnp.asarray(scores), jnp.asarray(ids), jnp.zeros(5, jnp.int32), 20, n)
    np.testing.assert_array_equal(np.isneginf(np.asarray(ours)), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_array_equal(np.asarray(ours)[kept], theirs[kept])


@pytest.mark.parametrize("min_p", [0.05, 0.3, 1.0])
def test_min_p_equals_transformers(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    scores = np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32) * 2
    theirs = MinPLogitsWarper(min_p)(None, torch.tensor(scores)).numpy()
    ours = np.asarray(min_p_filter(jnp.asarray(scores), min_p))
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))


def test_no_repeat_ngram_reads_only_the_rows_own_sequence():
    """Each row's sequence in slots start[b] .. end - 1 of a longer history (left padding before, unwritten
    slots after, both holding tokens that would match): the bans transformers makes on that sequence alone."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = np.random.default_rng(5)
    history = rng.integers(0, 4, (3, 30))
    start, end = np.array([0, 4, 9]), 22
    scores = rng.normal(size=(3, 4)).astype(np.float32)
    ours = np.asarray(no_repeat_ngram(jnp.asarray(scores), jnp.asarray(history), jnp.asarray(start), end, 3))
    for b in range(3):
        theirs = NoRepeatNGramLogitsProcessor(3)(torch.tensor(history[b:b + 1, start[b]:end]),
                                                 torch.tensor(scores[b:b + 1])).numpy()[0]
        np.testing.assert_array_equal(np.isneginf(ours[b]), np.isneginf(theirs), err_msg=f"row {b}")
