"""Sampling from a trained model: one jitted prefill over the prompts, then a jitted decode loop with a
preallocated KV cache (lax.while_loop: no Python work per token).

Prompts of different lengths share a batch: they are left-padded to a bucket length (a power of two, so a
new prompt length rarely recompiles), pad slots are masked out of attention, and each row's positions start
at 0 at its first real token. Every row then writes its n-th new token to the same cache slot.

The rules apply in the order users expect: temperature, then top-k, then top-p; temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gpt import checkpoint, sharding
from gpt.config import ConfigError, MeshConfig, ModelConfig
from gpt.hf import from_hf
from gpt.model import GPT, init_cache


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


def sample_logits(logits, key, temperature, top_k, top_p):
    """Next tokens [B] from logits [B, V]. The branches (lax.cond) skip the vocabulary sort when neither
    top-k nor top-p is asked for, and all sampling when decoding greedily."""

    def sample(logits):
        filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),
                                lambda l: l / jnp.maximum(temperature, 1e-6), logits)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), sample, logits)


def bucket(length: int) -> int:
    return max(8, 1 << (length - 1).bit_length())


@dataclass(frozen=True)
class Rules:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0


class Generator:
    """Compiled prefill and decode for one model; the compiled functions are reused across calls."""

    CHUNK = 32  # tokens per decode call: between calls the host streams text and checks stop strings

    def __init__(self, cfg: ModelConfig, params, eot_token: int | None = None):
        self.cfg, self.params, self.eot = cfg, params, eot_token
        self.model = GPT(cfg)
        self._prefill = jax.jit(self._prefill_fn, static_argnames="cache_len")
        self._decode = jax.jit(self._decode_fn, static_argnames="steps", donate_argnames="carry")

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

    def _decode_fn(self, params, carry, pad, key, temperature, top_k, top_p, steps: int):
        """Sample up to `steps` more tokens, each fed back through the cache. carry = (t, cache, logits, out,
        done): out [B, max_new] collects the tokens; a row is done at end-of-text (or when the host says)."""
        t0, cache = carry[0], carry[1]
        max_new = carry[3].shape[1]
        slot = jnp.arange(cache[0][0].shape[2])
        length = slot.shape[0] - max_new  # the prompt bucket

        def body(carry):
            t, cache, logits, out, done = carry
            token = sample_logits(logits, jax.random.fold_in(key, t), temperature, top_k, top_p)
            token = jnp.where(done, 0, token)
            out = out.at[:, t].set(token)
            if self.eot is not None:
                done = done | (token == self.eot)
            index = length + t
            mask = (slot[None, :] <= index) & (slot[None, :] >= pad[:, None])
            logits, cache = self.model.apply({"params": params}, token[:, None], (index - pad)[:, None],
                                             mask[:, None, None, :], cache, index)
            return t + 1, cache, logits[:, -1], out, done

        def cond(carry):
            return (carry[0] < t0 + steps) & (carry[0] < max_new) & ~jnp.all(carry[4])

        return jax.lax.while_loop(cond, body, carry)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, rules: Rules, seed: int,
                 stop=None, on_chunk=None, sliding_window: bool = False) -> list[list[int]]:
        """New token ids for each prompt, ending with end-of-text if the model emitted it.

        stop(ids) -> int | None: called on each unfinished row's new tokens after every chunk; a number ends
        that row, keeping that many tokens (stop strings). on_chunk(rows): the new tokens so far (streaming).
        sliding_window: let prompt + max_new_tokens exceed block_size by re-reading the last half context.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt is empty: give at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens <= self.cfg.block_size:
            return self._generate(prompts, max_new_tokens, rules, jax.random.key(seed), stop, on_chunk)
        if not sliding_window:
            raise ConfigError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"context of block_size={self.cfg.block_size} tokens (or pass --sliding_window=True)")
        # Sliding window: generate half a context at a time, each round prefilled from the latest tokens.
        news: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        generated, round_ = 0, 0
        while generated < max_new_tokens and not all(finished):
            n = min(self.cfg.block_size // 2, max_new_tokens - generated)
            contexts = [(p + o)[-(self.cfg.block_size - n):] for p, o in zip(prompts, news)]
            out = self._generate(contexts, n, rules, jax.random.fold_in(jax.random.key(seed), round_), None, None)
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

    def _generate(self, prompts, max_new_tokens, rules: Rules, key, stop, on_chunk) -> list[list[int]]:
        length = min(bucket(max(len(p) for p in prompts)), self.cfg.block_size)
        tokens = np.zeros((len(prompts), length), np.int32)
        pad = np.array([length - len(p) for p in prompts], np.int32)
        for row, p in enumerate(prompts):
            tokens[row, pad[row]:] = p
        logits, cache = self._prefill(self.params, tokens, pad, cache_len=length + max_new_tokens)
        b = len(prompts)
        carry = (jnp.int32(0), cache, logits, jnp.zeros((b, max_new_tokens), jnp.int32), jnp.zeros((b,), bool))
        sampling = (jnp.float32(rules.temperature), jnp.int32(rules.top_k), jnp.float32(rules.top_p))
        cut: dict[int, int] = {}
        while True:
            carry = self._decode(self.params, carry, pad, key, *sampling, steps=self.CHUNK)
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
    """(model config, sharded params, tokenizer name, a description) from a checkpoint or an HF directory."""
    if init_from == "resume":
        cfg, params, meta, restored = checkpoint.load_params(out_dir, step, mesh_cfg)
        return cfg, params, meta["tokenizer"]["tokenizer"], f"{out_dir} step {restored}"
    cfg, params = from_hf(init_from)
    _, shardings = checkpoint.abstract_params(cfg, sharding.make_mesh(mesh_cfg))
    return cfg, jax.device_put(params, shardings), "gpt2", f"GPT-2 weights in {init_from}"
