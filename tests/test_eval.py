"""gpt/eval.py: the whole-split loss against a plain window-by-window recomputation with the training loss,
bits per byte against the bytes the text really has, the command line's output and its one-line refusals."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt import data, prepare, trainer
from gpt.checkpoint import load_params
from gpt.config import Config, MeshConfig
from gpt.eval import evaluate, main
from gpt.model import GPT
from gpt.steps import loss_fn
from gpt.tokenizer import get_tokenizer
from tests.helpers import REPO, TINY, TINY_MODEL, run_command

BLOCK = TINY_MODEL["block_size"]


def corpus_text(n_words: int, seed: int = 0) -> str:
    """Deterministic prose with multi-byte characters (so bytes and characters differ)."""
    words = "the a of and to in is was café naïve über — déjà vu river stone light night sea wind".split()
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def train_run(root, tokenizer: str, *flags: str) -> str:
    """A tiny run (the suite's TINY) on a small corpus of its own, trained in-process; returns its out_dir."""
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(4000))
    out = root / "run"
    cfg = trainer.prepare_run([*TINY, f"--dataset={corpus}", f"--tokenizer={tokenizer}", f"--data_dir={root / 'data'}",
                               f"--out_dir={out}", *flags])
    trainer.train(cfg, ["test"])
    return str(out)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("byte"), "byte")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("gpt2"), "gpt2", "--max_iters=1", "--eval_interval=1")


def val_split(out_dir: str) -> np.ndarray:
    cfg = Config.from_dict(json.load(open(f"{out_dir}/config.json")))
    return data.Tokens.of(prepare.prepare(cfg.data, quiet=True), "val")[:]


def reference_windows(out_dir: str, tokens: np.ndarray, step: int = -1) -> np.ndarray:
    """[W, 2] (nats, targets) of each window, scored one at a time by the training loss on exactly its own
    tokens (the last window shorter): no batching, padding or masking involved."""
    model_cfg, params, _, _ = load_params(out_dir, step, MeshConfig())
    model = GPT(model_cfg)
    mean_loss = jax.jit(lambda p, x, y: loss_fn(p, model, x, y, None, deterministic=True))
    rows = []
    for start in range(0, len(tokens) - 1, model_cfg.block_size):
        window = np.asarray(tokens[start: start + model_cfg.block_size + 1], np.int32)[None]
        n = window.shape[1] - 1
        rows.append((float(mean_loss(params, window[:, :-1], window[:, 1:])) * n, n))
    return np.array(rows)


def test_the_whole_split_loss_equals_a_window_by_window_recomputation(byte_run):
    val = val_split(byte_run)
    assert (len(val) - 1) % BLOCK, "the test needs a partial last window"
    result = evaluate(byte_run, batch_size=8)  # several batches, the last one partly padding
    reference = reference_windows(byte_run, val)
    assert result["tokens"] == len(val) - 1 == reference[:, 1].sum()  # every target once, the padded one too
    assert result["windows"] == len(reference) == math.ceil((len(val) - 1) / BLOCK)
    assert result["loss"] == pytest.approx(reference[:, 0].sum() / reference[:, 1].sum(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert (result["step"], result["split"], result["file"]) == (8, "val", None)
    # The batch size changes nothing but speed.
    assert evaluate(byte_run, batch_size=3)["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_bits_per_byte_of_bytes_is_the_loss_over_ln2(byte_run):
    result = evaluate(byte_run)
    assert result["bytes"] == result["tokens"]
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)


def test_an_earlier_step_and_the_train_split_score_differently(byte_run):
    latest, early, train = evaluate(byte_run), evaluate(byte_run, step=4), evaluate(byte_run, split="train")
    assert early["step"] == 4 and early["loss"] > latest["loss"]  # 4 more steps of training helped
    assert train["split"] == "train" and train["tokens"] > 5 * latest["tokens"]


def test_a_file_is_scored_and_its_standard_error_is_that_of_the_window_means(byte_run, tmp_path):
    # Exactly 4 full windows of bytes: two of prose like the corpus, two of digits it has never seen.
    text = corpus_text(400, seed=1).encode()[: 2 * BLOCK] + ("0123456789" * 7).encode()[: 2 * BLOCK + 1]
    path = tmp_path / "text.txt"
    path.write_bytes(text)
    result = evaluate(byte_run, file=str(path))
    reference = reference_windows(byte_run, np.frombuffer(text, np.uint8))
    assert (result["file"], result["split"], result["tokens"], result["windows"]) == (str(path), None, 4 * BLOCK, 4)
    assert result["loss"] == pytest.approx(reference[:, 0].sum() / (4 * BLOCK), rel=1e-5)
    assert result["loss"] > evaluate(byte_run)["loss"] + 0.1
    means = reference[:, 0] / reference[:, 1]
    assert result["loss_se"] == pytest.approx(np.std(means, ddof=1) / 2, rel=1e-4)


def test_gpt2_bits_per_byte_count_every_byte_of_the_file(gpt2_run, tmp_path):
    text = "Ünïcode — and plain words, ×3.\n" + corpus_text(60, seed=2)
    path = tmp_path / "text.txt"
    path.write_text(text)
    result = evaluate(gpt2_run, file=str(path))
    # The stream starts with <|endoftext|> (no bytes), so every token of the file is a target.
    assert result["tokens"] == len(get_tokenizer("gpt2").encode(text))
    assert result["bytes"] == len(text.encode("utf-8")) > len(text)
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * result["bytes"]))
    split = evaluate(gpt2_run)
    assert split["tokens"] == len(val_split(gpt2_run)) - 1 and split["bytes"] > split["tokens"]


