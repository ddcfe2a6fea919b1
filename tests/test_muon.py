"""optimizer=muon and schedule=linear (gpt/optim.py) against independent references.

What is checked against what:
- make_optimizer(optimizer=muon) + apply_updates, 3 steps on a tiny GPT's real parameter tree with random
  gradients (clipped on some steps), against `numpy_muon`: float64 numpy of Muon as Jordan et al. (2024) and
  optax.contrib.scale_by_muon define it (Nesterov momentum with optax's bias correction, 5 quintic Newton-Schulz
  steps on X = G / (||G||_F + eps), transposed when it has more rows than columns), each block matrix taken the
  way a layer uses it (c_attn's q, k and v each an [embed, heads * head_dim] matrix; attention's c_proj
  [heads * head_dim, embed]; SwiGLU's gate and up separately; with scan_layers each layer separately), scaled by
  sqrt(max(1, fan_out / fan_in)), plus decoupled weight decay, at muon_learning_rate; and every other parameter
  against tests/test_optim.py's numpy_adamw. A planted bug (q, k and v orthogonalised as one matrix) moves the
  reference far beyond the tolerance, so the check can tell.
- which parameters Muon updates, by path, for three trees.
- lr_schedule(schedule=linear) against `linear_lr`, plain Python: nanoGPT's warmup, then a straight line from
  learning_rate to min_lr at lr_decay_iters, then flat.
- a train step with optimizer=muon lowers the loss of a repeated batch (behaviour).
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.config import load_config
from gpt.model import init_params
from gpt.optim import MuonView, lr_schedule, muon_views
from tests.helpers import tiny_model_config
from tests.test_optim import flat, hand_made, numpy_adamw, run_optimizer, schedule_steps

NS_COEFFS = (3.4445, -4.775, 2.0315)  # Jordan et al.'s quintic, optax's default
NS_STEPS = 5
NS_EPS = 1e-8


# ---------------------------------------------------------------------------------------------- references

def newton_schulz(g: np.ndarray, coeffs=NS_COEFFS, steps: int = NS_STEPS) -> np.ndarray:
    """Muon's approximate orthogonalisation of one matrix, in float64."""
    x = g / (np.linalg.norm(g) + NS_EPS)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    a, b, c = coeffs
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def orthogonalise_matrix(m: np.ndarray) -> np.ndarray:
    """Newton-Schulz of one [fan_in, fan_out] matrix, times Muon's sqrt(max(1, fan_out / fan_in))."""
    return newton_schulz(m) * math.sqrt(max(1.0, m.shape[1] / m.shape[0]))


def orthogonalise(name: str, m: np.ndarray, stacked: bool, qkv_as_one: bool = False) -> np.ndarray:
    """Muon's update of the block parameter `name` (a path a/b/c) from its momentum m, each matrix the way the
    layer multiplies by it. stacked: a leading layer axis (scan_layers), each layer its own matrices.
    qkv_as_one: the planted bug, c_attn's q, k and v orthogonalised as one [embed, 3 * heads * hd] matrix."""
    if stacked:
        return np.stack([orthogonalise(name, layer, False, qkv_as_one) for layer in m])
    layer = name.split("/")[-3:-1]
    if layer == ["attn", "c_attn"] and qkv_as_one:
        return orthogonalise_matrix(m.reshape(m.shape[0], -1)).reshape(m.shape)
    if layer in (["attn", "c_attn"], ["attn", "c_kv"]):  # [embed, q/k/v (or k/v), heads, hd]: each one a matrix
        return np.stack([orthogonalise_matrix(m[:, i].reshape(m.shape[0], -1)).reshape(m[:, i].shape)
                         for i in range(m.shape[1])], axis=1)
    if layer == ["attn", "c_q"]:  # [embed, heads, hd]
        return orthogonalise_matrix(m.reshape(m.shape[0], -1)).reshape(m.shape)
    if layer == ["attn", "c_proj"]:  # [heads, hd, embed]: the heads' outputs, concatenated, project to embed
        return orthogonalise_matrix(m.reshape(-1, m.shape[-1])).reshape(m.shape)
    if layer == ["mlp", "c_fc"] and m.ndim == 3:  # SwiGLU's [embed, gate/up, hidden]: two matrices
        return np.stack([orthogonalise_matrix(m[:, i]) for i in range(m.shape[1])], axis=1)
    assert layer in (["mlp", "c_fc"], ["mlp", "c_proj"]) and m.ndim == 2, name
    return orthogonalise_matrix(m)


