"""Evaluation you can trust: a checkpoint scored on the WHOLE of a split of its corpus, or on any text file.

    python -m gpt.eval --out_dir=DIR [--split=val | --file=TEXT] [--step=-1] [--batch_size=32] [--json]

The trainer's evaluation rows estimate the loss from `eval_iters` random batches: good for curves, but a
sample. Here every target token of the text is scored exactly once. The token stream is cut into windows of
block_size + 1 tokens that overlap by one (inputs window[:-1], targets window[1:], a stride of block_size),
the last one partial, padded and masked; each window's context starts afresh, so a token is predicted from
at most block_size tokens before it and on average about half that (a sliding window would score lower).

Reported: `loss` (mean nats per target token), `perplexity`, `bpb` (bits per byte: total nats / (ln 2 x the
UTF-8 bytes the targets stand for), comparable across tokenizers), `tokens`, `bytes`, `windows`, and
`loss_se`, the standard error of `loss` over windows, token-weighted: the ratio estimator's
sqrt(W / (W - 1) * sum_w (nats_w - loss * tokens_w)^2) / sum_w tokens_w, which equals
std(per-window mean loss) / sqrt(W) when every window is full. It treats windows as independent draws;
neighbouring windows of one text are not quite, so read it as a lower bound on the uncertainty.

A file is tokenized with the run's tokenizer. With GPT-2's, the stream starts with <|endoftext|>, as every
document does in the prepared corpus (it ends the one before), so every token of the file is a target and
`bytes` is the file's UTF-8 length; with bytes, which have no such token, the first byte is context only.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt.config import Config, ConfigError, MeshConfig, apply_layers, help_text, opt, read_args

SPLITS = ("train", "val")
USAGE = "usage: python -m gpt.eval --out_dir=DIR [--split=val | --file=TEXT] [--step=-1] [--batch_size=32] [--json]"


@dataclass
class EvalArgs:
    out_dir: str = opt("out", "run directory whose checkpoint is scored")
    split: str = opt("val", "the split of the run's prepared corpus to score whole: train or val")
    file: str = opt("", "score this UTF-8 text file instead of a split")
    step: int = opt(-1, "checkpoint step to score; -1 = the latest")
    batch_size: int = opt(32, "windows of block_size tokens per batch")
    json: bool = opt(False, "print the result as one JSON object on stdout")


def windows(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Batches (x_BT, y_BT, mask_BT) of the stream's windows, in order, int32 / bool: window w holds inputs
    tokens[wT : wT + T] and targets tokens[wT + 1 : wT + T + 1]. Positions past the stream's last target are
    zeros with mask False, so every target is counted once and a batch always has the same shape (one
    compilation). Reads one batch of the (possibly memory-mapped) stream at a time."""
    n_targets = len(tokens) - 1
    n_windows = -(-n_targets // block_size)
    for first in range(0, n_windows, batch_size):
        start = first * block_size
        n_valid = min(batch_size * block_size, n_targets - start)  # targets of this batch
        flat = np.zeros(batch_size * block_size + 1, np.int32)
        flat[: n_valid + 1] = tokens[start: start + n_valid + 1]
        shape = (batch_size, block_size)
        yield flat[:-1].reshape(shape), flat[1:].reshape(shape), (np.arange(flat.size - 1) < n_valid).reshape(shape)


def make_window_sums(model):
    """A jitted (params, bytes_V, x_BT, y_BT, mask_BT) -> per-window (nats_B, bytes_B, tokens_B): sums over
    each window's unmasked targets of the cross-entropy, of the bytes each target token stands for (bytes_V,
    the tokenizer's table) and of the targets themselves."""
    import jax
    import jax.numpy as jnp
    import optax

    def window_sums(params, bytes_V, x_BT, y_BT, mask_BT):
        logits_BTV, _ = model.apply({"params": params}, x_BT, deterministic=True)
        nats_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT)
        # where, not a product: whatever a padded position computes never reaches the sums
        return (jnp.where(mask_BT, nats_BT, 0.0).sum(-1), jnp.where(mask_BT, bytes_V[y_BT], 0).sum(-1),
                mask_BT.sum(-1))

    return jax.jit(window_sums)


def pipelined(fn, batches) -> list:
    """fn(*batch) for every batch, fetched to the host. One call stays in flight while the host cuts the next
    batch (dispatch is asynchronous), and no more: a whole split's batches never queue up on the device."""
    import jax

    fetched, in_flight = [], None
    for batch in batches:
        out = fn(*batch)
        if in_flight is not None:
            fetched.append(jax.device_get(in_flight))
        in_flight = out
    return fetched + [jax.device_get(in_flight)]


def summarize(nats_W: np.ndarray, bytes_W: np.ndarray, tokens_W: np.ndarray) -> dict:
    """The report's figures from per-window sums (see the module docstring for loss_se)."""
    nats, n_tokens, n_bytes = float(np.sum(nats_W, dtype=np.float64)), int(tokens_W.sum()), int(bytes_W.sum())
    loss = nats / n_tokens
    n_windows = len(nats_W)
    residual_W = nats_W.astype(np.float64) - loss * tokens_W
    se = math.sqrt(n_windows / (n_windows - 1) * np.sum(residual_W ** 2)) / n_tokens if n_windows > 1 else None
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": nats / (math.log(2) * n_bytes),
            "loss_se": se, "tokens": n_tokens, "bytes": n_bytes, "windows": n_windows}


