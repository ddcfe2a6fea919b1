"""The architecture switches of ModelConfig (gpt/model.py) against independent references.

What is checked against what:
- logits of GPT(cfg).apply, for each switch alone and for all the modern ones together, against
  tests/reference.py's numpy_gpt (float64 numpy written from the papers, reading our parameter tree), on random
  weights (norm scales and biases included); and the reference is not vacuous: with a switch turned off on the
  same weights it computes something else.
- grouped-query attention against multi-head attention whose key/value heads are repeated (an identity).
- cached decoding (prefill + per-token steps, as gpt/sampling.py's Generator drives it) against full recomputes;
  the KV cache's head count against kv_heads.
- scan_layers (stacked parameters) and remat against the looped layout: the same logits and gradients.
- gpt/plan.py's closed-form n_params against the count of the built tree, for every variant; param_counts of an
  untied model against the tree's leaves by name.
- the combined variant's train step on 8 simulated CPU devices (fsdp x tensor) against one device, by running
  this file as a script in subprocesses (tests/sharded_steps.py's run_steps with the variant's flags).
- a tiny CLI run of the combined variant with optimizer=muon: resume repeats the uninterrupted run, sample.py
  samples from it, export refuses its non-GPT-2 layout in one line (exit 2), and resuming it with another
  optimizer is refused in one line (exit 2).
- load_config refuses each bad value of the new keys with a ConfigError naming the key.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script (the sharded steps): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.config import ConfigError, load_config
from gpt.model import GPT, init_cache, init_params, param_counts, stack_layers
from gpt.plan import n_params
from tests.helpers import (REPO, TINY, check_cached_decode, flags, run_command, simulated_devices_env,
                           tiny_model_config)
from tests.reference import numpy_gpt

VOCAB = 200  # padded to 256 by the model: the padding is exercised everywhere
SOFTCAP = 0.5  # small enough that the cap bends the random model's logits (checked below)
# Every modern switch at once (4 heads so that 2 key/value heads make real groups of 2).
MODERN = {"norm": "rmsnorm", "norm_scale": False, "position": "rope", "mlp": "swiglu", "qk_norm": True,
          "tie_embeddings": False, "logit_softcap": SOFTCAP, "n_head": 4, "n_kv_head": 2, "bias": False}
VARIANTS = {
    "gpt2": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "layernorm_no_scale": {"norm_scale": False},
    "rmsnorm_no_scale": {"norm": "rmsnorm", "norm_scale": False},
    "no_bias": {"bias": False},
    "rope": {"position": "rope"},
    "rope_theta": {"position": "rope", "rope_theta": 100.0},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": True},
    "untied": {"tie_embeddings": False},
    "softcap": {"logit_softcap": SOFTCAP},
    "gqa": {"n_head": 4, "n_kv_head": 2},
    "mqa": {"n_head": 4, "n_kv_head": 1},
    "zero_init": {"zero_init": True},
    "modern": MODERN,
    "modern_relu2_scaled": {**MODERN, "mlp": "relu2", "norm_scale": True, "bias": True},
}


def variant(name: str, **changes):
    return tiny_model_config(vocab_size=VOCAB, **{**VARIANTS[name], **changes})


def random_model(cfg, seed: int = 0, batch: int = 2):
    """(model, params, idx) as tests/helpers.random_model makes them (every parameter random: norm scales about 1,
    biases and weights about 0), drawn with numpy on the tree's shapes (eval_shape: nothing initialised), which
    is much faster for this many variants than initialising each."""
    model = GPT(cfg)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    draw = lambda path, x: jnp.asarray((path[-1].key == "scale") + 0.05 * rng.standard_normal(x.value.shape),
                                       jnp.float32)
    params = jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: hasattr(x, "value"))
    idx = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)), jnp.int32)
    return model, params, idx


def to_dict(tree):
    """Parameters as nested plain dicts of numpy arrays (the reference's input, and the tests' own edits)."""
    return {k: to_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else np.asarray(tree)


_apply = {}


def logits_of(cfg, params, idx):
    """GPT(cfg).apply's logits, one compilation per config."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _apply:
        _apply[key] = jax.jit(lambda p, i: GPT(cfg).apply({"params": p}, i)[0])
    return np.asarray(_apply[key](params, idx))


