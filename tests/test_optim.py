"""The optimizer (gpt/optim.py) and the config values it runs on, against independent references.

What is checked against what:
- lr_schedule: against `nanogpt_lr`, a plain-Python copy of nanoGPT's get_lr (linear warmup
  lr * (it + 1) / (warmup_iters + 1), cosine from learning_rate to min_lr, then min_lr), on the resolved
  default config, the gpt2_124m preset and hand-made configs. With decay_lr=False this project warms up
  and then holds learning_rate (nanoGPT skips the warmup too there); the reference follows this project.
- decay_mask: against an explicit list of the decayed parameter paths of a real 2-layer GPT.
- make_optimizer + apply_updates: against `numpy_adamw`, a float64 numpy AdamW (clipping by global norm,
  Adam with bias correction and eps=1e-8, decoupled weight decay scaled by the learning rate, the mask).
- clipping: through the first moment Adam keeps (mu = (1 - beta1) * clipped gradient after one step).
- the train step (gpt/steps.py): the parameters it writes against numpy, and the lr it logs against the reference.
- resolve: the automatic (-1 / 0) values against what --help and the README promise.
"""

import copy
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt.config import Config, ModelConfig, OptimConfig, help_text, load_config, load_preset, parse_args, resolve
from gpt.model import GPT
from gpt.optim import apply_updates, decay_mask, lr_schedule, make_optimizer
from gpt.steps import TrainState, loss_fn, make_train_step

README = Path(__file__).resolve().parent.parent / "README.md"
ADAM_EPS = 1e-8  # optax.scale_by_adam's default, and torch.optim.AdamW's (nanoGPT's optimizer)


# ---------------------------------------------------------------------------------------------- references

