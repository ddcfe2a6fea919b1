"""Continuous batching: one KV cache of max_batch slots that requests join and leave at chunk boundaries.

Waiting requests take the free slots, those whose prompts share a bucket length prefilled together (sample.py's
prefill, the caches written into their slots); then the slots in use decode CHUNK tokens per jitted call, each
at its own cache position (the model writes a [B] vector of cache indices). A call reads only the rows up to
the last slot in use and the cache slots the requests in flight can reach, rounded up to powers of two: its
cost follows the requests, not the cache's size (a whole context per slot). Between chunks the engine thread
hands each request its new tokens, ends those at end-of-text, their max_tokens, a stop string or a
disconnected client, and fills the freed slots from the queue: a finished request never waits for the others.
Each row samples with its own key (the request's seed, folded with the row's own token count) and its own
rules, computed as for one row alone, so a request's output does not depend on which requests share its
batch, and equals sample.py's for the same seed and knobs (up to float rounding, which can differ between
batch shapes and so, rarely, flip a near-tie).
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
from jax.sharding import NamedSharding, PartitionSpec

from gpt.exits import one_line
from gpt.logits import filter_logits, min_p_filter
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
    stop: Callable[[list[int]], int | None] | None = None  # sampling.stop_rule: tokens to keep at a stop string
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    steps: list = field(default_factory=list)
    finish: str | None = None


def sample_rows(logits_BV, keys_B, t_B, s: dict, active_B):
    """Each row's next token exactly as Generator samples a batch of one with that row's rules and the key
    fold_in(key, t). A filter runs (under a batch-wide lax.cond: vmapped, a per-row cond would compute both
    branches for every row) only when an active row asks for it; on the rows that did not, it changes nothing."""
    temperature, top_k, top_p, min_p = s["temperature"], s["top_k"], s["top_p"], s["min_p"]
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sample(logits_BV):
        filtered_BV = jax.lax.cond(
            jnp.any(active_B & ((top_k > 0) | (top_p < 1))),
            lambda l: jax.vmap(filter_logits)(l, temperature, top_k, top_p),
            lambda l: l / jnp.maximum(temperature, 1e-6)[:, None], logits_BV)
        filtered_BV = jax.lax.cond(jnp.any(active_B & (min_p > 0)), jax.vmap(min_p_filter),
                                   lambda l, _: l, filtered_BV, min_p)
        step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, t_B)
        return jax.vmap(lambda k, l: jax.random.categorical(k, l[None])[0].astype(jnp.int32))(step_keys_B, filtered_BV)

    sampled_B = jax.lax.cond(jnp.any(active_B & (temperature > 0)), sample, lambda _: greedy_B, logits_BV)
    return jnp.where(temperature == 0, greedy_B, sampled_B)


def power_of_two(n: int) -> int:
    """The least power of two >= n."""
    return 1 << (n - 1).bit_length()


def window(cache, rows: int, span: int, batch_axis: int):
    """The first `rows` rows and `span` sequence slots of every cache array (the sequence axis follows the batch
    and head axes)."""
    def cut(c):
        limits = list(c.shape)
        limits[batch_axis], limits[batch_axis + 2] = rows, span
        return jax.lax.slice(c, (0,) * c.ndim, limits)

    return jax.tree.map(cut, cache)


def put(cache, part):
    """part written into the corner of cache where window() took it from."""
    return jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice(c, p, (0,) * c.ndim), cache, part)


class Engine:
    """The decode batch and the thread that runs it; submit() from any thread."""

    CHUNK = 8  # tokens per decode call: how often requests can join, leave and stream
    MIN_SPAN = 64  # below this many cache slots, attention costs little beside reading the weights

    def __init__(self, cfg, params, eot: int | None, max_batch: int, max_queue: int, log=print):
        self.cfg, self.eot, self.max_batch, self.log = cfg, eot, max_batch, log
        self.generator = Generator(cfg, None, eot)  # its pure prefill and step; the parameters live here
        self.params = params
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: queue.Queue = queue.Queue()
        self.max_queue = max_queue
        self._submit_lock = threading.Lock()
        self.lock = threading.Lock()  # held while a chunk runs: reload swaps parameters between chunks
        self._pending = None  # (parameters, on_swap) to take once no request is decoding
        self._pending_lock = threading.Lock()
        # A slot holds a whole context plus the most left-padding a prompt bucket adds (under half a context), so
        # a prompt of n tokens has room for block_size - n new ones, as in sample.py.
        self.length = cfg.block_size + max(min(bucket(n), cfg.block_size) - n for n in range(1, cfg.block_size + 1))
        b = max_batch
        # The cache and logits live replicated on the parameters' devices (a sharded model runs its step there).
        sharding = jax.tree.leaves(params)[0].sharding
        self.replicated = NamedSharding(sharding.mesh, PartitionSpec()) if hasattr(sharding, "mesh") else sharding
        self._fresh = jax.jit(lambda: (init_cache(cfg, b, self.length), jnp.zeros((b, cfg.padded_vocab_size))),
                              out_shardings=self.replicated)
        self.cache, self.logits = self._fresh()
        self.state = {"index": np.zeros(b, np.int32), "pad": np.zeros(b, np.int32), "t": np.zeros(b, np.int32),
                      "limit": np.zeros(b, np.int32), "active": np.zeros(b, bool), "logprobs": np.zeros(b, bool),
                      "keys": np.zeros((b, *jax.random.key_data(jax.random.key(0)).shape), np.uint32),
                      "temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32),
                      "top_p": np.ones(b, np.float32), "min_p": np.zeros(b, np.float32)}
        self.batch_axis = self.generator.batch_axis
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1, 2), out_shardings=self.replicated)
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2), static_argnames=("rows", "span"),
                               out_shardings=self.replicated)
        # Compiled calls by shape: ("prefill", prompts, bucket length) and ("decode", rows, span).
        self.compiled: dict[tuple[str, int, int], Callable] = {}
        self._to_compile: queue.Queue = queue.Queue()  # shapes wanted and not compiled yet
        self._asked: set[tuple[str, int, int]] = set()
        self._compiled_lock = threading.Lock()
        self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      (params, self.cache, self.logits))
        self._compiler = threading.Thread(target=self._compile_wanted, daemon=True, name="decode-compiler")
        self._thread = threading.Thread(target=self._run, daemon=True, name="decode-engine")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._started = False

    # -- compiled pieces --------------------------------------------------------------------------------------
    def _prefill_fn(self, params, cache, logits, tokens, pad, slots):
        """Prompts tokens [n, L] (left-padded by pad [n]) prefilled together, as sample.py does; each one's cache
        (its first L slots) and last logits written into its slot (a slot past the batch is dropped: a row that
        only pads n to a compiled size)."""
        length = tokens.shape[1]
        new_logits, new_cache = self.generator._prefill_fn(params, tokens, pad, cache_len=length)
        at = (slice(None),) * self.batch_axis + (slots, slice(None), slice(0, length))
        cache = jax.tree.map(lambda c, new: c.at[at].set(new, mode="drop"), cache, new_cache)
        return cache, logits.at[slots].set(new_logits, mode="drop")

    def shape(self) -> tuple[int, int]:
        """The decode chunk's (rows, span) for the requests in flight: the slots up to the last one in use, and
        the cache slots the chunk can read, each rounded up to a power of two (spans to at least MIN_SPAN), so a
        few compiled shapes serve every mix of requests and a step costs what the requests in flight need, not
        what a full batch of whole contexts would."""
        s = self.state
        rows = min(power_of_two(max(i for i, r in enumerate(self.slots) if r is not None) + 1), self.max_batch)
        reach = int(s["index"][:rows][s["active"][:rows]].max(initial=0)) + self.CHUNK
        return rows, min(max(power_of_two(reach), self.MIN_SPAN), self.length)

    def _decode_fn(self, params, cache, logits, s: dict, rows: int, span: int):
        """CHUNK steps for slots 0 .. rows - 1 over cache slots 0 .. span - 1 (s holds those rows' state):
        (cache, logits, tokens [rows, CHUNK] (-1 where a row was not active), their log-probabilities, the top
        TOP_LOGPROBS alternatives ([rows, CHUNK, K] ids and log-probs), index, t, active). The log-probabilities
        are computed only when an active row asks for them."""
        chunk, vocab = self.CHUNK, self.cfg.vocab_size
        slot = jnp.arange(span)
        keys = jax.random.wrap_key_data(s["keys"])

        def logprobs(logits, token):
            logp = jax.nn.log_softmax(logits[:, :vocab], axis=-1)
            top_lp, top_id = jax.lax.top_k(logp, TOP_LOGPROBS)
            return jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0], top_id, top_lp

        def body(i, carry):
            cache, logits, index, t, active, out = carry
            token = sample_rows(logits, keys, t, s, active)
            chosen, top_id, top_lp = jax.lax.cond(
                jnp.any(active & s["logprobs"]), logprobs,
                lambda *_: (jnp.zeros(rows), jnp.zeros((rows, TOP_LOGPROBS), jnp.int32),
                            jnp.zeros((rows, TOP_LOGPROBS))),
                logits, token)
            out = (out[0].at[:, i].set(jnp.where(active, token, -1)), out[1].at[:, i].set(chosen),
                   out[2].at[:, i].set(top_id), out[3].at[:, i].set(top_lp))
            mask = (slot[None, :] <= index[:, None]) & (slot[None, :] >= s["pad"][:, None])
            new, cache = self.generator._step(params, jnp.where(active, token, 0), index - s["pad"],
                                              mask[:, None, None, :], cache, jnp.minimum(index, span - 1))
            index, t = index + active, t + active
            ended = (t >= s["limit"]) | (index - s["pad"] >= self.cfg.block_size)  # the context is full
            if self.eot is not None:
                ended = ended | (token == self.eot)
            return cache, new, index, t, active & ~ended, out

        out = (jnp.full((rows, chunk), -1, jnp.int32), jnp.zeros((rows, chunk)),
               jnp.zeros((rows, chunk, TOP_LOGPROBS), jnp.int32), jnp.zeros((rows, chunk, TOP_LOGPROBS)))
        part, new, index, t, active, out = jax.lax.fori_loop(
            0, chunk, body, (window(cache, rows, span, self.batch_axis), logits[:rows], s["index"], s["t"],
                             s["active"], out))
        return put(cache, part), logits.at[:rows].set(new), out, index, t, active

    # -- compiling ---------------------------------------------------------------------------------------------
    def shapes(self) -> list[tuple[str, int, int]]:
        """Every shape the prefill and the decode chunk can take."""
        rows = sorted({min(power_of_two(n), self.max_batch) for n in range(1, self.max_batch + 1)})
        lengths = sorted({min(bucket(n), self.cfg.block_size) for n in range(1, self.cfg.block_size + 1)})
        spans = sorted({min(max(power_of_two(n), self.MIN_SPAN), self.length) for n in range(1, self.length + 1)})
        return [("prefill", r, n) for r in rows for n in lengths] + [("decode", r, s) for r in rows for s in spans]

    def warm_up(self, shapes: list[tuple[str, int, int]] | None = None) -> float:
        """Compile the given shapes (by default the prefill of one prompt at every bucket length and the largest
        decode chunk, which together serve any mix of requests) now, not at the first requests; returns seconds.
        Once serving, a shape that is wanted and not compiled yet is compiled in the background while those
        compiled serve (the decode chunk at the cheapest shape that covers it, prompts prefilled one by one)."""
        t0 = time.perf_counter()
        lengths = sorted({min(bucket(n), self.cfg.block_size) for n in range(1, self.cfg.block_size + 1)})
        for shape in shapes or [("prefill", 1, n) for n in lengths] + [("decode", self.max_batch, self.length)]:
            self._compile(shape)
        return time.perf_counter() - t0

    @staticmethod
    def describe(shape: tuple[str, int, int]) -> str:
        kind, rows, n = shape
        return f"the prefill of {rows} prompts of {n} tokens" if kind == "prefill" else \
            f"the decode chunk for {rows} rows over {n} cache slots"

    def _compile(self, shape: tuple[str, int, int]) -> float:
        """Compile a call from the arrays' shapes (the engine thread may be using the arrays themselves);
        returns seconds."""
        t0 = time.perf_counter()
        kind, rows, n = shape
        params, cache, logits = self._abstract
        arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated)
        if kind == "prefill":
            lowered = self._prefill.lower(params, cache, logits, arg((rows, n), np.int32), arg((rows,), np.int32),
                                          arg((rows,), np.int32))
        else:
            state = {k: arg((rows, *v.shape[1:]), v.dtype) for k, v in self.state.items()}
            lowered = self._decode.lower(params, cache, logits, state, rows=rows, span=n)
        compiled = lowered.compile()
        with self._compiled_lock:
            self.compiled[shape] = compiled
        return time.perf_counter() - t0

    def _compile_wanted(self) -> None:
        """The background compiler: each wanted shape, once."""
        while (shape := self._to_compile.get()) is not None:  # None: the engine is closing
            if shape in self.compiled:  # the engine thread needed it first
                continue
            try:
                self.log(f"compiled {self.describe(shape)} in {self._compile(shape):.1f}s")
            except Exception as e:  # what is compiled goes on serving
                self.log(f"warning: compiling {self.describe(shape)} failed ({one_line(e)})")

    def _want(self, shape: tuple[str, int, int]) -> bool:
        """Whether shape is compiled; if not, it is asked of the background compiler (once)."""
        if shape in self.compiled:
            return True
        if shape not in self._asked:
            self._asked.add(shape)
            self._to_compile.put(shape)
        return False

    def _executable(self, shape: tuple[str, int, int]) -> Callable:
        """The compiled call of shape; compiled now if it is not (warm_up was not run)."""
        with self._compiled_lock:
            call = self.compiled.get(shape)
        if call is None:
            self.log(f"compiling {self.describe(shape)}")
            self._compile(shape)
            call = self.compiled[shape]
        return call

    def _run_decode(self, rows: int, span: int):
        """One chunk at the cheapest compiled shape covering (rows, span) (that one itself, compiled now, if
        none does)."""
        with self._compiled_lock:
            covering = [(r, s) for kind, r, s in self.compiled if kind == "decode" and r >= rows and s >= span]
        if covering and not self._want(("decode", rows, span)):
            rows, span = min(covering, key=lambda shape: (shape[0] * shape[1], shape))
        s = {k: v[:rows] for k, v in self.state.items()}
        self.cache, self.logits, out, index, t, active = self._executable(("decode", rows, span))(
            self.params, self.cache, self.logits, s)
        return rows, out, index, t, active

    # -- the engine thread --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        self._thread.start()
        self._compiler.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._started:
            self._thread.join()
        self._to_compile.put(None)
        if self._compiler.is_alive():
            self._compiler.join()

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
        ones wait meanwhile); on_swap() runs (on the engine thread) when they are. A later call replaces an
        earlier one not taken yet."""
        with self._pending_lock:
            self._pending = (params, on_swap)
        self._wake.set()

    def _take_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        self.params = pending[0]
        try:
            pending[1]()
        except Exception as e:
            self.log(f"warning: the parameter swap's callback failed ({type(e).__name__}: {e})")

    def _admit(self) -> None:
        """Fill the free slots from the queue, the prompts of one bucket length prefilled together."""
        free = [slot for slot, request in enumerate(self.slots) if request is None]
        taken = []
        while len(taken) < len(free) and self._pending is None:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set() or request.max_tokens <= 0:
                request.finish = "cancelled" if request.cancelled.is_set() else "length"
                self._emit(request)
                continue
            taken.append(request)
        groups: dict[int, list[Request]] = {}
        for request in taken:
            groups.setdefault(min(bucket(len(request.prompt)), self.cfg.block_size), []).append(request)
        for length, group in groups.items():
            rows = min(power_of_two(len(group)), self.max_batch)
            together = rows == 1 or self._want(("prefill", rows, length))  # (one prompt: compiled now if need be)
            for batch in [group] if together else [[request] for request in group]:
                slots, free = free[: len(batch)], free[len(batch):]
                try:
                    self._prefill_into(slots, batch, length)
                except Exception as e:  # these requests fail alone; the engine and the others go on
                    for request in batch:
                        self._fail(request, e)
                    self._recover(e)

    def _prefill_into(self, slots: list[int], batch: list[Request], length: int) -> None:
        rows = min(power_of_two(len(batch)), self.max_batch)
        tokens, pad = self.generator._pad([request.prompt for request in batch] + [[0]] * (rows - len(batch)))
        targets = np.array(slots + [self.max_batch] * (rows - len(batch)), np.int32)
        keys = [np.asarray(jax.random.key_data(jax.random.key(request.seed))) for request in batch]
        self.cache, self.logits = self._executable(("prefill", rows, length))(self.params, self.cache, self.logits,
                                                                              tokens, pad, targets)
        s = self.state
        for row, (slot, request, key) in enumerate(zip(slots, batch, keys)):
            s["index"][slot], s["pad"][slot], s["t"][slot] = length, pad[row], 0
            s["limit"][slot], s["active"][slot], s["keys"][slot] = request.max_tokens, True, key
            s["temperature"][slot], s["top_k"][slot] = request.temperature, request.top_k
            s["top_p"][slot], s["min_p"][slot] = request.top_p, request.min_p
            s["logprobs"][slot] = request.logprobs >= 0
            self.slots[slot] = request

    def _emit(self, request: Request) -> None:
        try:
            request.emit(request)
        except Exception as e:  # a client's callback must not stop the engine
            self.log(f"warning: a request's callback failed ({type(e).__name__}: {e}); it is dropped")
            request.finish = request.finish or "cancelled"

    def _fail(self, request: Request, error: Exception) -> None:
        self.log(f"warning: a request failed ({one_line(error)})")
        request.finish = "error"
        self._emit(request)

    def _recover(self, error: Exception, always: bool = False) -> None:
        """After a call failed: if it had consumed the donated cache (or always), fail the requests in flight
        and start from a fresh cache, so the engine goes on serving new ones."""
        if not always and not any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.logits))):
            return
        for slot, request in enumerate(self.slots):
            if request is not None:
                self._fail(request, error)
                self.slots[slot] = None
        self.state["active"][:] = False
        self.cache, self.logits = self._fresh()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            with self.lock:
                try:
                    if self._pending is not None and not any(self.slots):  # drained: take the new parameters
                        self._take_pending()
                    self._admit()
                    busy = any(self.slots)
                    if busy:
                        self._chunk()
                except Exception as e:  # a compiled call failed (out of memory, say): fail what is in flight,
                    self._recover(e, always=True)  # start from a fresh cache, go on serving
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _chunk(self) -> None:
        s = self.state
        rows, *out = self._run_decode(*self.shape())
        (tokens, chosen, top_id, top_lp), index, t, active = jax.device_get(out)
        s["index"][:rows], s["t"][:rows], s["active"][:rows] = index, t, active
        for slot, request in enumerate(self.slots):
            if request is None:
                continue
            n = int((tokens[slot] >= 0).sum())
            request.tokens += tokens[slot, :n].tolist()
            if request.logprobs >= 0:
                request.steps += [(int(tokens[slot, i]), float(chosen[slot, i]),
                                   list(zip(top_id[slot, i].tolist(), top_lp[slot, i].tolist()))) for i in range(n)]
            try:
                keep = request.stop(request.tokens) if request.stop else None
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
            self._emit(request)
            if request.finish is not None:
                s["active"][slot] = False
                self.slots[slot] = None