# ---------------------------------------------------------------------------------------------- forward pass

@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_numpy_reference(name):
    cfg = variant(name)
    _, params, idx = random_model(cfg)
    logits = logits_of(cfg, params, idx)
    assert logits.shape == (2, cfg.block_size, cfg.padded_vocab_size)
    reference = numpy_gpt(cfg, to_dict(params), np.asarray(idx))
    np.testing.assert_allclose(logits[..., :VOCAB], reference[..., :VOCAB], rtol=1e-4, atol=1e-4)
    assert float(jax.nn.softmax(logits, -1)[..., VOCAB:].max()) == 0.0  # the padding is never predicted
    if cfg.logit_softcap:
        assert np.abs(logits[..., :VOCAB]).max() < cfg.logit_softcap
        uncapped = numpy_gpt(dataclasses.replace(cfg, logit_softcap=0.0), to_dict(params), np.asarray(idx))
        assert np.abs(uncapped[..., :VOCAB]).max() > cfg.logit_softcap  # some would pass it: the cap is at work


def test_reference_agrees_with_the_gpt2_reference_on_gpt2():
    """numpy_gpt on GPT-2's switches is tests/reference.py's numpy_gpt2 (Hugging Face layout) on the same weights;
    and the random weights are what random_model promises (norm scales about 1, not about 0)."""
    from gpt.hf import to_hf
    from tests.reference import numpy_gpt2

    cfg = variant("gpt2")
    _, params, idx = random_model(cfg)
    scale = np.asarray(params["h_0"]["ln_1"]["scale"])
    assert abs(scale.mean() - 1) < 0.1 and scale.std() > 0.01 and np.abs(np.asarray(params["h_0"]["ln_1"]["bias"])).max() > 0
    ours = numpy_gpt(cfg, to_dict(params), np.asarray(idx))[..., :VOCAB]
    np.testing.assert_allclose(ours, numpy_gpt2(to_hf(cfg, params), np.asarray(idx), cfg.n_head)[..., :VOCAB],
                               rtol=1e-9, atol=1e-9)


def _switched_off(name, cfg, params):
    """(cfg, params) with the variant's switch turned back to GPT-2's, on the same weights where the tree
    allows (zeros fill what GPT-2 has and the variant lacks: a position table, LayerNorm biases)."""
    p = to_dict(params)
    if name == "rope":
        p["wpe"] = {"embedding": np.zeros((cfg.block_size, cfg.n_embd))}
        return dataclasses.replace(cfg, position="learned"), p
    if name == "rmsnorm":
        for block in [p[f"h_{i}"] for i in range(cfg.n_layer)]:
            for ln in ("ln_1", "ln_2"):
                block[ln]["bias"] = np.zeros(cfg.n_embd)
        p["ln_f"]["bias"] = np.zeros(cfg.n_embd)
        return dataclasses.replace(cfg, norm="layernorm"), p
    key, value = {"relu2": ("mlp", "gelu"), "qk_norm": ("qk_norm", False), "untied": ("tie_embeddings", True),
                  "softcap": ("logit_softcap", 0.0), "rope_theta": ("rope_theta", 10000.0)}[name]
    return dataclasses.replace(cfg, **{key: value}), p


