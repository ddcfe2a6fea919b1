"""What the benchmarks share: their command line, `[preset] [--key=value ...]` plus one flag of their own,
and the exact train step train.py compiles, set up on random tokens."""

import time

import jax
import jax.numpy as jnp

from gpt import sharding
from gpt.config import load_config
from gpt.steps import build, jit_train_step
from gpt.tokenizer import get_tokenizer


def config_and_flag(argv: list[str], flag: str, default):
    """(the run's config, --flag=VALUE as the type of default, or default); the vocabulary from the tokenizer."""
    value = next((type(default)(a.split("=", 1)[1]) for a in argv if a.startswith(f"--{flag}=")), default)
    cfg = load_config([a for a in argv if not a.startswith(f"--{flag}=")])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = get_tokenizer(cfg.data.tokenizer).vocab_size
    return cfg, value


def compiled_train_step(cfg, mesh):
    """(model, tx, state, batch, compiled step, compile seconds): train.py's step compiled ahead of time for
    one batch of random token ids (speed does not depend on the data). Call under sharding.activate(mesh)."""
    model, tx, _, shardings, init = build(cfg, mesh)
    state = init(jax.random.key(0))
    shape = (cfg.optim.gradient_accumulation_steps, cfg.data.batch_size, cfg.model.block_size)
    tokens = jax.random.randint(jax.random.key(1), shape, 0, cfg.model.vocab_size, jnp.int32)
    batch = jax.device_put((tokens, tokens), sharding.batch_sharding(mesh, leading=1))
    t0 = time.perf_counter()
    compiled = jit_train_step(model, tx, cfg, shardings).lower(state, batch).compile()
    return model, tx, state, batch, compiled, time.perf_counter() - t0
