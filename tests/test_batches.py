"""The batch source: epochs that see every window once, mixtures drawn in their weights, both a pure function
of (seed, step), so a resumed mixture run repeats the uninterrupted one."""

import json

import numpy as np
import pytest

from gpt import data, sharding
from gpt.cli import run_train
from gpt.config import ConfigError, load_config
from gpt.prepare import load_meta
from tests.helpers import TINY, write_corpus


def test_an_epoch_walks_every_window_once_in_a_new_order_each_time():
    windows = data.Windows(n_tokens=1001, block_size=10, seed=3, stream="train", corpus=0)
    assert windows.n == 100  # 101-token windows (inputs and targets) that do not overlap: (1001 - 1) // 10
    first, second = windows.offsets(np.arange(0, 100)), windows.offsets(np.arange(100, 200))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(0, 1000, 10))
    assert first.tolist() != second.tolist()
    # A pure function of (seed, stream, sample): another object, any order and shape of the request.
    again = data.Windows(1001, 10, 3, "train", 0)
    np.testing.assert_array_equal(again.offsets(np.arange(199, -1, -1).reshape(4, 50)), np.concatenate(
        [first, second])[::-1].reshape(4, 50))
    other = data.Windows(1001, 10, 3, "eval_val", 0).offsets(np.arange(100))
    assert other.tolist() != first.tolist()
    with pytest.raises(ConfigError, match="block_size=10 needs more than 10 tokens, but the split holds 10"):
        data.Windows(10, 10, 0, "train", 0)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
def test_a_mixture_draws_each_corpus_in_its_weight_and_walks_its_samples_in_order(weights):
    mixture = data.Mixture(weights, seed=0, stream="train")
    assert mixture.counts.sum() == data.MIX_BLOCK
    n = 3 * data.MIX_BLOCK + 1000  # several blocks and part of one
    corpus, sample = mixture.locate(np.arange(n))
    realised = np.bincount(corpus, minlength=len(weights)) / n
    np.testing.assert_allclose(realised, weights, atol=0.01)  # the tolerance: 1% of the samples
    np.testing.assert_array_equal(mixture.consumed(n), np.bincount(corpus, minlength=len(weights)))
    for k in range(len(weights)):  # corpus k's samples are 0, 1, 2, ... in the order they are drawn
        np.testing.assert_array_equal(sample[corpus == k], np.arange((corpus == k).sum()))
    # Exact at every block boundary, and the same answer whatever range is asked.
    np.testing.assert_array_equal(mixture.consumed(2 * data.MIX_BLOCK), 2 * mixture.counts)
    part = data.Mixture(weights, seed=0, stream="train").locate(np.arange(5000, 5100))
    np.testing.assert_array_equal(part[0], corpus[5000:5100])
    np.testing.assert_array_equal(part[1], sample[5000:5100])


def test_an_epoch_order_is_a_permutation_at_every_size():
    """The keyed Feistel order with cycle walking: a bijection of [0, n) for sizes at and around powers of 4."""
    for n in (1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1000, 4097):
        windows = data.Windows(n * 8 + 1, 8, seed=0, stream="train", corpus=2)
        assert windows.n == n
        for epoch in (0, 7):
            assert sorted(windows.permute(epoch, np.arange(n)).tolist()) == list(range(n)), (n, epoch)


def test_mix_counts_round_by_largest_remainders():
    np.testing.assert_array_equal(data.mix_counts([0.7, 0.3]), [1434, 614])  # 1433.6 and 614.4
    np.testing.assert_array_equal(data.mix_counts([1, 1, 1]), [683, 683, 682])  # a tie goes to the first
    np.testing.assert_array_equal(data.mix_counts([2, 1, 1]), [1024, 512, 512])


def test_a_weight_too_small_to_draw_is_refused():
    with pytest.raises(ConfigError, match="would never be drawn"):
        data.mix_counts([1.0, 1e-5])


def two_corpora(tmp_path):
    """Two hand-written corpora whose tokens tell them apart: ids < 100 and ids >= 100."""
    a = write_corpus(tmp_path / "a", np.arange(4001) % 100, np.arange(801) % 100)
    b = write_corpus(tmp_path / "b", 100 + np.arange(2001) % 100, 100 + np.arange(801) % 100)
    return [data.Corpus("a", a, 0.75, load_meta(a)), data.Corpus("b", b, 0.25, load_meta(b))]


def test_batches_of_a_mixture_come_from_both_corpora_and_report_the_position(tmp_path):
    cfg = load_config(["--block_size=16", "--batch_size=8", "--seed=1"])
    batches = data.Batches(cfg, two_corpora(tmp_path), sharding.make_mesh(cfg.mesh))
    rows = np.concatenate([np.asarray(batches.train(s)[0])[0] for s in range(100)])
    from_b = (rows >= 100).all(axis=1)
    assert ((rows < 100).all(axis=1) | from_b).all()  # every window is from one corpus
    assert abs(from_b.mean() - 0.25) < 0.02
    position = batches.position(100)
    assert position["mix"]["b"] == pytest.approx(from_b.mean()) and sum(position["mix"].values()) == pytest.approx(1)
    # a: 4000 // 16 = 250 windows per epoch, b: 125; 800 rows drawn
    assert position["epoch"]["a"] == pytest.approx((~from_b).sum() / 250)
    assert position["epoch"]["b"] == pytest.approx(from_b.sum() / 125)


@pytest.fixture
def mixture_spec(tmp_path, data_dir):
    """The built-in corpus mixed with a JSON-lines corpus, prepared into the session's data_dir."""
    (tmp_path / "src").mkdir()
    lines = [json.dumps({"text": f"Record {i}: the quick brown fox jumps over the lazy dog. " * 4}) for i in range(50)]
    (tmp_path / "src" / "fox.jsonl").write_text("\n".join(lines) + "\n")
    return f"--dataset=shakespeare:0.8,{tmp_path / 'src' / 'fox.jsonl'}:0.2"


def rows_of(out_dir):
    return [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]


def test_a_resumed_mixture_run_repeats_the_uninterrupted_run(data_dir, tmp_path, mixture_spec):
    common = [*TINY, f"--data_dir={data_dir}", mixture_spec, "--max_iters=8", "--warmup_iters=2",
              "--lr_decay_iters=8", "--checkpoint_interval=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train([*common, f"--out_dir={full}"]) == 0
    assert run_train([*common, f"--out_dir={part}", "--max_iters=4"]) == 0
    assert run_train([f"--out_dir={part}", "--init_from=resume", "--max_iters=8"]) == 0
    train = lambda d: {r["step"]: r for r in rows_of(d) if "loss" in r}
    for s in (4, 5, 6, 7):
        assert train(part)[s]["loss"] == train(full)[s]["loss"]  # bit-identical on CPU
        assert train(part)[s]["mix"] == train(full)[s]["mix"]
    last = train(full)[7]
    assert set(last["epoch"]) == {"shakespeare", mixture_spec.split("=")[1].split(",")[1].rsplit(":", 1)[0]}
    assert abs(last["mix"]["shakespeare"] - 0.8) < 0.1  # 64 rows drawn: the weights, roughly
    # Resuming on another mixture is refused in one line: the checkpoint records the corpora and weights.
    assert run_train([f"--out_dir={part}", "--init_from=resume", "--max_iters=9",
                      mixture_spec.replace(":0.8,", ":0.5,").replace(":0.2", ":0.5")]) == 2