@pytest.mark.parametrize("name", ["rope", "rope_theta", "rmsnorm", "relu2", "qk_norm", "untied", "softcap"])
def test_reference_is_not_vacuous_each_switch_changes_the_function(name):
    cfg = variant(name)
    _, params, idx = random_model(cfg)
    off_cfg, off_params = _switched_off(name, cfg, params)
    on, off = numpy_gpt(cfg, to_dict(params), np.asarray(idx)), numpy_gpt(off_cfg, off_params, np.asarray(idx))
    assert np.abs(on[..., :VOCAB] - off[..., :VOCAB]).max() > 1e-2
    if name == "rope":  # without a position signal one layer of attention reads its prefix as a set: swapping the
        one = {k: v for k, v in off_params.items() if not k.startswith("h_") or k == "h_0"}  # first two tokens leaves
        swapped = np.asarray(idx).copy()  # the later positions' logits as they were; with rope they change
        swapped[:, [0, 1]] = swapped[:, [1, 0]]
        assert np.any(swapped != np.asarray(idx))
        logits = lambda c, p, i: numpy_gpt(dataclasses.replace(c, n_layer=1), p, i)[:, 2:, :VOCAB]
        np.testing.assert_allclose(logits(off_cfg, one, swapped), logits(off_cfg, one, np.asarray(idx)), atol=1e-9)
        one.pop("wpe")
        assert np.abs(logits(cfg, one, swapped) - logits(cfg, one, np.asarray(idx))).max() > 1e-3


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    gqa = variant("gqa")
    mha = dataclasses.replace(gqa, n_kv_head=0)
    _, params, idx = random_model(gqa)
    p = to_dict(params)
    group = gqa.n_head // gqa.kv_heads
    for i in range(gqa.n_layer):
        attn = p[f"h_{i}"]["attn"]
        q, kv = attn.pop("c_q"), attn.pop("c_kv")
        kv_kernel, kv_bias = (np.repeat(x, group, axis=-2) for x in (kv["kernel"], kv["bias"]))  # head j <- j // group
        attn["c_attn"] = {"kernel": np.concatenate([q["kernel"][:, None], kv_kernel], axis=1),
                          "bias": np.concatenate([q["bias"][None], kv_bias], axis=0)}
    np.testing.assert_allclose(logits_of(mha, p, idx)[..., :VOCAB], logits_of(gqa, params, idx)[..., :VOCAB],
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- decoding

def _full_logits(cfg, params, ids):
    padded = np.zeros((1, cfg.block_size), np.int32)
    padded[0, : len(ids)] = ids
    return logits_of(cfg, params, padded)[0, : len(ids)]


@pytest.mark.parametrize("name", ["gqa", "rope", "swiglu", "modern"])
def test_cached_decode_logits_equal_full_recompute(name):
    """Prefill + per-token cached steps, with left-padded prompts of mixed length (tests.helpers.check_cached_decode)."""
    cfg = variant(name)
    _, params, _ = random_model(cfg)
    steps, length = 6, 8
    cache = check_cached_decode(cfg, params, lambda ids: _full_logits(cfg, params, ids), VOCAB, steps)
    head_dim = cfg.n_embd // cfg.n_head
    want = (2, cfg.kv_heads, length + steps, head_dim)
    assert len(cache) == cfg.n_layer and all(k.shape == v.shape == want for k, v in cache)
    assert init_cache(cfg, 2, length + steps)[0][0].shape == want
    if name in ("gqa", "modern"):
        assert cfg.kv_heads < cfg.n_head


# ---------------------------------------------------------------------------------------------- layouts

def test_scan_layers_and_remat_compute_what_the_looped_layout_does():
    cfg = variant("modern")
    _, params, idx = random_model(cfg)
    want = logits_of(cfg, params, idx)
    y = jnp.roll(idx, -1, axis=1)

    def loss(cfg, p):
        logits = GPT(cfg).apply({"params": p}, idx)[0][..., :VOCAB]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[..., None], -1).mean()

    base_loss, grads = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
    stacked = stack_layers(params, cfg.n_layer)
    scanned = dataclasses.replace(cfg, scan_layers=True)
    np.testing.assert_allclose(logits_of(scanned, stacked, idx)[..., :VOCAB], want[..., :VOCAB], rtol=1e-5, atol=1e-5)
    # Rematerialised (scanned, and looped): the same logits and the same gradients, layer by layer.
    for other, p in ((dataclasses.replace(scanned, remat="full"), stacked), (dataclasses.replace(cfg, remat="minimal"), params)):
        got = jax.jit(jax.value_and_grad(lambda p: loss(other, p)))(p)
        assert float(got[0]) == pytest.approx(float(base_loss), rel=1e-5)
        want_grads = stack_layers(grads, cfg.n_layer) if other.scan_layers else grads
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got[1])[0], jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                       err_msg=f"remat={other.remat} scan={other.scan_layers} {jax.tree_util.keystr(path)}")
    # The scanned tree really is stacked: one "h" whose leaves carry the layer axis.
    shapes = jax.eval_shape(lambda: init_params(scanned, jax.random.key(0)))
    assert "h" in shapes and "h_0" not in shapes
    assert all(x.value.shape[0] == cfg.n_layer for x in jax.tree.leaves(shapes["h"], is_leaf=lambda x: hasattr(x, "value")))