def is_muon(name: str) -> bool:
    """The block matrices Muon trains: every kernel of attention and the MLP (not embeddings, head, norms, biases)."""
    parts = name.split("/")
    return parts[-1] == "kernel" and parts[-3] in ("attn", "mlp")


def numpy_muon(params: dict, grads_per_step: list[dict], o, lrs: list[float], stacked: bool,
               qkv_as_one: bool = False) -> list[dict]:
    """Parameters after each step: global-norm clipping, then Muon for the block matrices and AdamW (numpy_adamw)
    for the rest, on flat {path: float64 array} dicts."""
    clipped = []
    for g in grads_per_step:
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        scale = o.grad_clip / norm if o.grad_clip > 0 and norm >= o.grad_clip else 1.0
        clipped.append({k: x * scale for k, x in g.items()})
    # AdamW for the others; numpy_adamw decays by the path's last name, and the untied head is a weight matrix.
    rename = lambda k: "lm_head/kernel" if k == "lm_head" else k
    adam_o = copy.copy(o)
    adam_o.grad_clip = 0.0  # clipped above, over every gradient
    adam_keys = [k for k in params if not is_muon(k)]
    adam_history, _, _ = numpy_adamw({rename(k): params[k] for k in adam_keys},
                                     [{rename(k): g[k] for k in adam_keys} for g in clipped], adam_o, lrs)
    beta, p = o.muon_momentum, {k: v.copy() for k, v in params.items() if is_muon(k)}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    history = []
    for t, (g, adam_p, lr) in enumerate(zip(clipped, adam_history, lrs), start=1):
        new = {}
        for k in p:
            mu[k] = beta * mu[k] + (1 - beta) * g[k]
            nesterov = beta * mu[k] / (1 - beta ** (t + 1)) + (1 - beta) * g[k] / (1 - beta ** t)  # as optax
            update = orthogonalise(k, nesterov, stacked, qkv_as_one) + o.weight_decay * p[k]
            new[k] = p[k] - lr * o.muon_learning_rate / o.learning_rate * update  # the schedule, at Muon's own peak
        p = new
        history.append({**p, **{k: adam_p[rename(k)] for k in adam_keys}})
    return history


def linear_lr(it: int, o) -> float:
    """nanoGPT's warmup, then a straight line from learning_rate at warmup_iters to min_lr at lr_decay_iters,
    then min_lr; decay_lr=False holds learning_rate after the warmup."""
    if it < o.warmup_iters:
        return o.learning_rate * (it + 1) / (o.warmup_iters + 1)
    if not o.decay_lr:
        return o.learning_rate
    if it > o.lr_decay_iters:
        return o.min_lr
    if o.lr_decay_iters == o.warmup_iters:  # no room to decay: the peak holds for that one step, as cosine does
        return o.learning_rate
    return o.learning_rate - (o.learning_rate - o.min_lr) * (it - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters)


# ---------------------------------------------------------------------------------------------- the optimizer

TREES = {
    "default": {},
    "gqa_swiglu_untied": {"n_head": 4, "n_kv_head": 2, "mlp": "swiglu", "tie_embeddings": False},
    "scan_layers": {"scan_layers": True},
    "scan_gqa_swiglu_untied": {"scan_layers": True, "n_head": 4, "n_kv_head": 2, "mlp": "swiglu",
                               "tie_embeddings": False},
}


def gpt_params(name: str) -> dict:
    """The real parameter tree of the tiny model with TREES[name]'s changes, random values (only the tree's
    paths and shapes matter to the optimizer; shapes via eval_shape, nothing is initialised)."""
    cfg = tiny_model_config(**TREES[name])
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.value.shape), jnp.float32), shapes,
                        is_leaf=lambda x: hasattr(x, "value"))


