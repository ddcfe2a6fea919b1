"""Corpus preparation: every format to the same tokens, worker processes and shards that change nothing, bad
records named by file and line, a cache keyed by what went in, and memory that stays bounded."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt import cli, data, prepare, sources
from gpt.config import ConfigError, DataConfig
from gpt.tokenizer import get_tokenizer
from tests.helpers import REPO

# Twelve documents (so the 10th goes to val whole), with what trips tokenizers up: newlines at the ends,
# blank lines inside, non-ASCII text, a document of one character.
DOCS = [f"Document {i}: Ünïcode ☕ {'lorem ipsum ' * (i + 1)}\n\nsecond paragraph {i}.\n" for i in range(11)] + ["x"]


def write_formats(root, docs=DOCS):
    """The same documents as a directory of .txt files, .jsonl, .jsonl.gz, .jsonl.zst and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (root / "txt").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (root / "txt" / f"{i:03d}.txt").write_text(doc)
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    (root / "docs.jsonl").write_text(lines)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": docs}), root / "docs.parquet", row_group_size=5)
    return ["txt", "docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet"]


def tokens_of(directory):
    return {split: data.Tokens.of(directory, split)[:] for split in ("train", "val")}


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_every_format_prepares_to_the_same_tokens(tmp_path, tokenizer):
    names = write_formats(tmp_path / "src")
    results = {}
    for name in names:
        d = DataConfig(dataset=str(tmp_path / "src" / name), tokenizer=tokenizer, data_dir=str(tmp_path / "data"),
                       num_proc=1)
        results[name] = tokens_of(prepare.prepare(d, quiet=True))
    reference = results["txt"]
    for name, got in results.items():
        for split in ("train", "val"):
            np.testing.assert_array_equal(got[split], reference[split], err_msg=f"{name} {split}")
    # What the tokens should be: each document, then its separator; the 10th document is the val split.
    tok = get_tokenizer(tokenizer)

    def encoded(doc):
        return (tok.encode(doc) + [tok.eot_token] if tok.eot_token is not None
                else tok.encode(doc.rstrip("\n") + "\n\n"))
    np.testing.assert_array_equal(reference["val"], encoded(DOCS[9]))
    np.testing.assert_array_equal(reference["train"], sum((encoded(d) for i, d in enumerate(DOCS) if i != 9), []))


def test_worker_processes_and_shards_change_no_token(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "ünï", "☕", "\n", "\n\n", "  "]
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(1, 400)))}) for _ in range(300)]
    (tmp_path / "src" / "a.jsonl").write_text("\n".join(lines))
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 2000)  # many chunks in flight between the workers
    out = {}
    for num_proc, shard_mb in ((1, 1000.0), (2, 1000.0), (2, 0.004)):
        d = DataConfig(dataset=str(tmp_path / "src"), tokenizer="gpt2", data_dir=str(tmp_path / f"d{num_proc}{shard_mb}"),
                       num_proc=num_proc, shard_mb=shard_mb)
        directory = prepare.prepare(d, quiet=True)
        out[num_proc, shard_mb] = directory
    one, two, sharded = (out[k] for k in ((1, 1000.0), (2, 1000.0), (2, 0.004)))
    for split in ("train", "val"):  # byte-identical files with 1 and 2 workers
        assert (one / f"{split}-00000.bin").read_bytes() == (two / f"{split}-00000.bin").read_bytes()
    meta = prepare.load_meta(sharded)
    assert len(meta["train_shards"]) > 3 and all(n <= 2000 for _, n in meta["train_shards"])  # 4 kB of uint16
    for split, tokens in tokens_of(one).items():
        np.testing.assert_array_equal(tokens_of(sharded)[split], tokens)


