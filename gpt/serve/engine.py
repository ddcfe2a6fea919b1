"""Continuous batching: one KV cache of max_batch slots that requests join and leave at chunk boundaries.

A request is prefilled on its own (the same jitted, bucketed prefill as sample.py) into a free slot; then every
active slot decodes CHUNK tokens per jitted call, each at its own cache position (the model writes a [B] vector
of cache indices). Between chunks the engine thread hands each request its new tokens, ends those at
end-of-text, their max_tokens, a stop string or a disconnected client, and fills the freed slots from the
queue: a finished request never waits for the others. Each row samples with its own key (the request's seed,
folded with the row's own token count) and its own rules, computed as for one row alone, so a request's
output never depends on which requests share its batch, and equals sample.py's for the same seed and knobs.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gpt.logits import sample_logits
from gpt.model import init_cache
from gpt.sampling import Generator, bucket

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit for completions)


@dataclass
class Request:
    """One completion choice being decoded. After every chunk the engine thread updates tokens (all new tokens
    so far, cut at a stop string), steps ((token, log-prob, [(id, log-prob)] alternatives) per token, if
    logprobs >= 0) and finish (None while it runs; "stop", "length" or "cancelled"), then calls emit(self).
    Setting `cancelled` frees its slot at the next chunk."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    logprobs: int  # alternatives per token to report; -1 = none
    emit: Callable[["Request"], None]
    stop: Callable[[list[int]], int | None] = lambda ids: None  # tokens to keep when a stop string appears
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    steps: list = field(default_factory=list)
    finish: str | None = None


def _sample_row(logits_V, key, t, temperature, top_k, top_p, min_p):
    """One row's next token exactly as Generator samples a batch of one: the same rules, key fold_in(key, t)."""
    rules = (temperature, top_k, top_p, min_p, jnp.float32(1.0), jnp.int32(0))
    return sample_logits(logits_V[None], jax.random.fold_in(key, t), rules)[0]