def muon_config():
    o = load_config(["--optimizer=muon", "--learning_rate=3e-3", "--muon_learning_rate=0.05", "--muon_momentum=0.9",
                     "--weight_decay=0.2", "--grad_clip=1.0", "--beta1=0.8", "--beta2=0.95", "--warmup_iters=1",
                     "--max_iters=10"]).optim
    return o


def random_grads(params, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * 0.01 * rng.standard_normal(x.shape), jnp.float32), params)


@pytest.mark.parametrize("tree", ["default", "scan_layers", "scan_gqa_swiglu_untied"])
def test_muon_steps_match_numpy(tree):
    o = muon_config()
    params = gpt_params(tree)
    grads = [random_grads(params, seed, scale) for seed, scale in ((1, 1.0), (2, 30.0), (3, 0.3))]
    norms = [float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(x)))) for x in grads]
    assert min(norms) < o.grad_clip < max(norms)  # clipping both taken and not
    lrs = [float(lr_schedule(o)(i)) for i in range(len(grads))]
    assert len(set(lrs)) > 1  # warmup and peak

    got, _ = run_optimizer(o, params, grads)
    stacked = "h" in params
    want = numpy_muon(flat(params), [flat(g) for g in grads], o, lrs, stacked)
    assert any(is_muon(k) for k in want[0]) and any(not is_muon(k) for k in want[0])
    for i, (got_params, want_params) in enumerate(zip(got, want)):
        got_flat = flat(got_params)
        assert got_flat.keys() == want_params.keys()
        for name, value in got_flat.items():
            np.testing.assert_allclose(value, want_params[name], rtol=1e-5, atol=2e-6, err_msg=f"step {i + 1}, {name}")

    if "gqa" not in tree:  # the planted bug needs c_attn (grouped-query attention has c_q and c_kv)
        wrong = numpy_muon(flat(params), [flat(g) for g in grads], o, lrs, stacked, qkv_as_one=True)
        c_attn = [k for k in want[0] if k.endswith("attn/c_attn/kernel")]
        assert c_attn and max(np.abs(wrong[0][k] - want[0][k]).max() for k in c_attn) > 100 * 2e-6


def test_newton_schulz_reference_nearly_orthogonalises():
    """The reference does what Muon's authors say the quintic does: singular values pushed into about
    (0.5, 1.5) (not exactly 1), the singular vectors kept; for a wide and a tall matrix alike."""
    rng = np.random.default_rng(0)
    for shape in ((16, 48), (48, 16)):
        g = rng.standard_normal(shape) @ np.diag(np.geomspace(1, 1e-1, shape[1]))
        x = newton_schulz(g)
        s = np.linalg.svd(x, compute_uv=False)
        assert s.min() > 0.5 and s.max() < 1.5, s
        u, _, vt = np.linalg.svd(g, full_matrices=False)
        d = u.T @ x @ vt.T  # X = U p(S) V^T: diagonal in G's singular bases
        np.testing.assert_allclose(d, np.diag(np.diag(d)), atol=1e-8)
        np.testing.assert_allclose(x, u @ d @ vt, atol=1e-8)


# The block matrices Muon updates, by path, with the block index as {i}; every other parameter is AdamW's.
MUON_PATHS = {
    "default": ["h_{i}/attn/c_attn/kernel", "h_{i}/attn/c_proj/kernel", "h_{i}/mlp/c_fc/kernel",
                "h_{i}/mlp/c_proj/kernel"],
    "gqa_swiglu_untied": ["h_{i}/attn/c_q/kernel", "h_{i}/attn/c_kv/kernel", "h_{i}/attn/c_proj/kernel",
                          "h_{i}/mlp/c_fc/kernel", "h_{i}/mlp/c_proj/kernel"],
    "scan_layers": ["h/attn/c_attn/kernel", "h/attn/c_proj/kernel", "h/mlp/c_fc/kernel", "h/mlp/c_proj/kernel"],
}