def split_tokens(run: Config, corpus: list | dict | None, split: str):
    """The whole split of the prepared corpus the run trained on, checked to be that corpus (for a mixture, its
    corpora's splits one after another)."""
    from gpt import data

    corpora = data.load_corpora(run.data, run.model.block_size, build=False)
    # (A checkpoint from before corpus format 2 recorded one dict, of a corpus no longer prepared: its split is
    # scored as the corpus is prepared now, its tokenizer checked as it is loaded.)
    if isinstance(corpus, list) and data.identity(corpora) != corpus:
        raise ConfigError(f"the prepared corpus {data.identity(corpora)} is not the {corpus} the checkpoint was "
                          "trained on: prepare the run's corpus again")
    return data.Tokens([shard for c in corpora for shard in data.Tokens.of(c.directory, split).shards])


def read_text(file: str) -> str:
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"file={file!r}: cannot read the file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"file={file!r}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    if not text:
        raise ConfigError(f"file={file!r}: the file is empty")
    return text


def file_tokens(text: str, tokenizer, file: str) -> np.ndarray:
    """The file's tokens, after the end-of-text token where the tokenizer has one (the module docstring says why)."""
    ids = ([] if tokenizer.eot_token is None else [tokenizer.eot_token]) + tokenizer.encode(text)
    if len(ids) < 2:
        raise ConfigError(f"file={file!r}: a single {tokenizer.name} token; scoring needs at least 2 (one to "
                          "predict from, one to predict)")
    return np.asarray(ids, np.int32)


def evaluate(out_dir: str, split: str = "val", file: str | None = None, step: int = -1, batch_size: int = 32) -> dict:
    """Score checkpoint `step` (-1: the latest) of the run in out_dir on the whole `split` of its corpus, or on
    the text `file`. Returns {out_dir, step, split, file, tokenizer, block_size, loss, perplexity, bpb,
    loss_se, tokens, bytes, windows}; bad input raises ConfigError (one line)."""
    import jax

    from gpt.checkpoint import load_params
    from gpt.model import GPT
    from gpt.tokenizer import get_tokenizer, token_bytes

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    if step < -1:
        raise ConfigError(f"step={step}: give a checkpoint step, or -1 for the latest")
    if file is not None and split != "val":
        raise ConfigError(f"split={split!r} and file={file!r}: score a split or a file, not both")
    if file is None and split not in SPLITS:
        raise ConfigError(f"split={split!r}: use {' or '.join(SPLITS)} (or --file=PATH for any text)")
    text = read_text(file) if file is not None else None  # before the checkpoint: a bad path fails fast
    model_cfg, params, meta, restored = load_params(out_dir, step, MeshConfig())
    tokenizer = get_tokenizer(meta["tokenizer"]["tokenizer"])
    if text is None:
        tokens = split_tokens(Config.from_dict(meta["config"]), meta.get("corpus"), split)
    else:
        tokens = file_tokens(text, tokenizer, file)

    block_size = model_cfg.block_size
    n_windows = -(-(len(tokens) - 1) // block_size)
    window_sums = make_window_sums(GPT(model_cfg))
    bytes_V = jax.device_put(token_bytes(tokenizer.name))
    batches = windows(tokens, block_size, min(batch_size, n_windows))
    sums = pipelined(lambda *batch: window_sums(params, bytes_V, *batch), batches)
    nats_W, bytes_W, tokens_W = (np.concatenate(parts)[:n_windows] for parts in zip(*sums))
    return {"out_dir": out_dir, "step": restored, "split": None if file is not None else split, "file": file,
            "tokenizer": tokenizer.name, "block_size": block_size, **summarize(nats_W, bytes_W, tokens_W)}


def describe(result: dict) -> str:
    """The result as one readable line."""
    scored = f"file {result['file']}" if result["file"] is not None else f"the {result['split']} split"
    se = "" if result["loss_se"] is None else f" +- {result['loss_se']:.4f}"
    return (f"{result['out_dir']} step {result['step']} on {scored}: loss {result['loss']:.4f}{se} nats/token "
            f"(perplexity {result['perplexity']:.2f}), {result['bpb']:.4f} bits/byte over {result['tokens']:,} "
            f"tokens ({result['bytes']:,} bytes) in {result['windows']:,} windows of {result['block_size']}")


def main(argv: list[str]) -> int:
    """`python -m gpt.eval ...`: print the evaluation (one line, or one JSON object with --json). Bad input
    raises ConfigError; the command line below turns it into one line and exit code 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(EvalArgs(), USAGE))
        return 0
    layers = read_args(argv, allow_preset=False)
    args = apply_layers(EvalArgs(), layers)
    asked = {key for _, values in layers for key in values}
    if {"split", "file"} <= asked:
        raise ConfigError(f"--split={args.split} and --file={args.file}: score a split or a file, not both")
    result = evaluate(args.out_dir, args.split, args.file if "file" in asked else None, args.step, args.batch_size)
    print(json.dumps(result) if args.json else describe(result))
    return 0


if __name__ == "__main__":
    from gpt.exits import guarded, quiet_orbax

    quiet_orbax()
    sys.exit(guarded(lambda: main(sys.argv[1:])))