def test_the_command_prints_one_line_or_one_json_object(byte_run, capsys):
    code, out, _ = run_command(main, [f"--out_dir={byte_run}"], capsys)
    assert code == 0 and len(out.splitlines()) == 1 and "bits/byte" in out and "val split" in out
    code, out, _ = run_command(main, [f"--out_dir={byte_run}", "--json", "--step=4"], capsys)
    assert code == 0 and len(out.splitlines()) == 1
    result = json.loads(out)
    assert result["step"] == 4 and result["out_dir"] == byte_run
    assert set(result) >= {"loss", "perplexity", "bpb", "tokens", "bytes", "windows", "loss_se", "split", "file"}


@pytest.mark.parametrize("argv, message", [
    (["--split=test"], "split='test': use train or val"),
    (["--file=/no/such/file"], "cannot read the file"),
    (["--file=EMPTY"], "the file is empty"),
    (["--file=ONE_BYTE"], "needs at least 2"),
    (["--file=NOT_UTF8"], "not UTF-8 text"),
    (["--file=ONE_BYTE", "--split=val"], "not both"),
    (["--batch_size=0"], "batch_size=0: must be >= 1"),
    (["--step=7"], "has checkpoints at steps [4, 8]"),
    (["--bach_size=4"], "unknown key 'bach_size' (did you mean 'batch_size'?)"),
    (["val"], "unexpected argument 'val'"),
])
def test_bad_input_is_one_line_and_exit_2(byte_run, tmp_path, capsys, argv, message):
    files = {"EMPTY": b"", "ONE_BYTE": b"x", "NOT_UTF8": b"ab\xff"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    key_value = [a.partition("=") for a in argv]  # the files' names become their paths
    argv = [f"{key}={tmp_path / value}" if value in files else key + eq + value for key, eq, value in key_value]
    code, out, err = run_command(main, [f"--out_dir={byte_run}", *argv], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_a_run_whose_corpus_is_not_prepared_is_refused_and_nothing_is_tokenized(byte_run, capsys):
    data_dir = Path(byte_run).parent / "data"
    data_dir.rename(data_dir.with_suffix(".away"))
    try:
        code, out, err = run_command(main, [f"--out_dir={byte_run}"], capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
        assert "the run's corpus is not prepared at" in err and "python -m gpt.cli prepare" in err
        assert not data_dir.exists()
    finally:
        data_dir.with_suffix(".away").rename(data_dir)


def test_python_m_gpt_eval_runs_and_refuses_in_one_line(byte_run, tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "gpt.eval", *argv], capture_output=True, text=True,
                              cwd=REPO, timeout=300)

    r = run(f"--out_dir={byte_run}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == len(val_split(byte_run)) - 1
    r = run(f"--out_dir={tmp_path / 'empty'}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: no checkpoint in") and len(r.stderr.splitlines()) == 1, r.stderr