@pytest.mark.parametrize("tree", MUON_PATHS)
def test_muon_updates_exactly_the_block_matrices(tree):
    params = gpt_params(tree)
    n_layer = tiny_model_config().n_layer
    views = jax.tree_util.tree_flatten_with_path(muon_views(params),
                                                 is_leaf=lambda x: x is None or isinstance(x, MuonView))[0]
    names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, view in views if view is not None}
    want = {p.format(i=i) for p in MUON_PATHS[tree] for i in range(n_layer)}
    assert names == want
    assert set(flat(params)) > want  # and the rest (embeddings, norms, biases, an untied head) are AdamW's
    if tree == "gqa_swiglu_untied":
        assert "lm_head" in flat(params) and "lm_head" not in names


# ---------------------------------------------------------------------------------------------- linear schedule

LINEAR_CONFIGS = {
    "defaults": lambda: hand_made(schedule="linear"),
    "decay_before_end": lambda: hand_made(schedule="linear", learning_rate=1e-3, warmup_iters=10, lr_decay_iters=100,
                                          min_lr=1e-4, max_iters=300),
    "no_warmup_to_zero": lambda: hand_made(schedule="linear", learning_rate=3e-3, warmup_iters=0, lr_decay_iters=50,
                                           min_lr=0),
    "decay_ends_at_warmup": lambda: hand_made(schedule="linear", learning_rate=1e-3, warmup_iters=10,
                                              lr_decay_iters=10, min_lr=1e-4),
    "one_step_decay": lambda: hand_made(schedule="linear", learning_rate=1e-3, warmup_iters=10, lr_decay_iters=11,
                                        min_lr=1e-4),
    "decay_lr_off": lambda: hand_made(schedule="linear", decay_lr=False),
}


@pytest.mark.parametrize("name", list(LINEAR_CONFIGS))
def test_linear_schedule_matches_the_reference(name):
    o = LINEAR_CONFIGS[name]()
    steps = schedule_steps(o)
    got = np.asarray(jax.jit(lr_schedule(o))(jnp.asarray(steps, jnp.int32)), np.float64)
    np.testing.assert_allclose(got, [linear_lr(s, o) for s in steps], rtol=2e-6, atol=1e-6 * o.learning_rate,
                               err_msg=f"{name}: {steps}")  # float32 cancellation near min_lr=0


def test_linear_schedule_is_a_straight_line():
    o = hand_made(schedule="linear", learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4)
    lrs = np.asarray(lr_schedule(o)(jnp.arange(o.warmup_iters, o.lr_decay_iters + 1)), np.float64)
    np.testing.assert_allclose(np.diff(lrs), (o.min_lr - o.learning_rate) / (o.lr_decay_iters - o.warmup_iters),
                               rtol=1e-3)
    cosine = lr_schedule(hand_made(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4))
    assert float(cosine(30)) > float(lr_schedule(o)(30))  # cosine holds high early; the line does not


# ---------------------------------------------------------------------------------------------- behaviour

def test_muon_train_step_lowers_the_loss_of_a_repeated_batch(tiny_cfg):
    from gpt import sharding
    from gpt.steps import build, make_train_step

    cfg = tiny_cfg("--optimizer=muon", "--max_iters=20", "--warmup_iters=2")
    mesh = sharding.make_mesh(cfg.mesh)
    with sharding.activate(mesh):
        model, tx, _, _, init = build(cfg, mesh)
        state = init(jax.random.key(0))
        step = jax.jit(make_train_step(model, tx, cfg))
        x = jax.random.randint(jax.random.key(1), (1, cfg.data.batch_size, cfg.model.block_size + 1), 0, 256)
        batch = (x[..., :-1], x[..., 1:])
        losses = []
        for _ in range(cfg.train.max_iters):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[0] > math.log(256) - 0.5  # about uniform at initialisation
    assert np.all(np.diff(losses) < 0), losses  # down on every step (a small learning rate, one batch)
    assert losses[-1] < losses[0] - 0.5, losses  # by a good part of a nat in 20 steps
    assert all(np.isfinite(losses))