def _built_size(cfg) -> int:
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "value")))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("scan", [False, True])
def test_plan_n_params_equals_the_built_count(name, scan):
    cfg = variant(name, scan_layers=scan)
    assert n_params(cfg) == _built_size(cfg)


def test_param_counts_of_an_untied_model():
    cfg = variant("modern")
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    sizes = {k: sum(int(np.prod(x.value.shape)) for x in jax.tree.leaves(v, is_leaf=lambda x: hasattr(x, "value")))
             for k, v in shapes.items()}
    assert "lm_head" in sizes and "wpe" not in sizes  # untied, rope
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    blocks = sum(v for k, v in sizes.items() if k not in ("wte", "lm_head"))
    counts = param_counts(cfg, shapes)
    assert counts["total"] == sum(sizes.values()) - 2 * padding
    assert counts["non_embedding"] == blocks  # neither the token embedding nor the head
    assert counts["matmul"] == blocks + cfg.vocab_size * cfg.n_embd  # the head multiplies; wte is only looked up


# ---------------------------------------------------------------------------------------------- sharding

# (extra flags, mesh) per run: Muon (and AdamW for the embeddings, head and norms) on data=2 x fsdp=2 x tensor=2,
# the 2 key/value heads split over tensor. (One run: each costs two compilations of the step.)
SHARDED_RUNS = {"muon": (["--optimizer=muon"], "2,2,2")}


def _sharded_main(out: str, data_dir: str, single: bool) -> None:
    """Script mode: tests/sharded_steps.py's run_steps for the modern variant, each run on its mesh (or on one
    device when `single`)."""
    from tests import sharded_steps

    result = {}
    base = sharded_steps.TINY_TP
    for run, (extra, mesh) in SHARDED_RUNS.items():
        sharded_steps.TINY_TP = [*base, *flags({k: v for k, v in MODERN.items() if k != "n_head"}), *extra]
        for m in ["1,1,1"] if single else [mesh]:
            losses, params, *_ = sharded_steps.run_steps(data_dir, tuple(int(v) for v in m.split(",")))
            result[f"{run} {m}"] = losses
            np.savez(f"{out}.{run}.{m.replace(',', '_')}.npz", **params)
    Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_modern_train_step_sharded_equals_single_device(data_dir, tmp_path):
    from tests.sharded_steps import TINY_TP

    assert "--n_head=4" in TINY_TP and MODERN["n_head"] == 4
    out = tmp_path / "result"
    for devices in (8, 1):
        r = subprocess.run([sys.executable, __file__, f"{out}.{devices}", str(data_dir), str(devices == 1)],
                           env=simulated_devices_env(devices), capture_output=True, text=True, timeout=900, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
    losses = {**json.loads(Path(f"{out}.8").read_text()), **json.loads(Path(f"{out}.1").read_text())}
    for run, (_, m) in SHARDED_RUNS.items():
        one = dict(np.load(f"{out}.1.{run}.1_1_1.npz"))
        assert any("c_kv" in k for k in one) and any("lm_head" in k for k in one)  # the modern tree
        np.testing.assert_allclose(losses[f"{run} {m}"], losses[f"{run} 1,1,1"], rtol=1e-5, err_msg=run)
        got = dict(np.load(f"{out}.8.{run}.{m.replace(',', '_')}.npz"))
        assert got.keys() == one.keys()
        for name, value in one.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=f"{run} {m} {name}")


# ---------------------------------------------------------------------------------------------- the CLI