def nanogpt_lr(it: int, o: OptimConfig) -> float:
    """nanoGPT's get_lr(it), in plain Python floats; decay_lr=False holds learning_rate after the warmup."""
    if it < o.warmup_iters:
        return o.learning_rate * (it + 1) / (o.warmup_iters + 1)
    if not o.decay_lr:
        return o.learning_rate
    if it > o.lr_decay_iters:
        return o.min_lr
    if o.lr_decay_iters == o.warmup_iters:  # nanoGPT divides by zero here; the peak holds for that one step
        return o.learning_rate
    decay_ratio = (it - o.warmup_iters) / (o.lr_decay_iters - o.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return o.min_lr + coeff * (o.learning_rate - o.min_lr)


def wsd_lr(it: int, o: OptimConfig) -> float:
    """Warmup-stable-decay (Hägele et al. 2024) in plain Python: nanoGPT's warmup, the peak held, then a
    straight line from learning_rate down to min_lr over the last cooldown_frac of lr_decay_iters."""
    if it < o.warmup_iters:
        return o.learning_rate * (it + 1) / (o.warmup_iters + 1)
    if not o.decay_lr:
        return o.learning_rate
    cooldown_steps = round(o.cooldown_frac * o.lr_decay_iters)
    into_cooldown = it - (o.lr_decay_iters - cooldown_steps)
    if into_cooldown <= 0:
        return o.learning_rate
    if into_cooldown >= cooldown_steps:
        return o.min_lr
    return o.learning_rate - (o.learning_rate - o.min_lr) * into_cooldown / cooldown_steps


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def is_decayed(name: str) -> bool:
    """The rule the optimizer must follow: weight matrices and embeddings only."""
    return name.rsplit("/", 1)[-1] in ("kernel", "embedding")


def flat(tree) -> dict[str, np.ndarray]:
    """{'a/b/kernel': float64 array} for every leaf of a pytree of dicts."""
    return {path_name(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def numpy_adamw(params: dict, grads_per_step: list[dict], o: OptimConfig, lrs: list[float]):
    """AdamW in float64 (torch.optim.AdamW's / optax.adamw's algorithm) on flat {path: array} dicts.
    Returns the parameters after each step and the final first and second moments."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    history = []
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        if o.grad_clip > 0:
            norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
            scale = o.grad_clip / norm if norm >= o.grad_clip else 1.0
            g = {k: x * scale for k, x in g.items()}
        new_p = {}
        for k in p:
            m[k] = o.beta1 * m[k] + (1 - o.beta1) * g[k]
            v2[k] = o.beta2 * v2[k] + (1 - o.beta2) * g[k] ** 2
            m_hat = m[k] / (1 - o.beta1 ** t)
            v_hat = v2[k] / (1 - o.beta2 ** t)
            direction = m_hat / (np.sqrt(v_hat) + ADAM_EPS)
            decay = o.weight_decay * p[k] if is_decayed(k) else 0.0
            new_p[k] = p[k] - lr * (direction + decay)
        p = new_p
        history.append(p)
    return history, m, v2


def adam_state(opt_state):
    """The ScaleByAdamState inside the chain's state, wherever the chain puts it."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, opt_state
    return found[0]


def optim_config(**overrides) -> OptimConfig:
    o = OptimConfig(learning_rate=1e-2, weight_decay=0.3, beta1=0.8, beta2=0.95, grad_clip=1.0,
                    warmup_iters=2, lr_decay_iters=6, min_lr=1e-3)
    for key, value in overrides.items():
        setattr(o, key, value)
    return o


def small_tree(rng: np.random.Generator, scale: float = 1.0) -> dict:
    """A GPT-shaped pytree: a matrix, its bias, a LayerNorm, an embedding (float32, as the params)."""
    shapes = {"h_0": {"mlp": {"c_fc": {"kernel": (4, 3), "bias": (3,)}},
                      "ln_1": {"scale": (4,), "bias": (4,)}},
              "wte": {"embedding": (5, 4)}}
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def run_optimizer(o: OptimConfig, params, grads_per_step, first_step: int = 0):
    """The project's optimizer, step by step as the train step runs it; returns params after each step."""
    tx, schedule = make_optimizer(o), lr_schedule(o)

    @jax.jit
    def step(params, opt_state, grads, it):
        direction, opt_state = tx.update(grads, opt_state, params)
        return apply_updates(params, direction, schedule(it)), opt_state

    opt_state, history = tx.init(params), []
    for i, grads in enumerate(grads_per_step):
        params, opt_state = step(params, opt_state, grads, jnp.int32(first_step + i))
        history.append(params)
    return history, opt_state


# ---------------------------------------------------------------------------------------------- schedule

def schedule_steps(o: OptimConfig) -> list[int]:
    w, d = o.warmup_iters, o.lr_decay_iters
    steps = {0, 1, w - 1, w, w + 1, (w + d) // 2, (3 * w + d) // 4, d - 1, d, d + 1, 2 * d + 7}
    return sorted(s for s in steps if s >= 0)


def hand_made(**kw) -> OptimConfig:
    return load_config([f"--{k}={v}" for k, v in kw.items()]).optim


SCHEDULE_CONFIGS = {
    "defaults": lambda: load_config([]).optim,
    "gpt2_124m": lambda: load_config(["gpt2_124m"]).optim,
    "defaults_long_run": lambda: load_config(["--max_iters=5000", "--learning_rate=6e-4"]).optim,
    "decay_before_end": lambda: hand_made(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=100, min_lr=1e-4,
                                          max_iters=300),
    "no_warmup": lambda: hand_made(learning_rate=3e-3, warmup_iters=0, lr_decay_iters=50, min_lr=0),
    "one_step_warmup": lambda: hand_made(learning_rate=1e-3, warmup_iters=1, lr_decay_iters=20),
    "decay_ends_at_warmup": lambda: hand_made(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=10, min_lr=1e-4),
    "one_step_decay": lambda: hand_made(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=11, min_lr=1e-4),
    "decay_lr_off": lambda: hand_made(learning_rate=1e-3, warmup_iters=10, decay_lr=False),
    "decay_lr_off_defaults": lambda: hand_made(decay_lr=False),
}


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_lr_schedule_matches_nanogpt_get_lr(name):
    o = SCHEDULE_CONFIGS[name]()
    steps = schedule_steps(o)
    got = np.asarray(jax.jit(lr_schedule(o))(jnp.asarray(steps, jnp.int32)), np.float64)
    want = np.array([nanogpt_lr(s, o) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"{name}: steps {steps}")
    # the same values from a Python int step (as the loop may call it) as from a traced one
    assert float(lr_schedule(o)(steps[-1])) == pytest.approx(want[-1], rel=2e-6)


WSD_CONFIGS = {
    "defaults": lambda: hand_made(schedule="wsd"),
    "half_cooldown": lambda: hand_made(schedule="wsd", cooldown_frac=0.5, learning_rate=1e-3, min_lr=0,
                                       warmup_iters=7, max_iters=333),
    "all_cooldown_no_warmup": lambda: hand_made(schedule="wsd", cooldown_frac=1.0, warmup_iters=0, max_iters=50),
    "decay_before_end": lambda: hand_made(schedule="wsd", lr_decay_iters=100, max_iters=300, warmup_iters=5),
    "one_step_cooldown": lambda: hand_made(schedule="wsd", cooldown_frac=0.01, max_iters=100, warmup_iters=3),
    "decay_lr_off": lambda: hand_made(schedule="wsd", decay_lr=False),
}


@pytest.mark.parametrize("name", list(WSD_CONFIGS))
def test_wsd_schedule_matches_the_reference(name):
    o = WSD_CONFIGS[name]()
    cool = o.lr_decay_iters - round(o.cooldown_frac * o.lr_decay_iters)
    steps = sorted({*schedule_steps(o), cool - 1, cool, cool + 1, (cool + o.lr_decay_iters) // 2} - {-1})
    got = np.asarray(jax.jit(lr_schedule(o))(jnp.asarray(steps, jnp.int32)), np.float64)
    np.testing.assert_allclose(got, [wsd_lr(s, o) for s in steps], rtol=2e-6, atol=1e-6 * o.learning_rate,
                               err_msg=f"{name}: {steps}")  # float32 cancellation near min_lr=0


def test_wsd_runs_of_any_length_agree_until_the_shorter_ones_cooldown():
    """What a WSD sweep relies on: a branch of max_iters=n continued from a longer run's checkpoint at
    cooldown_start(n) saw exactly the learning rates it would have seen running alone."""
    long, short = hand_made(schedule="wsd", max_iters=1000, warmup_iters=20), hand_made(
        schedule="wsd", max_iters=400, warmup_iters=20)
    branch_at = short.lr_decay_iters - round(short.cooldown_frac * short.lr_decay_iters)
    steps = jnp.arange(branch_at + 1)
    np.testing.assert_array_equal(lr_schedule(long)(steps), lr_schedule(short)(steps))
    assert float(lr_schedule(short)(branch_at + 1)) < float(lr_schedule(long)(branch_at + 1))


def test_lr_schedule_shape_on_the_default_run():
    """The reference itself, pinned to the documented shape: 1/(warmup+1) of the peak at step 0, the peak right
    after the warmup, the cosine's midpoint halfway, min_lr at lr_decay_iters and flat beyond."""
    o = load_config([]).optim
    lr = lr_schedule(o)
    assert float(lr(o.warmup_iters)) == pytest.approx(o.learning_rate, rel=1e-6)
    mid = (o.warmup_iters + o.lr_decay_iters) / 2  # halfway through the decay (the schedule takes any step)
    assert float(lr(mid)) == pytest.approx((o.learning_rate + o.min_lr) / 2, rel=1e-5)
    assert float(lr(o.lr_decay_iters)) == pytest.approx(o.min_lr, rel=1e-6)
    assert float(lr(10 * o.lr_decay_iters)) == pytest.approx(o.min_lr, rel=1e-6)
    assert float(lr(0)) == pytest.approx(o.learning_rate / (o.warmup_iters + 1), rel=1e-6)


# ---------------------------------------------------------------------------------------------- decay mask

EXPECTED_DECAYED_2_LAYERS = {
    "wte/embedding", "wpe/embedding",
    *(f"h_{i}/{module}/kernel" for i in range(2)
      for module in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")),
}


@pytest.fixture(scope="module")
def gpt_params():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256))
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])


def test_decay_mask_on_the_gpt_parameter_tree(gpt_params):
    mask = {path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(gpt_params))[0]}
    assert set(mask) == set(flat(gpt_params))
    assert all(isinstance(m, bool) for m in mask.values())
    decayed = {name for name, m in mask.items() if m}
    assert decayed == EXPECTED_DECAYED_2_LAYERS
    kept = set(mask) - decayed
    assert kept and all(name.endswith(("/bias", "/scale")) for name in kept), kept
    assert {f"h_{i}/{ln}/{leaf}" for i in range(2) for ln in ("ln_1", "ln_2") for leaf in ("scale", "bias")} \
        | {"ln_f/scale", "ln_f/bias"} <= kept


def test_decay_mask_on_the_stacked_layout_of_scan_layers():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256, scan_layers=True))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    mask = {path_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    decayed = {name for name, m in mask.items() if m}
    assert decayed == {"wte/embedding", "wpe/embedding",
                       *(f"h/{module}/kernel" for module in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"))}
    assert all(name.endswith(("/bias", "/scale")) for name in set(mask) - decayed)


def test_optimizer_decays_exactly_the_masked_leaves(gpt_params):
    """Zero gradients: Adam's direction is 0, so what the chain returns is the weight decay alone."""
    o = optim_config(weight_decay=0.5)
    tx = make_optimizer(o)
    zeros = jax.tree.map(jnp.zeros_like, gpt_params)
    direction, _ = jax.jit(tx.update)(zeros, tx.init(gpt_params), gpt_params)
    params, directions = flat(gpt_params), flat(direction)
    for name, d in directions.items():
        want = o.weight_decay * params[name] if name in EXPECTED_DECAYED_2_LAYERS else np.zeros_like(d)
        np.testing.assert_allclose(d, want, rtol=1e-6, atol=0, err_msg=name)


# ---------------------------------------------------------------------------------------------- AdamW

@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_adamw_steps_match_numpy(grad_clip):
    """Five steps across warmup and decay, gradients of varied size (some clipped when grad_clip > 0) and a
    bias whose gradients are near Adam's eps, against numpy_adamw with the reference schedule."""
    o = optim_config(grad_clip=grad_clip)
    rng = np.random.default_rng(0)
    params = small_tree(rng)
    grads = [small_tree(rng, scale) for scale in (0.1, 2.0, 0.05, 1.0, 0.3)]
    grads[0]["h_0"]["ln_1"]["bias"] = jnp.asarray([3e-8, -1e-8, 2e-9, 5e-8], jnp.float32)
    first_step = 1
    lrs = [nanogpt_lr(first_step + i, o) for i in range(len(grads))]
    assert len(set(lrs)) == len(lrs)  # warmup, peak and decay all taken

    got, opt_state = run_optimizer(o, params, grads, first_step)
    want, mu, nu = numpy_adamw(flat(params), [flat(g) for g in grads], o, lrs)
    for i, (got_params, want_params) in enumerate(zip(got, want)):
        for name, value in flat(got_params).items():
            np.testing.assert_allclose(value, want_params[name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"step {i + 1}, {name}")
    state = adam_state(opt_state)
    for name, value in flat(state.mu).items():
        np.testing.assert_allclose(value, mu[name], rtol=1e-5, atol=1e-9, err_msg=name)
    for name, value in flat(state.nu).items():
        np.testing.assert_allclose(value, nu[name], rtol=1e-5, atol=1e-12, err_msg=name)


def test_first_adamw_step_in_closed_form():
    """After one step Adam's bias-corrected direction is g / (|g| + eps) whatever the betas, so the update is
    lr * (g / (|g| + eps) + weight_decay * p) on matrices and embeddings, lr * g / (|g| + eps) elsewhere."""
    o = optim_config(grad_clip=0.0, weight_decay=0.2)
    rng = np.random.default_rng(1)
    params, grads = small_tree(rng), small_tree(rng, 1e-3)
    grads["h_0"]["mlp"]["c_fc"]["bias"] = jnp.asarray([1e-8, -3e-8, 0.0], jnp.float32)
    step = 3
    (got,), _ = run_optimizer(o, params, [grads], first_step=step)
    lr, p, g = nanogpt_lr(step, o), flat(params), flat(grads)
    for name, value in flat(got).items():
        direction = g[name] / (np.abs(g[name]) + ADAM_EPS)
        decay = o.weight_decay * p[name] if is_decayed(name) else 0.0
        np.testing.assert_allclose(value, p[name] - lr * (direction + decay), rtol=1e-6, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------------------------------------- clipping

def first_moment_after_one_step(o: OptimConfig, grads) -> dict[str, np.ndarray]:
    params = jax.tree.map(jnp.ones_like, grads)
    _, opt_state = run_optimizer(o, params, [grads])
    return flat(adam_state(opt_state).mu)


@pytest.mark.parametrize("norm_over_clip", [0.5, 0.999, 1.5, 3.0, 30.0])
def test_clipping_scales_by_clip_over_global_norm(norm_over_clip):
    o = optim_config(grad_clip=0.7)
    raw = small_tree(np.random.default_rng(2))
    raw_norm = math.sqrt(sum(float(np.sum(x * x)) for x in flat(raw).values()))
    grads = jax.tree.map(lambda x: x * jnp.float32(norm_over_clip * o.grad_clip / raw_norm), raw)
    g = flat(grads)
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    clip_factor = 1.0 if norm < o.grad_clip else o.grad_clip / norm
    mu = first_moment_after_one_step(o, grads)
    for name, value in mu.items():
        np.testing.assert_allclose(value, (1 - o.beta1) * clip_factor * g[name], rtol=1e-6, atol=1e-12,
                                   err_msg=f"{name}, global norm {norm:.4g}")


def test_grad_clip_zero_disables_clipping():
    o = optim_config(grad_clip=0.0)
    grads = small_tree(np.random.default_rng(3), 100.0)  # a global norm in the hundreds
    g = flat(grads)
    for name, value in first_moment_after_one_step(o, grads).items():
        np.testing.assert_allclose(value, (1 - o.beta1) * g[name], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------- train step

def test_train_step_applies_the_lr_it_logs():
    """One real train step taken mid-decay from a fresh optimizer state: the logged lr is the reference
    schedule's, every parameter moves by exactly lr * (Adam's first direction + decoupled decay), and the
    lr implied by the biases' change (no decay there) is the logged one."""
    cfg = load_config(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
                       "--dtype=float32", "--max_iters=100", "--warmup_iters=10", "--lr_decay_iters=60",
                       "--learning_rate=1e-2", "--min_lr=1e-3", "--weight_decay=0.5", "--grad_clip=1.0"])
    cfg.model.vocab_size = 256
    o = cfg.optim
    model, tx = GPT(cfg.model), make_optimizer(o)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    step = 35
    state = TrainState(jnp.asarray(step, jnp.int32), params, tx.init(params))
    tokens = jax.random.randint(jax.random.key(1), (1, 4, 17), 0, 256)
    x, y = tokens[..., :-1], tokens[..., 1:]

    new_state, metrics = jax.jit(make_train_step(model, tx, cfg))(state, (x, y))

    lr = nanogpt_lr(step, o)
    assert int(new_state.step) == step + 1
    assert float(metrics["lr"]) == pytest.approx(lr, rel=2e-6)
    g = flat(jax.jit(jax.grad(lambda p: loss_fn(p, model, x[0], y[0], None, True)))(params))
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
    clip_factor = min(1.0, o.grad_clip / norm)
    p, got = flat(params), flat(new_state.params)
    implied_lrs = []
    for name, value in got.items():
        direction = clip_factor * g[name] / (clip_factor * np.abs(g[name]) + ADAM_EPS)
        decay = o.weight_decay * p[name] if is_decayed(name) else 0.0
        # Where the gradient is round-off (the attention key bias, which softmax ignores), the direction is
        # noise: there only its bound |direction| <= 1 holds.
        defined = clip_factor * np.abs(g[name]) > 1e-5
        np.testing.assert_allclose(value[defined], (p[name] - lr * (direction + decay))[defined], rtol=1e-5,
                                   atol=1e-4 * lr, err_msg=name)
        assert np.all(np.abs(value - (p[name] - lr * decay)) <= lr * (1 + 1e-5)), name
        if name.endswith("/bias"):
            moved = defined & (np.abs(direction) > 0.5)
            implied_lrs.extend(((p[name] - value)[moved] / direction[moved]).tolist())
    assert len(implied_lrs) > 100
    np.testing.assert_allclose(implied_lrs, float(metrics["lr"]), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- resolve

def help_line(key: str) -> str:
    lines = [line for line in help_text(Config(), "usage").splitlines() if line.strip().startswith(f"--{key} ")]
    assert len(lines) == 1, key
    return lines[0]


def test_help_and_readme_state_the_automatic_values():
    """The promises the resolution test below holds the code to."""
    assert "-1 = 10% of max_iters" in help_line("warmup_iters")
    assert "-1 = max_iters" in help_line("lr_decay_iters")
    assert "-1 = learning_rate / 10" in help_line("min_lr")
    assert "0 = eval_interval" in help_line("checkpoint_interval")
    readme = " ".join(README.read_text().split())
    assert ("`warmup_iters=-1` means 10% of `max_iters`, `lr_decay_iters=-1` means `max_iters`, `min_lr=-1` "
            "means `learning_rate / 10`") in readme
    assert "every `checkpoint_interval` steps (default: `eval_interval`)" in readme
    defaults = Config()
    assert (defaults.optim.warmup_iters, defaults.optim.lr_decay_iters, defaults.optim.min_lr,
            defaults.train.checkpoint_interval) == (-1, -1, -1.0, 0)


@pytest.mark.parametrize("argv", [[], ["--max_iters=2500", "--learning_rate=3e-4", "--eval_interval=50"],
                                  ["shakespeare_char"]])
def test_automatic_values_resolve_as_documented(argv):
    """argv=[] is the default run, where every automatic value is resolved."""
    cfg = load_config(argv)
    unresolved = parse_args(Config(), argv)
    o, t = cfg.optim, cfg.train
    max_iters, lr, eval_interval = t.max_iters, o.learning_rate, t.eval_interval
    if unresolved.optim.warmup_iters == -1:
        assert o.warmup_iters == max_iters // 10  # 10%, rounded down
    if unresolved.optim.lr_decay_iters == -1:
        assert o.lr_decay_iters == max_iters
    if unresolved.optim.min_lr == -1:
        assert o.min_lr == pytest.approx(lr / 10, rel=1e-12)
    if unresolved.train.checkpoint_interval == 0:
        assert t.checkpoint_interval == eval_interval
    assert resolve(copy.deepcopy(cfg)) == cfg  # resolving a resolved config (a resumed run's) changes nothing


def test_explicit_values_are_kept():
    explicit = {"warmup_iters": 0, "lr_decay_iters": 77, "min_lr": 0.0, "checkpoint_interval": 5}
    cfg = load_config([f"--{k}={v}" for k, v in explicit.items()])
    assert (cfg.optim.warmup_iters, cfg.optim.lr_decay_iters, cfg.optim.min_lr,
            cfg.train.checkpoint_interval) == tuple(explicit.values())
    # a preset's values are explicit too, and "-1" on the command line over a preset asks for the automatic one
    preset, resolved = load_preset("gpt2_124m"), load_config(["gpt2_124m"]).optim
    for key in ("warmup_iters", "lr_decay_iters", "min_lr"):
        assert getattr(resolved, key) == preset[key], key
    overridden = load_config(["gpt2_124m", "--min_lr=-1", "--warmup_iters=-1"])
    assert overridden.optim.min_lr == pytest.approx(overridden.optim.learning_rate / 10, rel=1e-12)
    assert overridden.optim.warmup_iters == overridden.train.max_iters // 10


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_adamw_state_keeps_the_layout_checkpoints_hold(gpt_params, grad_clip):
    """STATE_LAYOUT 2 is one flat chain: (clipping's state,) Adam's moments, the decay's empty state. A nested
    chain holds the same numbers in another tree, which every checkpoint written before it could not restore."""
    state = make_optimizer(OptimConfig(grad_clip=grad_clip)).init(gpt_params)
    adam = 1 if grad_clip else 0
    assert len(state) == adam + 2 and isinstance(state[adam], optax.ScaleByAdamState)
    assert jax.tree.structure(state[adam].mu) == jax.tree.structure(gpt_params)
