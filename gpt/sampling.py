"""Sampling from a trained model: one jitted prefill over the prompts, then a jitted decode loop with a
preallocated KV cache (lax.while_loop: no Python work per token).

Prompts of different lengths share a batch: they are left-padded to a bucket length (a power of two, so a
new prompt length rarely recompiles), pad slots are masked out of attention, and each row's positions start
at 0 at its first real token. Every row then writes its n-th new token to the same cache slot.

What is done to the logits, and in which order, is gpt/logits.py's; beam search is gpt/beam.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from gpt import checkpoint, sharding
from gpt.config import ConfigError, MeshConfig, ModelConfig
from gpt.beam import beam_search
from gpt.hf import from_hf
from gpt.logits import Rules, process, sample_logits
from gpt.model import GPT, init_cache


def stop_rule(stops: list[str], decode):
    """stop(ids) -> how many of ids first spell out any of the stop strings, or None while none appears; None
    itself when there are no stop strings. sample.py and the server end a sample with it."""
    if not stops:
        return None

    def stop(ids: list[int]) -> int | None:
        if not any(s in decode(ids) for s in stops):
            return None
        return next(k for k in range(1, len(ids) + 1) if any(s in decode(ids[:k]) for s in stops))

    return stop


def before_stop(text: str, stops: list[str]) -> str:
    """text up to the first of the stop strings in it (all of it when none is)."""
    return text[: min((text.index(s) for s in stops if s in text), default=len(text))]


def bucket(length: int) -> int:
    return max(8, 1 << (length - 1).bit_length())


@dataclass(frozen=True)
class Beams:
    """Beam search settings, with transformers' meanings (gpt/beam.py)."""
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: str = "false"  # "false", "true" or "never" (transformers' False, True, "never")
    num_return_sequences: int = 1

    def __post_init__(self):
        if self.early_stopping not in ("false", "true", "never"):
            raise ConfigError(f"early_stopping={self.early_stopping!r}: use 'false', 'true' or 'never'")
        if self.num_beams < 1 or not 1 <= self.num_return_sequences <= self.num_beams:
            raise ConfigError(f"num_beams={self.num_beams}, num_return_sequences={self.num_return_sequences}: need "
                              "1 <= num_return_sequences <= num_beams")