MODERN_FLAGS = flags(MODERN)


@pytest.mark.slow
def test_modern_muon_run_resumes_exactly_samples_and_refuses_export(data_dir, tmp_path, capsys):
    from gpt.checkpoint import load_params
    from gpt.cli import run_sample, run_train
    from gpt.config import MeshConfig

    common = [*TINY, f"--data_dir={data_dir}", *MODERN_FLAGS, "--optimizer=muon", "--max_iters=8",
              "--warmup_iters=2", "--lr_decay_iters=8", "--checkpoint_interval=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train([*common, f"--out_dir={full}"]) == 0
    assert run_train([*common, f"--out_dir={part}", "--max_iters=4"]) == 0
    assert run_train([f"--out_dir={part}", "--init_from=resume", "--max_iters=8"]) == 0
    rows = lambda d: [json.loads(line) for line in open(d / "metrics.jsonl")]
    train = lambda d: {r["step"]: r["loss"] for r in rows(d) if "loss" in r}
    assert train(full)[7] < train(full)[0]  # it trains
    assert [s for s in train(part) if s >= 4] == [4, 5, 6, 7]
    for s in (4, 5, 6, 7):
        assert train(part)[s] == train(full)[s]  # bit-identical on CPU
    cfg, a, _, step_a = load_params(str(full), -1, MeshConfig())
    _, b, _, step_b = load_params(str(part), -1, MeshConfig())
    assert step_a == step_b == 8 and cfg.n_kv_head == MODERN["n_kv_head"] and not cfg.tie_embeddings
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    capsys.readouterr()

    code, out, err = run_command(run_sample, [f"--out_dir={full}", "--max_new_tokens=8", "--num_samples=2",
                                              "--json=True"], capsys)
    assert code == 0, err
    samples = [json.loads(line) for line in out.splitlines()]
    assert len(samples) == 2 and all(len(s["tokens"]) == 8 for s in samples)

    r = subprocess.run([sys.executable, "-m", "gpt.cli", "export", f"--out_dir={full}", f"--to={tmp_path / 'hf'}"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)  # as the user runs it
    errors = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:"), r.stderr
    for key in ("norm=rmsnorm", "position=rope", "mlp=swiglu", "qk_norm=True", "tie_embeddings=False",
                f"n_kv_head={MODERN['n_kv_head']}", "bias=False"):
        assert key in errors[0], (key, errors[0])
    assert not (tmp_path / "hf" / "model.safetensors").exists()

    code, out, err = run_command(run_train, [f"--out_dir={full}", "--init_from=resume", "--max_iters=12",
                                             "--optimizer=adamw"], capsys)
    errors = err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "optimizer" in errors[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("argv, key", [
    (["--norm=batchnorm"], "norm"),
    (["--position=alibi"], "position"),
    (["--mlp=tanh"], "mlp"),
    (["--n_head=4", "--n_kv_head=3"], "n_kv_head"),
    (["--n_head=4", "--n_kv_head=-1"], "n_kv_head"),
    (["--n_head=4", "--n_embd=36", "--position=rope"], "position"),
    (["--logit_softcap=-1"], "logit_softcap"),
    (["--rope_theta=0"], "rope_theta"),
    (["--optimizer=sgd"], "optimizer"),
    (["--schedule=step"], "schedule"),
    (["--muon_learning_rate=0"], "muon_learning_rate"),
    (["--muon_momentum=1"], "muon_momentum"),
])
def test_bad_values_are_refused_naming_the_key(argv, key):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(argv)
    # The same keys with good values pass: the refusal is about the value.
    good = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "n_kv_head": "2", "logit_softcap": "30",
            "rope_theta": "500", "optimizer": "muon", "schedule": "linear", "muon_learning_rate": "0.01",
            "muon_momentum": "0.9"}
    load_config([*(a for a in argv if not a.startswith(f"--{key}=") and not a.startswith("--n_embd")),
                 f"--{key}={good[key]}"])


if __name__ == "__main__":
    _sharded_main(sys.argv[1], sys.argv[2], sys.argv[3] == "True")
