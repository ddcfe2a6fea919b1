"""Tokenizers (offline GPT-2 BPE, bytes) and the corpus/batch pipeline."""

import json

import numpy as np
import pytest

from gpt import data, prepare
from gpt.config import ConfigError, DataConfig, load_config
from gpt.tokenizer import get_tokenizer
from tests.helpers import write_corpus


def test_gpt2_known_ids_offline():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") != [50256]  # special tokens in text are ordinary text
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert tok.vocab_size == 50257 and tok.eot_token == 50256


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café ☕ — 日本語 🚀", "\x00\n\t\ud7ff"])
def test_byte_tokenizer_round_trips_any_utf8(text):
    tok = get_tokenizer("byte")
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_builtin_corpus_is_real_english_and_large(data_dir):
    directory = prepare.prepare(DataConfig(data_dir=str(data_dir)), quiet=True)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["dtype"] == "uint8" and meta["format"] == prepare.FORMAT
    assert meta["train_tokens"] + meta["val_tokens"] > 1_000_000
    assert meta["documents"] == 38 and meta["val_documents"] == 3 and meta["split"] == "every 10th document"
    text = bytes(data.Tokens.of(directory, "train")[:200_000].astype(np.uint8)).decode("utf-8", errors="replace")
    assert text.count(" the ") > 500 and "THESEUS:\n" in text  # English prose with speaker lines
    assert "\n\n\n" not in text
    assert "**" not in text  # Markdown markup stripped


def test_prepare_text_directory_and_errors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello world " * 100)
    cfg = DataConfig(dataset=str(tmp_path / "src"), tokenizer="gpt2", data_dir=str(tmp_path / "data"))
    out = prepare.prepare(cfg, quiet=True)
    meta = prepare.load_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16"
    assert meta["split"].startswith("the last 10% of the tokens")  # one document: no whole one to spare
    tokens = np.concatenate([data.Tokens.of(out, "train")[:], data.Tokens.of(out, "val")[:]])
    assert tokens[-1] == 50256 and get_tokenizer("gpt2").decode(tokens[:2]) == "hello world"
    assert len(tokens) == 202 and meta["val_tokens"] == 20  # 200 words, the trailing space, <|endoftext|>; 10% to val
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temp dir left
    with pytest.raises(ConfigError, match="not a built-in corpus"):
        prepare.prepare(DataConfig(dataset=str(tmp_path / "missing"), data_dir=str(tmp_path / "data")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        prepare.prepare(DataConfig(dataset=str(tmp_path / "empty"), data_dir=str(tmp_path / "data")))


def test_windows_are_slices_of_the_tokens():
    tokens = np.arange(1000, 1100)
    offsets = np.array([[0, 5, 17], [63, 2, 40]])
    x, y = data.get_batch(tokens, offsets, 33)  # an odd block_size: block_size + 1 is not block_size | 1
    for i, j in np.ndindex(offsets.shape):
        np.testing.assert_array_equal(x[i, j], tokens[offsets[i, j]: offsets[i, j] + 33])
        np.testing.assert_array_equal(y[i, j], tokens[offsets[i, j] + 1: offsets[i, j] + 34])


def test_batches_read_their_split_into_the_batch_sharding(tmp_path):
    """train() and eval("train") read the train split, eval("val") the val split (told apart by their
    token values), whole windows at multiples of block_size, laid out as sharding.batch_sharding says; the
    shards of a split read as one sequence."""
    import jax

    from gpt import sharding

    write_corpus(tmp_path, np.arange(0, 1001), np.arange(5000, 5601), dtype="uint16", vocab=50257, shard_tokens=97)
    cfg = load_config(["--block_size=8", "--batch_size=4", "--gradient_accumulation_steps=3", "--seed=5"])
    mesh = sharding.make_mesh(cfg.mesh)
    batches = data.Batches(cfg, [data.Corpus("c", tmp_path, 1.0, prepare.load_meta(tmp_path))], mesh)
    x, y = batches.train(7)
    assert x.shape == y.shape == (3, 4, 8) and x.sharding.spec == sharding.batch_sharding(mesh, 1).spec
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x)[..., :1] + np.arange(8))  # across shard boundaries
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) + 1)
    assert (np.asarray(x)[..., 0] % 8 == 0).all()
    for split, low, high in (("train", 0, 1001), ("val", 5000, 5601)):
        ex, ey = batches.eval(split, 2)
        assert ex.shape == (4, 8) and ex.sharding.spec == sharding.batch_sharding(mesh, 0).spec
        assert low <= int(jax.numpy.min(ex)) and int(jax.numpy.max(ey)) < high


def test_a_disk_that_fills_while_preparing_says_so_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from gpt import cli

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("To be, or not to be, that is the question. " * 200)

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data" / "val-00000.bin"))

    monkeypatch.setattr(prepare, "_move_tail", full_disk)  # the copy of the val split hits the full disk
    code = cli.run_prepare([f"--dataset={tmp_path / 'corpus'}", f"--data_dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: preparing dataset=") and "No space left on device" in err[-1]
    assert "Traceback" not in "\n".join(err) and "nothing was kept" in err[-1]
    assert list((tmp_path / "data").iterdir()) == []  # neither a half corpus nor its temporary directory
    monkeypatch.undo()
    assert cli.run_prepare([f"--dataset={tmp_path / 'corpus'}", f"--data_dir={tmp_path / 'data'}"]) == 0


def test_short_of_space_for_a_corpus_is_a_warning(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    (tmp_path / "a.txt").write_text("x" * 5000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    prepare.prepare(DataConfig(dataset=str(tmp_path / "a.txt"), data_dir=str(tmp_path / "data")), quiet=True)
    assert "warning:" in capsys.readouterr().err  # 1000 bytes free < 5000 bytes of text as uint8 tokens


def test_prefetch_hands_out_each_steps_batch_in_order_and_counts_the_wait():
    import time

    made = []

    def make(step):
        made.append(step)
        time.sleep(0.05)  # a slow host: the loop waits for it
        return ("batch", step)

    prefetch = data.Prefetch(make, 3, 8, depth=2)
    t0 = time.perf_counter()
    assert [prefetch.get(step) for step in range(3, 8)] == [("batch", s) for s in range(3, 8)]
    assert made == list(range(3, 8)) and 0.1 < prefetch.wait_s <= time.perf_counter() - t0
    prefetch.close()
    with pytest.raises(RuntimeError, match="made the batch of step 0, but step 1 asked"):
        data.Prefetch(lambda s: s, 0, 5).get(1)
    behind = data.Prefetch(lambda s: s, 0, 5)
    behind.get(0)
    with pytest.raises(RuntimeError, match="made the batch of step 1, but step 0 asked"):
        behind.get(0)


def test_prefetch_raises_the_producers_error_in_the_loop_and_closes_mid_stream():
    import time

    made = []

    def make(step):
        made.append(step)
        if step == 2:
            raise ConfigError("bad batch 2")
        return step

    prefetch = data.Prefetch(make, 0, 10)
    assert prefetch.get(0) == 0 and prefetch.get(1) == 1
    with pytest.raises(ConfigError, match="bad batch 2"):
        prefetch.get(2)
    time.sleep(0.2)  # room for a producer that went on after the error to show itself
    prefetch.close()
    assert made == [0, 1, 2]  # the producer stopped at the failed batch
    slow_loop = data.Prefetch(lambda s: s, 0, 4, depth=1)  # the producer waits on a full queue, then goes on
    for step in range(4):
        time.sleep(0.15)
        assert slow_loop.get(step) == step
    slow_loop.close()
    endless = data.Prefetch(lambda s: s, 0, 10**9, depth=1)
    endless.get(0)
    endless.close()  # returns although the producer is blocked on a full queue
    assert not endless._thread.is_alive()
