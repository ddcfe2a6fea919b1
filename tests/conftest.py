"""Shared fixtures: a persistent XLA compilation cache (set before JAX is imported, inherited by the
subprocesses the CLI tests start), the built-in corpus prepared once, and a tiny byte-level config (the
suite's one tiny model, tests/helpers.py's TINY).

The suite runs on the CPU unless JAX_PLATFORMS says otherwise: `JAX_PLATFORMS=cuda python -m pytest -q`
runs it on a GPU (dtype auto is then bfloat16). Tests of sharding over several simulated devices, and of
several processes, always run on the CPU: that is where a machine has eight devices to spare."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "gpt-jax-tests" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from gpt.config import Config, load_config  # noqa: E402
from gpt.prepare import prepare  # noqa: E402
# Test modules import these from tests.helpers; they are named here for the fixtures below.
from tests.helpers import REPO, TINY, simulated_devices_env  # noqa: E402,F401


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The built-in Shakespeare corpus, byte-tokenized once for the whole session."""
    root = tmp_path_factory.mktemp("data")
    cfg = Config()
    cfg.data.data_dir = str(root)
    prepare(cfg.data, quiet=True)
    return root


@pytest.fixture
def tiny_cfg(data_dir, tmp_path):
    """A 2-layer, 32-wide byte model config writing into a fresh out_dir: make(...overrides) builds one."""

    def make(*overrides: str) -> Config:
        cfg = load_config([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", *overrides])
        cfg.model.vocab_size = 256
        return cfg

    return make


@pytest.fixture
def cli():
    """cli("train.py", "--key=value", ...) runs a CLI in a subprocess (under a timeout) and returns the result."""

    def run(script: str, *args: str, timeout: int = 600, devices: int | None = None) -> subprocess.CompletedProcess:
        """devices=None: the suite's platform (JAX_PLATFORMS); a number: that many simulated CPU devices."""
        env = dict(os.environ) if devices is None else simulated_devices_env(devices)
        return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=env)

    return run
