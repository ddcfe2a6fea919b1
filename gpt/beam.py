"""Beam search inside the jitted decode loop, step for step the algorithm of transformers' `generate(num_beams=K,
do_sample=False)` (its vectorised `_beam_search`), so that the same model gives the same sequences and scores.

Each prompt keeps K running hypotheses (rows b*K .. b*K + K - 1 of the KV cache) and a pool of K finished
ones. A step: log-softmax of each running hypothesis's logits, the processors (gpt/logits.py) on them, plus
the hypothesis's score; the best 2K of the K x V continuations of each prompt (2K, so that K remain even if
K end here); those that end (end-of-text, or the length limit) and rank among the first K enter the finished
pool with the score sum(log p) / new_length ** length_penalty; the best K that do not end run on, and the
cache rows are gathered by their parents (one take on the cache's batch axis, no host round trip).

Stopping (transformers' `early_stopping`): "true" ends a prompt once K hypotheses are finished; "false"
(transformers' default) once the best running score, divided by the current length ** length_penalty, cannot
beat the worst finished one; "never" like "false" but with the longest possible length when length_penalty > 0
(with length_penalty 0, the canonical beam search). The loop ends when no prompt can change its pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt.logits import process

NEG = -1.0e9  # transformers' "never chosen" score: added, not set, so the arithmetic matches theirs


def _take(x, index_BJ):
    """x [B, K, ...] gathered along axis 1 by index [B, J] -> [B, J, ...]."""
    index = index_BJ.reshape(*index_BJ.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(step, cache, logits_BV, tokens_BL, pad_B, rules: tuple, *, num_beams: int, max_new: int,
                length_penalty, early_stopping: str, ngram: int, processing: bool, eot: int | None,
                batch_axis: int):
    """The finished pool of each prompt after the search: (tokens [B, K, max_new], lengths [B, K], scores
    [B, K]), best first. step(token_N, position_N, mask_N1T, cache, index) -> (logits_NV, cache) runs the model
    on one new token per row; cache and logits_BV are the prompts' prefill (B rows), repeated here K times."""
    b, prompt_len = tokens_BL.shape
    k, n = num_beams, b * num_beams
    cache = jax.tree.map(lambda a: jnp.repeat(a, k, axis=batch_axis), cache)
    logits_NV = jnp.repeat(logits_BV, k, axis=0)
    prompt_NL, pad_N = jnp.repeat(tokens_BL, k, axis=0), jnp.repeat(pad_B, k)
    slot = jnp.arange(prompt_len + max_new)
    early_true, early_never = early_stopping == "true", early_stopping == "never"
    top_K = jnp.arange(2 * k) < k  # only the best K continuations may finish; the rest are spares to run on

    def body(carry):
        t, cache, logits_NV, run_tok, run_score, fin_tok, fin_len, fin_score, fin_done, open_B = carry
        logp_NV = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
        if processing:  # (compiled in only when a rule asks for it, as in the sampling loop)
            history_NL = jnp.concatenate([prompt_NL, run_tok.reshape(n, max_new)], axis=1)
            logp_NV = process(logp_NV, history_NL, pad_N, prompt_len + t, t, rules, ngram, eot)
        vocab = logp_NV.shape[-1]
        total = (logp_NV.reshape(b, k, vocab) + run_score[:, :, None]).reshape(b, k * vocab)
        cand_score, cand = jax.lax.top_k(total, 2 * k)  # [B, 2K]
        parent, token = cand // vocab, cand % vocab
        cand_tok = _take(run_tok, parent).at[:, :, t].set(token)
        ends = (t + 1 >= max_new) | (token == eot if eot is not None else jnp.zeros_like(token, bool))

        # The best K continuations that do not end run on; their cache rows are their parents'.
        run_score, keep = jax.lax.top_k(cand_score + NEG * ends, k)
        run_tok, run_parent = _take(cand_tok, keep), _take(parent, keep)

        # Those of the first K that end here join the finished pool if they beat its worst.
        just = ends & top_K[None, :]
        score = cand_score / (t + 1.0) ** length_penalty
        score += NEG * (jnp.all(fin_done, axis=1, keepdims=True) & early_true)
        score += NEG * ~open_B[:, None]
        score += NEG * ~just
        merged = jnp.concatenate([fin_score, score], axis=1)
        best = jax.lax.top_k(merged, k)[1]
        fin_tok = _take(jnp.concatenate([fin_tok, cand_tok], axis=1), best)
        fin_len = _take(jnp.concatenate([fin_len, jnp.full((b, 2 * k), t + 1, jnp.int32)], axis=1), best)
        fin_score = _take(merged, best)
        fin_done = _take(jnp.concatenate([fin_done, just], axis=1), best)

        rows = (jnp.arange(b)[:, None] * k + run_parent).reshape(n)
        cache = jax.tree.map(lambda a: jnp.take(a, rows, axis=batch_axis), cache)
        index = prompt_len + t
        mask_NT = (slot[None, :] <= index) & (slot[None, :] >= pad_N[:, None])
        logits_NV, cache = step(run_tok[:, :, t].reshape(n), index - pad_N, mask_NT[:, None, None, :], cache, index)

        # Can a running hypothesis still beat the worst finished one? (transformers' heuristic)
        best_length = jnp.where(early_never & (length_penalty > 0), max_new, t + 1.0)
        best_possible = run_score[:, :1] / best_length ** length_penalty
        worst = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
        open_B = open_B & jnp.any(best_possible > worst, axis=1)
        return t + 1, cache, logits_NV, run_tok, run_score, fin_tok, fin_len, fin_score, fin_done, open_B

    def cond(carry):  # (every candidate ends only at max_new: at most one of a parent's is end-of-text)
        t, fin_done, open_B = carry[0], carry[8], carry[9]
        return (t < max_new) & jnp.any(open_B) & ~(jnp.all(fin_done) & early_true)

    run_score = jnp.where(jnp.arange(k) == 0, 0.0, NEG) * jnp.ones((b, 1))  # at first the K copies are one
    carry = (jnp.int32(0), cache, logits_NV, jnp.zeros((b, k, max_new), jnp.int32), run_score,
             jnp.zeros((b, k, max_new), jnp.int32), jnp.zeros((b, k), jnp.int32), jnp.full((b, k), NEG),
             jnp.zeros((b, k), bool), jnp.ones((b,), bool))
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[5], carry[6], carry[7]
