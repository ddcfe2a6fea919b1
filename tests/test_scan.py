"""scan_layers: the blocks as one scan over stacked parameters, against the per-layer loop on the same
weights (logits, gradients, cached decoding), through GPT-2 weight exchange, sharding and checkpoints."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from gpt import sharding
from gpt.config import ModelConfig
from gpt.hf import from_hf, save_hf, to_hf
from gpt.model import GPT, init_params, stack_layers, unstack_layers
from gpt.logits import Rules
from gpt.sampling import Generator
from tests.helpers import TINY, random_model, tiny_model_config

LOOPED = tiny_model_config(n_layer=3, vocab_size=200)
SCANNED = ModelConfig(**{**vars(LOOPED), "scan_layers": True})


@pytest.fixture(scope="module")
def weights():
    _, params, idx = random_model(LOOPED)
    return params, idx


def loss_and_grads(cfg, params, idx):
    def loss(p):
        logits, _ = GPT(cfg).apply({"params": p}, idx[:, :-1])
        return -jax.numpy.mean(jax.numpy.take_along_axis(jax.nn.log_softmax(logits), idx[:, 1:, None], -1))
    return jax.value_and_grad(loss)(params)


def test_stacking_round_trips_and_matches_the_scanned_init():
    looped = nn.unbox(init_params(LOOPED, jax.random.key(0)))
    stacked = stack_layers(looped, LOOPED.n_layer)
    scanned_shapes = jax.tree.map(lambda x: x.shape, nn.unbox(init_params(SCANNED, jax.random.key(0))))
    assert jax.tree.map(lambda x: x.shape, stacked) == scanned_shapes
    for a, b in zip(jax.tree.leaves(unstack_layers(stacked, LOOPED.n_layer)), jax.tree.leaves(looped)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_logits_and_gradients_equal_the_loop(weights, remat):
    params, idx = weights
    ref_loss, ref_grads = loss_and_grads(ModelConfig(**{**vars(LOOPED), "remat": remat}), params, idx)
    loss, grads = loss_and_grads(ModelConfig(**{**vars(SCANNED), "remat": remat}),
                                 stack_layers(params, LOOPED.n_layer), idx)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(unstack_layers(grads, LOOPED.n_layer)),
                            jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scanned_decoding_with_the_cache_equals_the_loop(weights):
    params, _ = weights
    prompts = [[5, 17, 42], [7, 1, 3, 9, 11]]
    looped = Generator(LOOPED, params).generate(prompts, 12, Rules(0.0), seed=0)
    scanned = Generator(SCANNED, stack_layers(params, LOOPED.n_layer)).generate(prompts, 12, Rules(0.0), seed=0)
    assert scanned == looped
    sampled = [Generator(cfg, p).generate(prompts, 12, Rules(1.0, 5, 0.9), seed=3)
               for cfg, p in ((LOOPED, params), (SCANNED, stack_layers(params, LOOPED.n_layer)))]
    assert sampled[0] == sampled[1]


def test_the_stacked_axis_is_never_sharded():
    boxed = init_params(SCANNED, jax.random.key(0))
    names = boxed["h"]["attn"]["c_attn"]["kernel"].names
    assert names[0] == "layers" and dict(sharding.RULES)["layers"] is None


def test_gpt2_weights_load_and_export_in_the_stacked_layout(weights, tmp_path):
    params, _ = weights
    save_hf(LOOPED, params, tmp_path / "hf")
    cfg, stacked = from_hf(tmp_path / "hf", scan_layers=True)
    assert cfg.scan_layers
    _, looped = from_hf(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(stack_layers(looped, cfg.n_layer))):
        np.testing.assert_array_equal(a, b)
    exported = to_hf(cfg, stacked)
    for key, value in to_hf(LOOPED, params).items():
        np.testing.assert_array_equal(exported[key], value)


def test_a_checkpoint_resumes_in_its_layout_and_refuses_the_other(data_dir, tmp_path, capsys):
    from gpt import cli

    out = tmp_path / "run"
    base = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"]
    assert cli.run_train([*base, "--scan_layers"]) == 0
    assert cli.run_train([f"--out_dir={out}", "--init_from=resume", "--max_iters=3"]) == 0  # scanned, as saved
    capsys.readouterr()
    code = cli.run_train([f"--out_dir={out}", "--init_from=resume", "--max_iters=4", "--scan_layers=False"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "scan_layers=True: run with --scan_layers=True" in err[0], err
    assert cli.run_sample([f"--out_dir={out}", "--max_new_tokens=4", "--num_samples=1", "--json"]) == 0
