"""What several test modules share (this module holds no tests): the repository root, the suite's one tiny
model, the environment of a subprocess on simulated CPU devices, and a model with random weights.

Every test that needs a small model starts from TINY_MODEL; a test that needs another shape says which
keys it changes (tensor parallelism over 4 devices needs 4 heads, sampling past a short context needs a
longer one), so the suite never grows a second "tiny" that drifts from the first."""

import os
from pathlib import Path

from gpt.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent

# The suite's tiny model: 2 layers, 2 heads, 32 wide, a context of 32 tokens.
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
# How the CLI tests train it: 8 steps of 8 sequences, evaluated every 4 steps.
TINY_TRAIN = {"batch_size": 8, "max_iters": 8, "eval_interval": 4, "eval_iters": 2, "log_interval": 1,
              "learning_rate": 3e-3}


def flags(values: dict) -> list[str]:
    """{key: value} -> ["--key=value", ...], as train.py and sample.py take them."""
    return [f"--{key}={value}" for key, value in values.items()]


def tiny_model_flags(**changes) -> list[str]:
    """The tiny model's architecture flags, with `changes` applied (e.g. n_head=4)."""
    return flags({**TINY_MODEL, **changes})


# The tiny model and its short training run as command-line flags (byte tokenizer, the default corpus).
TINY = flags({**TINY_MODEL, **TINY_TRAIN})


def tiny_model_config(**changes) -> ModelConfig:
    """The tiny model as a ModelConfig (vocabulary 256: bytes), with `changes` applied."""
    return ModelConfig(**{**TINY_MODEL, "vocab_size": 256, **changes})


def run_command(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command's main(argv) as `python -m gpt.x` runs it: orbax quiet, errors
    turned into one line and an exit code by gpt.exits.guarded."""
    from gpt.exits import guarded, quiet_orbax

    quiet_orbax()
    code = guarded(lambda: main(argv))
    out, err = capsys.readouterr()
    return code, out, err


def simulated_devices_env(devices: int) -> dict:
    """The environment for a subprocess on `devices` simulated CPU devices (a user's XLA_FLAGS kept)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def random_model(cfg: ModelConfig, seed: int = 0, batch: int = 2):
    """(model, params, idx): a GPT with random weights, biases and LayerNorm parameters included (so a
    reference checks that every one is used correctly), and a batch of random token ids [batch, block_size]."""
    import jax  # imported here: conftest imports this module, and it needs no model code

    from gpt.model import GPT

    model = GPT(cfg)
    idx = jax.random.randint(jax.random.key(seed + 1), (batch, cfg.block_size), 0, cfg.vocab_size)
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                          model.init(jax.random.key(seed), idx)["params"], is_leaf=lambda x: hasattr(x, "value"))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    return model, params, idx


def check_cached_decode(cfg: ModelConfig, params, full_logits, vocab: int, steps: int = 6):
    """Drive gpt.sampling's prefill, then per-token cached steps (random tokens), for two left-padded prompts
    of different lengths, and assert every step's logits equal full_logits(ids)[-1], a full recompute of the
    row's ids. Returns the prefill's cache (for shape checks)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpt.model import GPT
    from gpt.sampling import Generator

    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    length = 8
    tokens = np.zeros((2, length), np.int32)
    pad = np.array([length - len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        tokens[r, pad[r]:] = p
    logits, cache = Generator(cfg, params)._prefill(params, tokens, pad, cache_len=length + steps)
    prefill_cache, seqs, slot = cache, [list(p) for p in prompts], jnp.arange(length + steps)
    rng = np.random.default_rng(0)
    step = jax.jit(lambda p, *a: GPT(cfg).apply({"params": p}, *a))
    for t in range(steps):
        for r in range(2):
            np.testing.assert_allclose(np.asarray(logits[r, :vocab]), full_logits(seqs[r])[-1, :vocab],
                                       rtol=1e-4, atol=1e-4, err_msg=f"step {t}, row {r}")
        token = rng.integers(0, vocab, size=2)
        for r in range(2):
            seqs[r].append(int(token[r]))
        index = length + t
        mask = (slot[None, :] <= index) & (slot[None, :] >= pad[:, None])
        out, cache = step(params, jnp.asarray(token[:, None], jnp.int32), jnp.asarray((index - pad)[:, None]),
                          mask[:, None, None, :], cache, index)
        logits = out[:, -1]
    return prefill_cache


def write_corpus(directory: Path, train, val, dtype: str = "uint8", vocab: int = 256, tokenizer: str = "byte",
                 shard_tokens: int = 0) -> Path:
    """A prepared corpus written by hand (the layout gpt.prepare writes): given tokens, in shards of shard_tokens
    (0 = one shard per split), so batch and validation tests control every token."""
    import json

    import numpy as np

    from gpt.prepare import FORMAT

    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "tokenizer": tokenizer, "vocab_size": vocab, "dtype": dtype, "source": str(directory),
            "documents": 1}
    for split, tokens in (("train", np.asarray(train)), ("val", np.asarray(val))):
        size = shard_tokens or len(tokens)
        shards = [tokens[i: i + size] for i in range(0, len(tokens), size)]
        for i, shard in enumerate(shards):
            shard.astype(dtype).tofile(directory / f"{split}-{i:05d}.bin")
        meta[f"{split}_shards"] = [[f"{split}-{i:05d}.bin", len(s)] for i, s in enumerate(shards)]
        meta[f"{split}_tokens"] = len(tokens)
    meta["max_token"] = int(max(np.max(train), np.max(val)))
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory
