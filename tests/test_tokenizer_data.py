"""Tokenizers (offline GPT-2 BPE, bytes) and the corpus/batch pipeline."""

import json

import numpy as np
import pytest

from gpt import data
from gpt.config import ConfigError, DataConfig
from gpt.tokenizer import get_tokenizer


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
    directory = data_dir / "shakespeare-byte"
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["dtype"] == "uint8"
    assert meta["train_tokens"] + meta["val_tokens"] > 1_000_000
    text = bytes(data.load_split(directory, "train")[:200_000]).decode("utf-8", errors="replace")
    assert text.count(" the ") > 500 and "THESEUS:\n" in text  # English prose with speaker lines
    assert "\n\n\n" not in text
    assert "**" not in text  # Markdown markup stripped


def test_prepare_text_directory_and_errors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello world " * 100)
    cfg = DataConfig(dataset=str(tmp_path / "src"), tokenizer="gpt2", data_dir=str(tmp_path / "data"))
    out = data.prepare(cfg, quiet=True)
    meta = data.load_meta(out)
    assert meta["tokenizer"] == "gpt2" and meta["dtype"] == "uint16"
    tokens = np.concatenate([data.load_split(out, "train"), data.load_split(out, "val")])
    assert tokens[-1] == 50256 and get_tokenizer("gpt2").decode(tokens[:2]) == "hello world"
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temp dir left
    with pytest.raises(ConfigError, match="not a built-in corpus"):
        data.prepare(DataConfig(dataset=str(tmp_path / "missing"), data_dir=str(tmp_path / "data")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        data.prepare(DataConfig(dataset=str(tmp_path / "empty"), data_dir=str(tmp_path / "data")))


def test_batches_are_a_pure_function_of_seed_stream_and_step(data_dir):
    tokens = data.load_split(data_dir / "shakespeare-byte", "train")
    a = data.batch_offsets(1, "train", 5, (2, 8), len(tokens), 32)
    assert np.array_equal(a, data.batch_offsets(1, "train", 5, (2, 8), len(tokens), 32))
    assert not np.array_equal(a, data.batch_offsets(1, "train", 6, (2, 8), len(tokens), 32))
    assert not np.array_equal(a, data.batch_offsets(1, "eval_train", 5, (2, 8), len(tokens), 32))
    x, y = data.get_batch(tokens, a, 32)
    assert x.shape == y.shape == (2, 8, 32) and x.dtype == np.int32
    np.testing.assert_array_equal(x[..., 1:], y[..., :-1])  # targets are inputs shifted by one
    np.testing.assert_array_equal(x[0, 3], tokens[a[0, 3]: a[0, 3] + 32])
