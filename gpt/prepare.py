"""Corpus preparation: documents -> token shards + meta.json, once per distinct input.

    python -m gpt.cli prepare [--dataset=SPEC] [--tokenizer=byte|gpt2] [--data_dir=data] [--num_proc=N]

The main process reads documents (gpt/sources.py) and hands chunks of about CHUNK_CHARS characters to
`num_proc` worker processes, which tokenize them; their results come back in order and are appended to
`train-NNNNN.bin` / `val-NNNNN.bin` shard files of at most `shard_mb` MB. At most 2 x num_proc chunks are in
flight, so memory stays a few documents deep whatever the corpus size.

Every document ends with a separator the model learns boundaries from: GPT-2's <|endoftext|> (50256), or for
the byte tokenizer (which has no spare id) a blank line. Every VAL_EVERY-th document (the 10th, 20th, ...) goes
to the validation split whole; a corpus of fewer documents than that has none to spare, and its validation
split is the last 10% of its tokens instead (meta.json's `split` says which rule applied).

The cache cannot lie: the directory is named by a hash of what went in (each file's path, size and
modification time, or a built-in corpus's package version; the tokenizer; text_field; the split rule; the
format version), so a changed source prepares anew and two corpora never share a directory. Everything is
written into a temporary directory and renamed into place: an interrupted preparation leaves nothing.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from gpt import sources
from gpt.config import ConfigError, DataConfig
from gpt.tokenizer import get_tokenizer, token_dtype

FORMAT = 2  # meta.json's layout and the split rule; a corpus of another format is prepared again
VAL_EVERY = 10
VAL_FRACTION = 0.1
CHUNK_CHARS = 1 << 20


class PrepareError(Exception):
    """Preparing a corpus failed (an OS error, a worker process that died); the message is one line, and nothing
    half-written is left."""


def num_workers(num_proc: int, tokenizer: str) -> int:
    """num_proc, or for 0: one per core this process may run on, but for the byte tokenizer one (its "tokenizing"
    is a copy of the UTF-8 bytes, faster than shipping them to a worker and back: bench/prepare.py measured 427
    MB/s in one process against 134 MB/s with 2 workers on 2 cores)."""
    if num_proc > 0:
        return num_proc
    if tokenizer == "byte":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def corpus_key(data: DataConfig, component: sources.Component) -> dict:
    """Everything the prepared tokens depend on (and nothing they do not, such as num_proc or shard_mb)."""
    return {"format": FORMAT, **sources.fingerprint(component), "tokenizer": data.tokenizer,
            "text_field": data.text_field, "val_every": VAL_EVERY}


def _label(component: sources.Component) -> str:
    """A readable prefix for the directory: the built-in name, or the first source's file or folder name."""
    first = component.sources[0]
    name = first if first in sources.BUILTIN_CORPORA else Path(re.split(r"[*?[]", first)[0] or ".").resolve().name
    return re.sub(r"[^\w.-]", "_", name.split(".")[0]) or "corpus"


def already_prepared(component: sources.Component) -> Path | None:
    """The directory a component names when it is a prepared corpus (it holds meta.json): used as it is, so a
    copied data_dir trains without its raw files."""
    if len(component.sources) == 1 and (Path(component.sources[0]) / "meta.json").is_file():
        return Path(component.sources[0])
    return None


def corpus_dir(data: DataConfig, component: sources.Component, key: dict | None = None) -> Path:
    if found := already_prepared(component):
        return found
    key = corpus_key(data, component) if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data.data_dir) / f"{_label(component)}-{data.tokenizer}-{digest}"


def prepare_all(data: DataConfig, quiet: bool = False, build: bool = True) -> list[tuple[sources.Component, Path]]:
    """Every corpus of the dataset spec, prepared (or found; with build=False only found, or a one-line error):
    [(component, directory)]."""
    return [(c, prepare(data, c, quiet) if build else prepared(data, c)) for c in sources.parse_dataset(data.dataset)]