class Generator:
    """Compiled prefill and decode for one model; the compiled functions are reused across calls."""

    CHUNK = 32  # tokens per decode call: between calls the host streams text and checks stop strings

    def __init__(self, cfg: ModelConfig, params, eot_token: int | None = None):
        self.cfg, self.params, self.eot = cfg, params, eot_token
        self.model = GPT(cfg)
        self.batch_axis = 1 if cfg.scan_layers else 0  # of the cache arrays (init_cache's layout)
        self._prefill = jax.jit(self._prefill_fn, static_argnames="cache_len")
        self._decode = jax.jit(self._decode_fn, static_argnames=("steps", "ngram", "processing"),
                               donate_argnames="carry")
        self._beams = jax.jit(self._beam_fn, static_argnames=("num_beams", "max_new", "early_stopping", "ngram",
                                                                  "processing"))

    def _prefill_fn(self, params, tokens, pad, cache_len: int):
        """tokens [B, L] left-padded by pad [B]; returns the logits of the last position and the filled cache."""
        b, length = tokens.shape
        positions = jnp.maximum(jnp.arange(length)[None, :] - pad[:, None], 0)
        slot = jnp.arange(cache_len)
        query = jnp.arange(length)[None, :, None]
        # Real tokens see the real tokens up to themselves; a pad slot sees only itself (never an empty row).
        mask = (slot <= query) & ((slot >= pad[:, None, None]) | (slot == query))
        cache = init_cache(self.cfg, b, cache_len)
        logits, cache = self.model.apply({"params": params}, tokens, positions, mask[:, None], cache, 0)
        return logits[:, -1], cache

    def _step(self, params, token_N, position_N, mask, cache, index):
        """One new token per row through the model and its cache: (logits [N, V], cache)."""
        logits, cache = self.model.apply({"params": params}, token_N[:, None], position_N[:, None], mask, cache, index)
        return logits[:, -1], cache

    def _decode_fn(self, params, carry, tokens, pad, key, rules: tuple, steps: int, ngram: int, processing: bool):
        """Sample up to `steps` more tokens, each fed back through the cache. carry = (t, cache, logits, out,
        done): out [B, max_new] collects the tokens; a row is done at end-of-text (or when the host says).
        tokens [B, L]: the left-padded prompts, which the processors read with the new tokens."""
        t0 = carry[0]
        max_new = carry[3].shape[1]
        length = tokens.shape[1]  # the prompt bucket
        slot = jnp.arange(length + max_new)

        def body(carry):
            t, cache, logits, out, done = carry
            if processing:  # static: with every processor off, the loop compiles without them
                history = jnp.concatenate([tokens, out], axis=1)
                logits = process(logits, history, pad, length + t, t, rules, ngram, self.eot)
            token = sample_logits(logits, jax.random.fold_in(key, t), rules)
            token = jnp.where(done, 0, token)
            out = out.at[:, t].set(token)
            if self.eot is not None:
                done = done | (token == self.eot)
            index = length + t
            mask = (slot[None, :] <= index) & (slot[None, :] >= pad[:, None])
            logits, cache = self._step(params, token, index - pad, mask[:, None, None, :], cache, index)
            return t + 1, cache, logits, out, done

        def cond(carry):
            return (carry[0] < t0 + steps) & (carry[0] < max_new) & ~jnp.all(carry[4])

        return jax.lax.while_loop(cond, body, carry)

    def _beam_fn(self, params, cache, logits, tokens, pad, rules: tuple, length_penalty, num_beams: int,
                 max_new: int, early_stopping: str, ngram: int, processing: bool):
        step = lambda *args: self._step(params, *args)
        return beam_search(step, cache, logits, tokens, pad, rules, num_beams=num_beams, max_new=max_new,
                           length_penalty=length_penalty, early_stopping=early_stopping, ngram=ngram,
                           processing=processing, eot=self.eot, batch_axis=self.batch_axis)

    def beam_search(self, prompts: list[list[int]], max_new_tokens: int, rules: Rules, beams: Beams,
                    stop=None) -> list[list[tuple[list[int], float]]]:
        """For each prompt, its best beams.num_return_sequences hypotheses as (new token ids, score), best first:
        the ids end with end-of-text where the hypothesis ended there; the score is sum(log p) / length **
        length_penalty, as transformers' sequences_scores. stop(ids) -> int | None cuts a returned hypothesis
        at a stop string (the search itself ends hypotheses at end-of-text and the length limit)."""
        self._fits(prompts, max_new_tokens, sliding_window=None)
        tokens, pad = self._pad(prompts)
        logits, cache = self._prefill(self.params, tokens, pad, cache_len=tokens.shape[1] + max_new_tokens)
        out, lengths, scores = jax.device_get(self._beams(
            self.params, cache, logits, tokens, pad, rules.traced(), jnp.float32(beams.length_penalty),
            num_beams=beams.num_beams, max_new=max_new_tokens, early_stopping=beams.early_stopping,
            ngram=rules.no_repeat_ngram_size, processing=rules.processing))
        results = []
        for b in range(len(prompts)):
            hypotheses = []
            for r in range(beams.num_return_sequences):
                ids = out[b, r, : lengths[b, r]].tolist()
                cut = stop(ids) if stop else None
                hypotheses.append((ids if cut is None else ids[:cut], float(scores[b, r])))
            results.append(hypotheses)
        return results

    def generate(self, prompts: list[list[int]], max_new_tokens: int, rules: Rules, seed: int,
                 stop=None, on_chunk=None, sliding_window: bool = False) -> list[list[int]]:
        """New token ids for each prompt, ending with end-of-text if the model emitted it.

        stop(ids) -> int | None: called on each unfinished row's new tokens after every chunk; a number ends
        that row, keeping that many tokens (stop strings). on_chunk(rows): the new tokens so far (streaming).
        sliding_window: let prompt + max_new_tokens exceed block_size by re-reading the last half context.
        """
        if self._fits(prompts, max_new_tokens, sliding_window):
            return self._generate(prompts, max_new_tokens, rules, jax.random.key(seed), stop, on_chunk)
        # Sliding window: generate half a context at a time, each round prefilled from the latest tokens.
        news: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        generated, round_ = 0, 0
        while generated < max_new_tokens and not all(finished):
            n = min(self.cfg.block_size // 2, max_new_tokens - generated)
            contexts = [(p + o)[-(self.cfg.block_size - n):] for p, o in zip(prompts, news)]
            # min_new_tokens counts from the first round (the loop compiled as in the first round, processors
            # and all); the penalties see this round's context.
            round_rules = replace(rules, min_new_tokens=max(0, rules.min_new_tokens - generated))
            out = self._generate(contexts, n, round_rules, jax.random.fold_in(jax.random.key(seed), round_), None,
                                 None, rules.processing)
            for r, ids in enumerate(out):
                if not finished[r]:
                    news[r] += ids
                    cut = stop(news[r]) if stop else None
                    if cut is not None:
                        news[r] = news[r][:cut]
                    finished[r] = cut is not None or len(ids) < n  # a stop string, or end-of-text
            generated, round_ = generated + n, round_ + 1
            if on_chunk:
                on_chunk(news)
        return news

    def _fits(self, prompts: list[list[int]], max_new_tokens: int, sliding_window: bool | None) -> bool:
        """Whether the prompts and max_new_tokens fit the context. Refused in one line: an empty prompt, and
        prompts that do not fit unless sliding_window (None: not offered, as in beam search)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt is empty: give at least one token")
        longest = max(map(len, prompts))
        if longest + max_new_tokens <= self.cfg.block_size:  # (the cache may be longer: positions are what count)
            return True
        if not sliding_window:
            hint = " (or pass --sliding_window=True)" if sliding_window is False else ""
            raise ConfigError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"context of block_size={self.cfg.block_size} tokens{hint}")
        return False

    def _pad(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The prompts left-padded to a bucket length: tokens [B, L] and each row's padding [B]."""
        length = min(bucket(max(len(p) for p in prompts)), self.cfg.block_size)
        tokens = np.zeros((len(prompts), length), np.int32)
        pad = np.array([length - len(p) for p in prompts], np.int32)
        for row, p in enumerate(prompts):
            tokens[row, pad[row]:] = p
        return tokens, pad

    def _generate(self, prompts, max_new_tokens, rules: Rules, key, stop, on_chunk,
                  processing: bool | None = None) -> list[list[int]]:
        """processing: compile the processors in (default: whether rules turn one on)."""
        processing = rules.processing if processing is None else processing
        traced = rules.traced()
        tokens, pad = self._pad(prompts)
        length = tokens.shape[1]
        logits, cache = self._prefill(self.params, tokens, pad, cache_len=length + max_new_tokens)
        b = len(prompts)
        carry = (jnp.int32(0), cache, logits, jnp.zeros((b, max_new_tokens), jnp.int32), jnp.zeros((b,), bool))
        cut: dict[int, int] = {}
        while True:
            carry = self._decode(self.params, carry, tokens, pad, key, traced, steps=self.CHUNK,
                                 ngram=rules.no_repeat_ngram_size, processing=processing)
            t = int(carry[0])
            rows, done = np.asarray(carry[3][:, :t]).tolist(), np.array(carry[4])
            for r, ids in enumerate(rows):
                if self.eot is not None and self.eot in ids and r not in cut:
                    cut[r] = ids.index(self.eot) + 1
                elif stop is not None and r not in cut and (n := stop(ids)) is not None:
                    cut[r], done[r] = n, True
            rows = [ids[: cut.get(r, t)] for r, ids in enumerate(rows)]
            if on_chunk:
                on_chunk(rows)
            if t >= max_new_tokens or done.all():
                return rows
            carry = (*carry[:4], jnp.asarray(done))


def load_model(init_from: str, out_dir: str, step: int, mesh_cfg: MeshConfig):
    """(model config, sharded params, tokenizer name, a description, the checkpoint's step or None) from a
    checkpoint or an HF directory."""
    if init_from == "resume":
        cfg, params, meta, restored = checkpoint.load_params(out_dir, step, mesh_cfg)
        return cfg, params, meta["tokenizer"]["tokenizer"], f"{out_dir} step {restored}", restored
    cfg, params = from_hf(init_from)
    _, shardings = checkpoint.abstract_params(cfg, sharding.make_mesh(mesh_cfg))
    return cfg, jax.device_put(params, shardings), "gpt2", f"GPT-2 weights in {init_from}", None
