"""The deterministic batch source: prepared corpora read as token sequences, walked epoch by epoch, mixed by weight.

Every batch is a pure function of (seed, stream, step), so a resumed run, or a run on another mesh or process
count, sees exactly the batches the uninterrupted single-device run would have seen, with no data state to
checkpoint beyond the step. Each process reads only the rows its devices hold.

Epochs: a split of N tokens holds W = (N - 1) // block_size windows, window w being tokens [w * block_size,
(w + 1) * block_size] (inputs and their next-token targets: each window's last target is the next one's first
input, so every token is a target once per epoch). Sample i of a stream is window perm_e(i mod W) of epoch
e = i // W, perm_e a permutation keyed by (seed, stream, corpus, e): an epoch sees every window once.

Mixtures: samples are dealt to the corpora in blocks of MIX_BLOCK, each block holding a fixed count of every
corpus (its weight x MIX_BLOCK, rounded by largest remainders) in an order drawn from (seed, stream, block).
The proportions are exact per block, and which sample of its corpus a sample is follows in closed form.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpt import prepare, sharding
from gpt.config import Config, ConfigError, DataConfig
from gpt.prepare import load_meta

# Independent batch streams: training, and the fixed batches evaluation estimates each split's loss on.
STREAMS = {"train": 0, "eval_train": 1, "eval_val": 2}
_WINDOWS, _MIXTURE = 0, 1  # tags that keep the window orders' random keys apart from the mixture blocks'
MIX_BLOCK = 2048


class Tokens:
    """Token shard files read as one sequence (memory-mapped): tokens[int array] and tokens[a:b] as one array would."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0, *(len(s) for s in shards)])

    @classmethod
    def of(cls, directory: Path, split: str) -> "Tokens":
        meta = load_meta(directory)
        return cls([np.memmap(Path(directory) / name, dtype=meta["dtype"], mode="r")
                    for name, n in meta[f"{split}_shards"] if n])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index, np.int64)
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][index], np.int32)
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(index.shape, np.int32)
        for k in np.unique(shard):
            at = shard == k
            out[at] = self.shards[k][index[at] - self.starts[k]]
        return out