def test_a_large_txt_file_is_read_in_pieces_that_tokenize_as_the_whole(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    pieces = ["word", " word", "\n", "\n\n", " \n", "  ", "\t", "'s", "!!", "42", "é", "\r\n"]
    text = "".join(rng.choice(pieces, size=20_000))
    (tmp_path / "big.txt").write_text(text, newline="")
    monkeypatch.setattr(sources, "PIECE_CHARS", 500)
    read = list(sources.documents(sources.parse_dataset(str(tmp_path / "big.txt"))[0], "text"))
    assert len(read) > 20 and [last for _, last in read] == [False] * (len(read) - 1) + [True]
    whole = text.replace("\r\n", "\n")  # read as text files are: universal newlines
    assert "".join(piece for piece, _ in read) == whole
    tok = get_tokenizer("gpt2")
    assert sum((tok.encode(piece) for piece, _ in read), []) == tok.encode(whole)


def test_bad_records_are_named_by_file_and_line_or_counted_and_skipped(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    good = [json.dumps({"text": f"document {i} " * 20}) for i in range(10)]
    (src / "a.jsonl").write_text("\n".join(good[:5] + ['{"text": "unterminated'] + good[5:]) + "\n")
    (src / "b.jsonl").write_text("\n".join([json.dumps({"body": "no text field"}), *good]) + "\n")
    common = [f"--data_dir={tmp_path / 'data'}", "--num_proc=1"]
    code = cli.run_prepare([f"--dataset={src / 'a.jsonl'}", *common])
    err = capsys.readouterr().err  # the progress bar, then the error on a line of its own
    assert code == 2 and f"error: {src / 'a.jsonl'}: line 6 is not valid JSON" in err.splitlines()[-1], err
    assert "Traceback" not in err
    code = cli.run_prepare([f"--dataset={src / 'b.jsonl'}", *common])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {src / 'b.jsonl'}: line 1 has no 'text' field" in err.splitlines()[-1], err
    assert not list((tmp_path / "data").iterdir())  # nothing kept of either
    code = cli.run_prepare([f"--dataset={src}", *common, "--on_bad_record=skip"])
    captured = capsys.readouterr()
    assert code == 0 and "2 bad records skipped" in captured.err
    meta = prepare.load_meta(captured.out.strip())
    assert meta["bad_records"] == 2 and meta["documents"] == 20
    assert "line 6 is not valid JSON" in meta["first_bad_record"]
    # A .txt that breaks off part-way (a truncated .gz): its document ends with what was read, then the next file's.
    whole = gzip.compress(("first file " * 50_000).encode())
    (src / "c.txt.gz").write_bytes(whole[: len(whole) // 2])
    (src / "d.txt").write_text("second file")
    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)  # pieces of c.txt.gz are read before it breaks off
    d = DataConfig(dataset=f"{src / 'c.txt.gz'}+{src / 'd.txt'}", data_dir=str(tmp_path / "data"),
                   on_bad_record="skip", num_proc=1)
    out = prepare.prepare(d, quiet=True)
    meta = prepare.load_meta(out)
    assert meta["bad_records"] == 1 and "c.txt.gz: cannot be read" in meta["first_bad_record"]
    text = bytes(np.concatenate([data.Tokens.of(out, s)[:] for s in ("train", "val")]).astype(np.uint8)).decode()
    assert meta["documents"] == 2 and text.startswith("first file " * 1000) and len(text) > 200_000
    assert text.endswith("\n\nsecond file\n\n")
    # The field can be named: b.jsonl's first record holds its text under "body".
    d = DataConfig(dataset=str(src / "b.jsonl"), data_dir=str(tmp_path / "data"), text_field="body",
                   on_bad_record="skip", num_proc=1)
    assert prepare.load_meta(prepare.prepare(d, quiet=True))["bad_records"] == 10


def test_a_txt_without_a_line_break_is_still_read_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    monkeypatch.setattr(sources, "PIECE_LIMIT", 800)
    text = "a" * 2000 + " word" * 300 + " " + "b" * 3000  # no line break; spaces only in the middle
    (tmp_path / "one.txt").write_text(text)
    read = [piece for piece, _ in sources.documents(sources.parse_dataset(str(tmp_path / "one.txt"))[0], "text")]
    assert "".join(read) == text and max(map(len, read)) <= 800 + 100
    tok = get_tokenizer("gpt2")
    # Exact where a space gave a place to cut; only the cuts forced inside the long runs may change tokens.
    middle = [p for p in read if " word" in p]
    assert sum((tok.encode(p) for p in middle), []) == tok.encode("".join(middle))


def test_a_val_split_cut_from_the_tail_spans_shards(tmp_path):
    """Fewer than 10 documents: the last 10% of the tokens move to val, across several train shards."""
    (tmp_path / "a.txt").write_text("0123456789" * 300)
    d = DataConfig(dataset=str(tmp_path / "a.txt"), data_dir=str(tmp_path / "data"), shard_mb=0.0007)  # 700 bytes
    out = prepare.prepare(d, quiet=True)
    meta = prepare.load_meta(out)
    tokens = np.concatenate([data.Tokens.of(out, "train")[:], data.Tokens.of(out, "val")[:]])
    assert bytes(tokens.astype(np.uint8)) == b"0123456789" * 300 + b"\n\n"
    assert meta["val_tokens"] == 300 and meta["train_tokens"] == 2702 and len(meta["val_shards"]) == 1
    assert [n for _, n in meta["train_shards"]] == [700, 700, 700, 602]
    assert sorted(p.name for p in out.glob("*.bin")) == [f"train-0000{i}.bin" for i in range(4)] + ["val-00000.bin"]


def test_a_prepared_directory_can_be_the_dataset(tmp_path, data_dir):
    """A copied data_dir trains without its raw files: dataset may name the prepared directory itself."""
    directory = prepare.prepare(DataConfig(data_dir=str(data_dir)), quiet=True)
    d = DataConfig(dataset=str(directory), data_dir=str(tmp_path / "elsewhere"))
    assert prepare.prepare(d, quiet=True) == directory and not (tmp_path / "elsewhere").exists()
    (corpus,) = data.load_corpora(d, block_size=64, quiet=True)
    assert corpus.meta["documents"] == 38


def test_unreadable_files_and_bad_specs_are_one_line(tmp_path):
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "broken.jsonl.zst").write_bytes(b"not zstd at all")
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "t.parquet").write_bytes(b"PAR1 but not really")
    d = lambda spec, **kw: DataConfig(dataset=spec, data_dir=str(tmp_path / "data"), num_proc=1, **kw)
    cases = [(str(tmp_path / "broken.jsonl.gz"), f"{tmp_path / 'broken.jsonl.gz'}: cannot be read"),
             (str(tmp_path / "t.parquet"), f"{tmp_path / 't.parquet'}: cannot be read"),
             (str(tmp_path / "broken.jsonl.zst"), f"{tmp_path / 'broken.jsonl.zst'}: cannot be read"),
             (str(tmp_path / "notes.csv"), "unsupported file type"),
             (str(tmp_path / "nothing*.jsonl"), "holds no .txt, .jsonl"),
             ("a:0.5,", "an empty component"),
             ("a:0.5,b", "'b' has no weight"),
             ("a:0,b:1", "weights must be > 0"),
             ("a:1,a:2", "named twice")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=None) as e:
            prepare.prepare_all(d(spec), quiet=True)
        assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    write_formats(tmp_path / "src")
    with pytest.raises(ConfigError, match="no column 'body'"):
        prepare.prepare(d(str(tmp_path / "src" / "docs.parquet"), text_field="body"), quiet=True)


def test_the_cache_is_keyed_by_what_went_in(tmp_path, monkeypatch):
    for name, text in (("a", "first corpus " * 50), ("b", "second corpus " * 50)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.txt").write_text(text)
    d = lambda folder: DataConfig(dataset=str(tmp_path / folder / "corpus.txt"), data_dir=str(tmp_path / "data"))
    first, second = prepare.prepare(d("a"), quiet=True), prepare.prepare(d("b"), quiet=True)
    assert first != second and first.name.startswith("corpus-byte-")  # same file name, different corpora
    assert prepare.prepare(d("a"), quiet=True) == first  # found, not prepared again
    stamp = os.stat(first / "meta.json").st_mtime_ns
    source = tmp_path / "a" / "corpus.txt"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # touched
    again = prepare.prepare(d("a"), quiet=True)
    assert again != first and (again / "meta.json").is_file() and os.stat(first / "meta.json").st_mtime_ns == stamp
    # With data_dir read-only, a changed source is refused in one line that says which file changed.
    source.write_text("changed " * 50)
    monkeypatch.setattr(prepare.os, "access", lambda *_: False)  # root ignores chmod: say it is read-only
    with pytest.raises(ConfigError) as e:
        prepare.prepare(d("a"), quiet=True)
    assert "is read-only" in str(e.value) and f"{source} changed since corpus-byte-" in str(e.value)


@pytest.mark.slow
def test_preparing_a_corpus_far_larger_than_memory_allows_keeps_rss_bounded(tmp_path):
    """A 300 MB corpus (zstd-compressed JSON lines) prepared by 2 workers: the peak RSS of every process stays
    under 100 MB (about 40 MB of it is Python and numpy), so nothing holds the corpus, its tokens or more than a
    few chunks."""
    import zstandard

    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "\n"])
    line = json.dumps({"text": " ".join(rng.choice(words, 2000))}) + "\n"  # ~12 kB documents
    n_docs = 300_000_000 // len(line)
    with zstandard.open(tmp_path / "big.jsonl.zst", "w") as fh:
        for _ in range(n_docs):
            fh.write(line)
    # The main process's own high-water mark is VmHWM (its ru_maxrss would carry pytest's over the exec); the
    # workers' is their ru_maxrss, which carries only this small process's.
    code = ("import resource, sys; from gpt.cli import run_prepare; rc = run_prepare(sys.argv[1:]); "
            "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')); "
            "print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, f"--dataset={tmp_path / 'big.jsonl.zst'}", "--num_proc=2",
                        f"--data_dir={tmp_path / 'data'}", "--shard_mb=100"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    directory, rss = r.stdout.strip().splitlines()
    main_kb, worker_kb = map(int, rss.split())
    meta = prepare.load_meta(directory)
    assert meta["documents"] == n_docs and meta["text_bytes"] > 290e6 and len(meta["train_shards"]) == 3
    print(f"peak RSS: main {main_kb / 1e3:.0f} MB, workers {worker_kb / 1e3:.0f} MB; {meta['seconds']} s")
    assert main_kb < 100_000 and worker_kb < 100_000, (main_kb, worker_kb)
