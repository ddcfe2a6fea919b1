"""What decoding does to the model's next-token logits, in transformers' order, all inside the jitted loop.

1. Processors, in every decoding mode (in beam search on the log-probabilities, as transformers applies them):
   - repetition_penalty (CTRL, Keskar et al. 2019): the logit of every token already in the sequence (prompt
     included) is divided by the penalty where it is positive and multiplied by it where it is negative;
   - no_repeat_ngram_size = n: a token that would complete an n-gram already in the sequence gets -inf;
   - min_new_tokens: end-of-text gets -inf until that many new tokens are out.
2. Sampling rules, when sampling: temperature, then top-k, then top-p (the nucleus), then min-p (keep the
   tokens at least min_p times as likely as the most likely one). Temperature 0 is greedy: the argmax of the
   processed logits.

A processor that is off costs (almost) nothing: the repetition penalty runs under a lax.cond on its setting,
no_repeat_ngram_size is static (0 compiles no n-gram code), and min_new_tokens is one select on the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Rules:
    """How the next token is chosen. The processors' defaults are off; no_repeat_ngram_size is static (it sets
    shapes inside the compiled loop: each value compiles once)."""
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0

    @property
    def processing(self) -> bool:
        """Whether any processor (step 1) is on: sampling compiles them into its loop only then."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or self.min_new_tokens > 0

    def traced(self) -> tuple:
        """The rules that enter the compiled loop as values (changing them does not recompile)."""
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p),
                jnp.float32(self.min_p), jnp.float32(self.repetition_penalty), jnp.int32(self.min_new_tokens))


def repetition_penalty(logits_BV, history_BL, valid_BL, penalty):
    """CTRL's rule on every token of each row's sequence (history where valid)."""
    rows = jnp.arange(logits_BV.shape[0])[:, None]
    seen_BV = jnp.zeros(logits_BV.shape, bool).at[rows, history_BL].max(valid_BL)
    scaled = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return jnp.where(seen_BV, scaled, logits_BV)


def no_repeat_ngram(logits_BV, history_BL, start_B, end, n: int):
    """-inf for each token that would complete an n-gram of the sequence history[b, start_B[b]:end] (end is the
    next token's slot, the same for every row). Nothing is banned before the sequence holds n - 1 tokens."""
    b, length = history_BL.shape
    starts = jnp.arange(length - n + 1)  # n-gram i covers slots i .. i + n - 1
    # windows_BIN[b, i, j] = history[b, i + j]: the n-grams, whose last token is the one a match would repeat.
    windows_BIN = jnp.stack([history_BL[:, j: length - n + 1 + j] for j in range(n)], axis=-1)
    last_BN1 = jax.lax.dynamic_slice_in_dim(history_BL, end - (n - 1), n - 1, axis=1) if n > 1 else \
        jnp.zeros((b, 0), history_BL.dtype)
    inside_BI = (starts[None, :] >= start_B[:, None]) & (starts[None, :] + n - 1 < end)
    match_BI = jnp.all(windows_BIN[:, :, : n - 1] == last_BN1[:, None, :], axis=-1) & inside_BI
    match_BI = match_BI & (end - start_B[:, None] >= n - 1)
    banned_BV = jnp.zeros(logits_BV.shape, bool).at[jnp.arange(b)[:, None], windows_BIN[:, :, -1]].max(match_BI)
    return jnp.where(banned_BV, -jnp.inf, logits_BV)


def process(logits_BV, history_BL, start_B, end, n_new, rules: tuple, ngram: int, eot: int | None):
    """The processors of the module docstring, in their order. history_BL: each row's tokens, its sequence in
    slots start_B[b] .. end - 1; n_new: the new tokens out so far (for min_new_tokens)."""
    _, _, _, _, penalty, min_new = rules
    slots = jnp.arange(history_BL.shape[1])
    valid_BL = (slots[None, :] >= start_B[:, None]) & (slots[None, :] < end)
    logits_BV = jax.lax.cond(penalty != 1.0, lambda l: repetition_penalty(l, history_BL, valid_BL, penalty),
                             lambda l: l, logits_BV)
    if 0 < ngram <= history_BL.shape[1]:  # (a longer n-gram than the history holds is never repeated)
        logits_BV = no_repeat_ngram(logits_BV, history_BL, start_B, end, ngram)
    if eot is not None:
        logits_BV = jnp.where((n_new < min_new) & (jnp.arange(logits_BV.shape[-1]) == eot), -jnp.inf, logits_BV)
    return logits_BV


def filter_logits(logits, temperature, top_k, top_p):
    """Scale by temperature, then mask (to -inf) all but the top_k (0 = all), then all outside the nucleus:
    the smallest set of most likely tokens whose probability reaches top_p."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    vocab = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)  # the top-k cut, in rank order
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    # top_p = 1 keeps all k: in float32 the tail's `before` can round up to 1.0 and would be dropped.
    n_keep = jnp.where(top_p >= 1.0, k, jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1))
    threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)  # n_keep <= k: this applies both cuts
    return jnp.where(logits < threshold, -jnp.inf, logits)


def min_p_filter(logits, min_p):
    """-inf for the tokens less than min_p times as likely as the most likely one (which always stays)."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)


def sample_logits(logits, key, rules: tuple):
    """Next tokens [B] from processed logits [B, V]. The branches (lax.cond) skip the vocabulary sort when
    neither top-k nor top-p is asked for, and all sampling when decoding greedily."""
    temperature, top_k, top_p, min_p = rules[:4]

    def sample(logits):
        filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),
                                lambda l: l / jnp.maximum(temperature, 1e-6), logits)
        filtered = jax.lax.cond(min_p > 0, lambda l: min_p_filter(l, min_p), lambda l: l, filtered)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), sample, logits)