def prepared(data: DataConfig, component: sources.Component) -> Path:
    """The corpus's directory, which must hold a prepared corpus already (scoring a run tokenizes nothing)."""
    directory = corpus_dir(data, component)
    if not (directory / "meta.json").is_file():
        raise ConfigError(f"the run's corpus is not prepared at {directory}: prepare it with python -m gpt.cli "
                          f"prepare --dataset={data.dataset} --tokenizer={data.tokenizer} --data_dir={data.data_dir} "
                          "(a relative data_dir is read from the current directory)")
    return directory


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on the file `path` (created if need be, removed after): the processes of one job
    that all prepare the same corpus take turns, and the later ones find it prepared. (One that opened the file
    just as it was removed locks a file no one else holds; it then re-checks, finds the corpus prepared, or
    prepares it again and loses the race to rename, which prepare handles.)"""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(data: DataConfig, component: sources.Component | None = None, quiet: bool = False) -> Path:
    """Tokenize one corpus (the dataset's only one by default); a later call finds meta.json and returns at once."""
    if component is None:
        (component,) = sources.parse_dataset(data.dataset)
    out, key = _locate(data, component)
    if (out / "meta.json").is_file():
        return out
    with _exclusive(out.parent / f".{out.name}.lock"):
        if not (out / "meta.json").is_file():  # (another process may have prepared it while we waited)
            _prepare_into(out, data, component, key, quiet)
    return out


def _prepare_into(out: Path, data: DataConfig, component: sources.Component, key: dict, quiet: bool) -> None:
    """Tokenize the component into out (named after key, the sources as they were looked at)."""
    tok = get_tokenizer(data.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    _warn_if_short_of_space(key, out.parent, dtype.itemsize)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = _tokenize(data, component, tok, dtype, tmp, sources.text_bytes(key["sources"]), quiet)
        meta.update(source=component.spec, key=key)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; a shared data_dir is read by others
        if out.exists() and not (out / "meta.json").is_file():  # debris of something else: it holds no corpus
            shutil.rmtree(out)
        os.rename(tmp, out)  # atomic: readers see either no corpus or a whole one
    except BaseException as e:  # whatever stopped it (Ctrl-C included), nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (out / "meta.json").is_file():
            return  # a process the lock does not reach (on another host) prepared it first: use that one
        if isinstance(e, OSError):  # a full disk, a vanished directory: say so
            raise PrepareError(f"preparing dataset={component.spec!r} into {out} failed: {e.strerror or e}"
                               f"{f' ({e.filename})' if e.filename else ''}; nothing was kept") from None
        if isinstance(e, BrokenProcessPool):  # a worker died (the OOM killer, a signal)
            raise PrepareError(f"preparing dataset={component.spec!r}: a tokenizer worker process died ({e}); "
                               "nothing was kept; try fewer --num_proc") from None
        raise
    if not quiet:
        skipped = f", {meta['bad_records']} bad records skipped" if meta["bad_records"] else ""
        print(f"prepared {out}: {meta['documents']:,} documents, {meta['train_tokens']:,} train / "
              f"{meta['val_tokens']:,} val tokens{skipped}", file=sys.stderr)


def check_preparable(data: DataConfig, component: sources.Component) -> Path:
    """The corpus's directory, if it is prepared or data_dir can be written (it is created if need be); else one
    line saying why not."""
    return _locate(data, component)[0]


def _locate(data: DataConfig, component: sources.Component) -> tuple[Path, dict]:
    """check_preparable's directory, and the key it is named after (the sources looked at once)."""
    if found := already_prepared(component):
        return found, {}
    key = corpus_key(data, component)
    out = corpus_dir(data, component, key)
    if (out / "meta.json").is_file():
        return out, key
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data_dir={data.data_dir!r}: cannot create that directory ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"data_dir={data.data_dir!r} is read-only and holds no corpus prepared from "
                          f"{component.spec!r} as it is now ({_why_missing(data, component, key)}); prepare it "
                          "where data_dir can be written")
    return out, key


class _ShardWriter:
    """Appends tokens to NAME-00000.bin, NAME-00001.bin, ... of at most shard_tokens each."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.name, self.dtype, self.shard_tokens = directory, name, dtype, shard_tokens
        self.shards: list[list] = []  # [file name, tokens in it]
        self.fh = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.fh is None or self.shards[-1][1] == self.shard_tokens:
                self.close()
                self.shards.append([f"{self.name}-{len(self.shards):05d}.bin", 0])
                self.fh = open(self.directory / self.shards[-1][0], "wb")
            part, ids = ids[: self.shard_tokens - self.shards[-1][1]], ids[self.shard_tokens - self.shards[-1][1]:]
            part.tofile(self.fh)
            self.shards[-1][1] += len(part)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards)


def _move_tail(train: _ShardWriter, val: _ShardWriter, n: int) -> None:
    """Move the last n tokens of train's shards to val (in order), a million at a time."""
    segments = []
    for shard in reversed(train.shards):
        take = min(n, shard[1])
        segments.append((shard, shard[1] - take))
        n -= take
        if n == 0:
            break
    for shard, start in reversed(segments):
        tokens = np.memmap(train.directory / shard[0], dtype=train.dtype, mode="r")
        for i in range(start, shard[1], 1 << 20):
            val.write(np.array(tokens[i: min(i + (1 << 20), shard[1])]))
        del tokens
        os.truncate(train.directory / shard[0], start * train.dtype.itemsize)
        shard[1] = start
    for shard in [s for s in train.shards if s[1] == 0]:
        (train.directory / shard[0]).unlink()
        train.shards.remove(shard)


def _encode(tokenizer: str, chunk: list[tuple[int, str, bool]]) -> list[tuple[int, np.ndarray, int]]:
    """A worker's job: [(document, text, ends it)] -> [(document, token ids, UTF-8 bytes of the text)]."""
    tok = get_tokenizer(tokenizer)
    out = []
    for doc, text, last in chunk:
        ids = tok.encode_array(text)
        n_bytes = len(ids) if tok.name == "byte" else len(text.encode("utf-8"))
        out.append((doc, tok.end_document(ids) if last else ids, n_bytes))
    return out


def _chunks(component: sources.Component, data: DataConfig, counts: dict) -> Iterator[list[tuple[int, str, bool]]]:
    """The corpus's pieces grouped into chunks of about CHUNK_CHARS; bad records stop the run or are counted."""
    chunk, size = [], 0
    for item in sources.documents(component, data.text_field):
        if isinstance(item, sources.BadRecord):
            if data.on_bad_record == "error":
                raise ConfigError(f"{item} (pass --on_bad_record=skip to skip such records)")
            counts["bad_records"] += 1
            counts.setdefault("first_bad_record", str(item))
            continue
        text, last = item
        counts["has_text"] = counts["has_text"] or (bool(text) and not text.isspace())
        chunk.append((counts["documents"], text, last))
        counts["documents"] += last
        size += len(text)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(chunks: Iterator[list], tokenizer: str, num_proc: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """The chunks tokenized, in order: in this process, or by num_proc workers with 2 x num_proc chunks in flight."""
    if num_proc == 1:
        for chunk in chunks:
            yield from _encode(tokenizer, chunk)
        return
    # spawn, not fork: forking a process that has started JAX's threads can deadlock. Workers ignore Ctrl-C: the
    # main process stops them (and says so once) instead of each printing a traceback.
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                             initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_encode, tokenizer, chunk))
            if len(pending) >= 2 * num_proc:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _tokenize(data: DataConfig, component: sources.Component, tok, dtype: np.dtype, tmp: Path,
              text_bytes: int | None, quiet: bool) -> dict:
    shard_tokens = max(1, int(data.shard_mb * 1e6) // dtype.itemsize)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    counts = {"documents": 0, "bad_records": 0, "has_text": False}
    max_token, text_bytes, t0 = 0, 0, time.perf_counter()
    workers = num_workers(data.num_proc, data.tokenizer)
    with tqdm(total=text_bytes, unit="B", unit_scale=True, disable=quiet,
              desc=f"tokenizing {component.spec} ({data.tokenizer}, {workers} process{'es' * (workers > 1)})") as bar:
        for doc, ids, n_bytes in _encoded(_chunks(component, data, counts), data.tokenizer, workers):
            split = "val" if doc % VAL_EVERY == VAL_EVERY - 1 else "train"
            writers[split].write(ids)
            max_token = max(max_token, int(ids.max(initial=0)))
            text_bytes += n_bytes
            bar.update(n_bytes)
            bar.set_postfix(documents=counts["documents"], refresh=False)
    for w in writers.values():
        w.close()
    if not counts["has_text"]:
        raise ConfigError(f"dataset={component.spec!r}: the corpus is empty")
    split_rule, val_documents = f"every {VAL_EVERY}th document", counts["documents"] // VAL_EVERY
    if not val_documents:  # no whole document to spare: cut the last 10% of the tokens
        _move_tail(writers["train"], writers["val"], max(1, int(writers["train"].tokens * VAL_FRACTION)))
        writers["val"].close()
        split_rule, val_documents = f"the last {VAL_FRACTION:.0%} of the tokens (fewer than {VAL_EVERY} documents)", 0
    seconds = time.perf_counter() - t0
    return {"format": FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": dtype.name,
            "documents": counts["documents"], "val_documents": val_documents,
            "bad_records": counts["bad_records"], "first_bad_record": counts.get("first_bad_record"),
            "split": split_rule, "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
            "max_token": max_token, "train_shards": writers["train"].shards, "val_shards": writers["val"].shards,
            "text_bytes": text_bytes, "seconds": round(seconds, 3), "num_proc": workers}


def _warn_if_short_of_space(key: dict, where: Path, token_bytes: int) -> None:
    """Warn when the disk holds less than the corpus could need: at most one token per byte of input."""
    need = sources.input_bytes(key["sources"]) * token_bytes
    free = shutil.disk_usage(where).free
    if free < need:
        print(f"warning: {where} has {free / 2**20:,.1f} MiB free; the prepared corpus may need up to "
              f"{need / 2**20:,.1f} MiB", file=sys.stderr)


def _why_missing(data: DataConfig, component: sources.Component, key: dict) -> str:
    """What differs from the corpus of the same name in data_dir that shares most of its sources: the reason it
    must be prepared anew."""
    name_of = lambda item: item.get("file", item.get("builtin"))
    now = {name_of(s): s for s in key["sources"]}
    found = []
    for meta_path in Path(data.data_dir).glob(f"{_label(component)}-{data.tokenizer}-*/meta.json"):
        old_key = json.loads(meta_path.read_text()).get("key", {})
        found.append((meta_path.parent.name, old_key, {name_of(s): s for s in old_key["sources"]}))
    if not found:
        return "nothing of that name was prepared there"
    name, old_key, before = max(sorted(found), key=lambda f: len(set(f[2]) & set(now)))
    for source in sorted(set(now) | set(before)):
        if source not in before:
            return f"{source} is new since {name}"
        if source not in now:
            return f"{source} was removed since {name}"
        if now[source] != before[source]:
            return f"{source} changed since {name} was prepared"
    return f"its settings differ from {name}'s"


def load_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def validate(directory: Path, tokenizer: str, block_size: int) -> dict:
    """Check a prepared corpus against the run before anything compiles; returns its meta."""
    meta = load_meta(directory)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory} was prepared in format {meta.get('format', 1)}, not {FORMAT}: prepare the "
                          "corpus again")
    if meta["tokenizer"] != tokenizer:
        raise ConfigError(f"{directory} was tokenized with {meta['tokenizer']}, but tokenizer={tokenizer}")
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        for name, n in meta[f"{split}_shards"]:
            path = Path(directory) / name
            size = path.stat().st_size if path.is_file() else 0
            if size != n * dtype.itemsize:
                raise ConfigError(f"{path} holds {size} bytes, not the {n} {dtype.name} tokens its meta.json "
                                  "describes: prepare the corpus again")
        if meta[f"{split}_tokens"] <= block_size:
            raise ConfigError(f"block_size={block_size} is not smaller than the {split} split "
                              f"({meta[f'{split}_tokens']} tokens of {directory})")
    if meta["max_token"] >= meta["vocab_size"]:
        raise ConfigError(f"{directory} holds token id {meta['max_token']}, outside the {tokenizer} vocabulary of "
                          f"{meta['vocab_size']}: the files are corrupt or from another tokenizer")
    return meta


def corpus_identity(meta: dict) -> dict:
    """What tells one prepared corpus from another: recorded in checkpoints, compared on resume."""
    return {k: meta.get(k) for k in ("source", "tokenizer", "documents", "train_tokens", "val_tokens")}