class Engine:
    """The decode batch and the thread that runs it; submit() from any thread."""

    CHUNK = 8  # tokens per decode call: how often requests can join, leave and stream

    def __init__(self, cfg, params, eot: int | None, max_batch: int, max_queue: int, log=print):
        self.cfg, self.eot, self.max_batch, self.log = cfg, eot, max_batch, log
        self.generator = Generator(cfg, params, eot)
        self.params = params
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: queue.Queue = queue.Queue()
        self.max_queue = max_queue
        self._submit_lock = threading.Lock()
        self.lock = threading.Lock()  # held while a chunk runs: reload swaps parameters between chunks
        self.pending_params = None
        # A slot holds a whole context plus the most left-padding a prompt bucket adds (under half a context), so
        # a prompt of n tokens has room for block_size - n new ones, as in sample.py.
        self.length = cfg.block_size + max(min(bucket(n), cfg.block_size) - n for n in range(1, cfg.block_size + 1))
        b = max_batch
        self.cache = init_cache(cfg, b, self.length)
        self.logits = jnp.zeros((b, cfg.padded_vocab_size), jnp.float32)
        self.state = {"index": np.zeros(b, np.int32), "pad": np.zeros(b, np.int32), "t": np.zeros(b, np.int32),
                      "limit": np.zeros(b, np.int32), "active": np.zeros(b, bool),
                      "keys": np.zeros((b, *jax.random.key_data(jax.random.key(0)).shape), np.uint32), "temperature": np.zeros(b, np.float32),
                      "top_k": np.zeros(b, np.int32), "top_p": np.ones(b, np.float32), "min_p": np.zeros(b, np.float32)}
        batch_axis = 1 if cfg.scan_layers else 0
        self._insert = jax.jit(lambda cache, logits, row_cache, row_logits, slot: (
            jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, batch_axis), cache, row_cache),
            logits.at[slot].set(row_logits[0])), donate_argnums=(0, 1))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2))
        self._thread = threading.Thread(target=self._run, daemon=True, name="decode-engine")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._started = False
        self.on_swap: Callable[[], None] = lambda: None  # called (engine thread) when new parameters are taken

    # -- compiled pieces --------------------------------------------------------------------------------------
    def _decode_fn(self, params, cache, logits, s: dict):
        """CHUNK steps for every slot: (cache, logits, tokens [B, CHUNK] (-1 where a row was not active), their
        log-probabilities [B, CHUNK], the top TOP_LOGPROBS alternatives ([B, CHUNK, K] ids and log-probs), state)."""
        b, chunk = self.max_batch, self.CHUNK
        slot = jnp.arange(self.length)
        keys = jax.random.wrap_key_data(s["keys"])
        sample = jax.vmap(_sample_row)

        def body(i, carry):
            cache, logits, index, t, active, out = carry
            token = sample(logits, keys, t, s["temperature"], s["top_k"], s["top_p"], s["min_p"])
            logp = jax.nn.log_softmax(logits[:, : self.cfg.vocab_size], axis=-1)
            top_lp, top_id = jax.lax.top_k(logp, TOP_LOGPROBS)
            chosen = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
            out = (out[0].at[:, i].set(jnp.where(active, token, -1)), out[1].at[:, i].set(chosen),
                   out[2].at[:, i].set(top_id), out[3].at[:, i].set(top_lp))
            mask = (slot[None, :] <= index[:, None]) & (slot[None, :] >= s["pad"][:, None])
            new, cache = self.generator._step(params, jnp.where(active, token, 0), index - s["pad"],
                                              mask[:, None, None, :], cache, jnp.minimum(index, self.length - 1))
            index, t = index + active, t + active
            ended = (t >= s["limit"]) | (index - s["pad"] >= self.cfg.block_size)  # the context is full
            if self.eot is not None:
                ended = ended | (token == self.eot)
            return cache, new, index, t, active & ~ended, out

        out = (jnp.full((b, chunk), -1, jnp.int32), jnp.zeros((b, chunk)), jnp.zeros((b, chunk, TOP_LOGPROBS), jnp.int32),
               jnp.zeros((b, chunk, TOP_LOGPROBS)))
        cache, logits, index, t, active, out = jax.lax.fori_loop(
            0, chunk, body, (cache, logits, s["index"], s["t"], s["active"], out))
        return cache, logits, out, index, t, active

    # -- the engine thread --------------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compile every prefill bucket and the decode chunk now, not at the first requests; returns seconds."""
        t0 = time.perf_counter()
        lengths = sorted({min(bucket(n), self.cfg.block_size) for n in range(1, self.cfg.block_size + 1)})
        for length in lengths:
            logits, row = self.generator._prefill(self.params, np.zeros((1, length), np.int32),
                                                  np.zeros(1, np.int32), cache_len=self.length)
        self.cache, self.logits = self._insert(self.cache, self.logits, row, logits, 0)
        self.cache, self.logits, *_ = self._decode(self.params, self.cache, self.logits, self.state)
        jax.block_until_ready(self.logits)
        return time.perf_counter() - t0

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def submit(self, requests: list[Request]) -> None:
        """Queue requests, all or none: queue.Full when they do not fit beside those already waiting (the caller
        answers 429)."""
        with self._submit_lock:
            if self.waiting.qsize() + len(requests) > self.max_queue:
                raise queue.Full
            for request in requests:
                self.waiting.put_nowait(request)
        self._wake.set()

    def counts(self) -> dict:
        return {"active": sum(r is not None for r in self.slots), "queued": self.waiting.qsize(),
                "max_batch": self.max_batch, "alive": self._thread.is_alive() or not self._started}

    def swap_params(self, params, on_swap: Callable[[], None] = lambda: None) -> None:
        """New parameters, taken when no request is decoding (requests in flight finish on the old ones; new
        ones wait meanwhile); on_swap() runs when they are."""
        self.pending_params, self.on_swap = params, on_swap
        self._wake.set()

    def _admit(self) -> None:
        for slot in range(self.max_batch):
            while self.slots[slot] is None and self.pending_params is None:
                try:
                    request = self.waiting.get_nowait()
                except queue.Empty:
                    return
                if request.cancelled.is_set():
                    continue
                try:
                    self._prefill_into(slot, request)
                except Exception as e:  # this request fails alone; the engine and the others go on
                    self._fail(request, e)

    def _prefill_into(self, slot: int, request: Request) -> None:
        tokens, pad = self.generator._pad([request.prompt])
        logits, row = self.generator._prefill(self.params, tokens, pad, cache_len=self.length)
        self.cache, self.logits = self._insert(self.cache, self.logits, row, logits, slot)
        key = np.asarray(jax.random.key_data(jax.random.key(request.seed)))
        s = self.state
        s["index"][slot], s["pad"][slot], s["t"][slot] = tokens.shape[1], pad[0], 0
        s["limit"][slot], s["active"][slot], s["keys"][slot] = request.max_tokens, True, key
        s["temperature"][slot], s["top_k"][slot] = request.temperature, request.top_k
        s["top_p"][slot], s["min_p"][slot] = request.top_p, request.min_p
        self.slots[slot] = request

    def _fail(self, request: Request, error: Exception) -> None:
        self.log(f"warning: a request failed ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})")
        request.finish = "error"
        try:
            request.emit(request)
        except Exception:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                if self.pending_params is not None and not any(self.slots):  # drained: take the new parameters
                    self.params = self.generator.params = self.pending_params
                    self.pending_params = None
                    self.on_swap()
                self._admit()
                busy = any(self.slots)
                if busy:
                    try:
                        self._chunk()
                    except Exception as e:  # the compiled step itself failed: fail what is in flight, go on
                        for slot, request in enumerate(self.slots):
                            if request is not None:
                                self._fail(request, e)
                                self.slots[slot], self.state["active"][slot] = None, False
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _chunk(self) -> None:
        s = self.state
        self.cache, self.logits, out, index, t, active = self._decode(self.params, self.cache, self.logits, s)
        (tokens, chosen, top_id, top_lp), index, t, active = jax.device_get((out, index, t, active))
        s["index"], s["t"], s["active"] = np.array(index), np.array(t), np.array(active)
        for slot, request in enumerate(self.slots):
            if request is None:
                continue
            n = int((tokens[slot] >= 0).sum())
            request.tokens += tokens[slot, :n].tolist()
            if request.logprobs >= 0:
                request.steps += [(int(tokens[slot, i]), float(chosen[slot, i]),
                                   list(zip(top_id[slot, i].tolist(), top_lp[slot, i].tolist()))) for i in range(n)]
            try:
                keep = request.stop(request.tokens)
            except Exception as e:
                self._fail(request, e)
                self.slots[slot], s["active"][slot] = None, False
                continue
            if keep is not None:
                request.tokens, request.steps, request.finish = request.tokens[:keep], request.steps[:keep], "stop"
            elif self.eot is not None and request.tokens and request.tokens[-1] == self.eot:
                request.finish = "stop"
            elif not s["active"][slot]:
                request.finish = "length"
            if request.cancelled.is_set():
                request.finish = request.finish or "cancelled"
            try:
                request.emit(request)
            except Exception as e:  # a client's callback must not stop the engine
                self.log(f"warning: a request's callback failed ({type(e).__name__}: {e}); it is dropped")
                request.finish = "cancelled"
            if request.finish is not None:
                s["active"][slot] = False
                self.slots[slot] = None