def get_batch(tokens, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, int32, for the given start offsets (any shape)."""
    index = offsets[..., None] + np.arange(block_size + 1)
    window = np.asarray(tokens[index.reshape(-1)], dtype=np.int32).reshape(index.shape)
    return window[..., :-1], window[..., 1:]


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit hash of each x under key (splitmix64's finaliser), wrapping as uint64 arithmetic does."""
    z = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Windows:
    """The windows of one split of one corpus for one stream, walked in a new order each epoch.

    The order is a keyed permutation computed per index, not stored: a 4-round Feistel network on [0, 4^h) (a
    bijection whatever its round function), walked again from any value that lands at or beyond n until it
    lands inside (cycle walking: a bijection on [0, n), fewer than 4 rounds of walking on average since
    4^h < 4n). So a corpus of a billion windows costs no memory and no pause at an epoch's start."""

    def __init__(self, n_tokens: int, block_size: int, seed: int, stream: str, corpus: int):
        self.n = (n_tokens - 1) // block_size
        if self.n < 1:
            raise ConfigError(f"block_size={block_size} needs more than {block_size} tokens, but the split holds "
                              f"{n_tokens}")
        self.block, self.key = block_size, (seed, STREAMS[stream], _WINDOWS, corpus)
        self.half_bits = np.uint64(max(1, -(-int(self.n - 1).bit_length() // 2)))

    def permute(self, epoch: int, position: np.ndarray) -> np.ndarray:
        """Window of each position (in [0, n)) of the epoch: a bijection of [0, n) for each epoch."""
        keys = np.random.SeedSequence([*self.key, epoch]).generate_state(4, np.uint64)
        mask = (np.uint64(1) << self.half_bits) - np.uint64(1)

        def feistel(x):
            left, right = x >> self.half_bits, x & mask
            for key in keys:
                left, right = right, left ^ (_mix(right, key) & mask)
            return (left << self.half_bits) | right

        y = feistel(np.asarray(position, np.uint64))
        while (outside := y >= np.uint64(self.n)).any():
            y[outside] = feistel(y[outside])
        return y.astype(np.int64)

    def offsets(self, sample: np.ndarray) -> np.ndarray:
        """Start offsets of the given samples (any shape) of this stream."""
        epoch, position = np.divmod(sample, self.n)
        out = np.empty(sample.shape, np.int64)
        for e in np.unique(epoch):
            at = epoch == e
            out[at] = self.permute(int(e), position[at]) * self.block
        return out


def mix_counts(weights: list[float]) -> np.ndarray:
    """Samples of each corpus per MIX_BLOCK: weight x MIX_BLOCK rounded by largest remainders (sums to MIX_BLOCK)."""
    exact = np.asarray(weights, np.float64) / sum(weights) * MIX_BLOCK
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: MIX_BLOCK - counts.sum()]] += 1
    if not counts.all():
        raise ConfigError(f"dataset weights {[round(w, 6) for w in weights]}: a weight below 1/{MIX_BLOCK} of the "
                          "total would never be drawn")
    return counts


class Mixture:
    """Which corpus, and which of that corpus's samples, each sample index of a stream is."""

    def __init__(self, weights: list[float], seed: int, stream: str):
        self.counts = mix_counts(weights)
        self.key = (seed, STREAMS[stream], _MIXTURE)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()  # the prefetch thread draws batches while the loop logs the position

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus of each position of block b, how many earlier positions of the block hold that corpus)."""
        with self._lock:
            if b in self._blocks:
                return self._blocks[b]
        labels = np.random.default_rng([*self.key, b]).permutation(np.repeat(np.arange(len(self.counts)),
                                                                             self.counts))
        rank = np.empty(MIX_BLOCK, np.int64)
        for k in range(len(self.counts)):
            rank[labels == k] = np.arange(self.counts[k])
        with self._lock:
            if len(self._blocks) >= 2:  # the blocks of one batch; a batch rarely spans more than two
                self._blocks.pop(min(self._blocks))
            self._blocks[b] = labels, rank
        return labels, rank

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, that corpus's sample number) of each sample index (any shape)."""
        if len(self.counts) == 1:
            return np.zeros_like(index), index
        block, position = np.divmod(index, MIX_BLOCK)
        corpus, sample = np.empty_like(index), np.empty_like(index)
        for b in np.unique(block):
            at = block == b
            labels, rank = self._block(int(b))
            corpus[at] = labels[position[at]]
            sample[at] = b * self.counts[corpus[at]] + rank[position[at]]
        return corpus, sample

    def consumed(self, n: int) -> np.ndarray:
        """Samples of each corpus among the first n of the stream."""
        if len(self.counts) == 1:
            return np.array([n])
        block, position = divmod(n, MIX_BLOCK)
        partial = np.bincount(self._block(block)[0][:position], minlength=len(self.counts)) if position else 0
        return block * self.counts + partial


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus of the dataset: its name in the spec, directory, mixture weight and meta.json."""
    name: str
    directory: Path
    weight: float
    meta: dict


def load_corpora(d: DataConfig, block_size: int, quiet: bool = False, build: bool = True) -> list[Corpus]:
    """Every corpus of the dataset spec prepared (or found; build=False: found, or a one-line error) and checked
    against the run."""
    return [Corpus(c.spec, directory, c.weight, prepare.validate(directory, d.tokenizer, block_size))
            for c, directory in prepare.prepare_all(d, quiet, build)]


def identity(corpora: list[Corpus]) -> list[dict]:
    """What a checkpoint records of its corpora, compared on resume: each one's identity and weight."""
    return [{**prepare.corpus_identity(c.meta), "weight": round(c.weight, 9)} for c in corpora]


class Batches:
    """Loads this process's rows of the global batch for any step, straight into a sharded global array."""

    def __init__(self, cfg: Config, corpora: list[Corpus], mesh):
        self.cfg, self.mesh, self.block = cfg, mesh, cfg.model.block_size
        self.names = [c.name for c in corpora]
        weights = [c.weight for c in corpora]
        seed = cfg.train.seed
        self.tokens, self.windows, self.mixtures = {}, {}, {}
        for stream, split in (("train", "train"), ("eval_train", "train"), ("eval_val", "val")):
            self.tokens[stream] = [Tokens.of(c.directory, split) for c in corpora]
            self.windows[stream] = [Windows(len(t), self.block, seed, stream, k)
                                    for k, t in enumerate(self.tokens[stream])]
            self.mixtures[stream] = Mixture(weights, seed, stream)

    def _load(self, stream: str, first: int, shape: tuple[int, ...]):
        leading = len(shape) - 1
        global_shape = (*shape, self.block)
        target = sharding.batch_sharding(self.mesh, leading)
        rows = sharding.process_rows(target, global_shape, axis=leading)
        index = (first + np.arange(int(np.prod(shape))).reshape(shape))[..., rows]
        corpus, sample = self.mixtures[stream].locate(index)
        x = np.empty((*index.shape, self.block), np.int32)
        y = np.empty_like(x)
        for k in np.unique(corpus):
            at = corpus == k
            x[at], y[at] = get_batch(self.tokens[stream][k], self.windows[stream][k].offsets(sample[at]), self.block)
        return tuple(sharding.global_batch(a, target, global_shape) for a in (x, y))

    @property
    def samples_per_step(self) -> int:
        return self.cfg.optim.gradient_accumulation_steps * self.cfg.data.batch_size

    def train(self, step: int):
        """[accumulation_steps, batch_size, block_size] inputs and targets of optimizer step `step`."""
        shape = (self.cfg.optim.gradient_accumulation_steps, self.cfg.data.batch_size)
        return self._load("train", step * self.samples_per_step, shape)

    def eval(self, split: str, i: int):
        """The i-th fixed evaluation batch of split ("train" or "val")."""
        return self._load(f"eval_{split}", i * self.cfg.data.batch_size, (self.cfg.data.batch_size,))

    def position(self, steps: int) -> dict:
        """Where training stands after `steps` optimizer steps: epochs of each corpus seen, and for a mixture
        the proportions drawn so far."""
        consumed = self.mixtures["train"].consumed(steps * self.samples_per_step)
        out = {"epoch": {name: round(float(c / w.n), 6)
                         for name, c, w in zip(self.names, consumed, self.windows["train"])}}
        if len(self.names) > 1:
            out["mix"] = {name: round(float(c / max(1, consumed.sum())), 6) for name, c in zip(self.names, consumed)}
        return out


class Prefetch:
    """The batches of steps start, start + 1, ... made by a background thread up to `depth` steps ahead of
    the loop, so reading and transferring the next batches overlap the current step (and the loop's own
    waits at log steps). `wait_s` is the time the loop spent waiting for a batch: > 0 means data-bound."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.wait_s = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(make, start, stop), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _produce(self, make, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, make(step), None)
            except Exception as e:  # raised in the loop, at the step that needed this batch
                item = (step, None, e)
            while not self._closed.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None or self._closed.is_set():
                return

    def get(self, step: int):
        t0 = time.perf_counter()
        made_for, batch, error = self.queue.get()
        self.wait_s += time.perf_counter() - t0
        if error is not None:
            raise error
        if made_for != step:
            raise RuntimeError(f"prefetch made the batch of step {made_for}, but step {step} asked for it")
        return batch

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
