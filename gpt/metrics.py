"""What a run reports about itself: metrics.jsonl rows, the peak FLOP/s that MFU divides by, device memory,
and the code and library versions that make a logged figure reproducible."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from gpt.config import Config
from gpt.track import Tracker

# Dense peak FLOP/s per device from the vendors' datasheets: (device_kind fragment, 16-bit, 32-bit).
# Checked in order, so a part whose name contains another's comes first ("a100" before "a10"). The 32-bit
# column is what a float32 run is measured against: TF32 on NVIDIA GPUs, because at JAX's default matmul
# precision XLA computes float32 products in TF32 there (the JAX docs' "Matmul precision" page), and the
# bf16 peak on TPUs, which compute float32 products in bf16 passes by default.
ACCELERATOR_PEAKS = (
    ("h100 pcie", 756e12, 378e12),
    ("h100 nvl", 835e12, 418e12),
    ("h100", 989e12, 494e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200", 989e12, 494e12),
    ("a100", 312e12, 156e12),
    ("a10", 125e12, 62.5e12),
    ("l4", 121e12, 60e12),
    ("v6", 918e12, 918e12),
    ("v5p", 459e12, 459e12),
    ("v5 lite", 197e12, 197e12),
    ("v5e", 197e12, 197e12),
    ("v4", 275e12, 275e12),
)
TRIALS = 5  # a CPU peak is the best of this many timed trials, so a busy moment cannot shrink it


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt-jax" / "peak_flops.json"


def _time_matmul(shape: tuple[int, int, int], dtype: str) -> float:
    """Best FLOP/s of one [m, k] @ [k, n] product on the first device over TRIALS trials."""
    m, k, n = shape
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = 0.0
    for _ in range(TRIALS):
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < 0.05:  # long enough for the clock to resolve
            matmul(a, b).block_until_ready()
            calls += 1
        best = max(best, calls * 2 * m * k * n / (time.perf_counter() - t0))
    return best


def peak_flops(per_device: float, dtype: str, matmul_shape: tuple[int, int, int],
               remeasure: bool = False) -> tuple[float, str]:
    """(peak FLOP/s of all devices together, how it was obtained) for a run computing in dtype.

    per_device > 0 is the user's figure. A known accelerator gets its datasheet peak for the dtype. On a CPU
    the peak is measured: a matmul of the run's largest shape in the run's dtype, best of TRIALS, cached per
    host, dtype and shape (remeasure=True ignores the cache). An unknown accelerator gives NaN: no guess."""
    n, device = jax.device_count(), jax.devices()[0]
    if per_device > 0:
        return per_device * n, "peak_flops from the config"
    kind = device.device_kind.lower()
    sixteen_bit = dtype in ("bfloat16", "float16")
    for name, half, single in ACCELERATOR_PEAKS:
        if name in kind and device.platform != "cpu":
            which = "dense 16-bit" if sixteen_bit else "dense 32-bit (TF32 on NVIDIA GPUs)"
            return (half if sixteen_bit else single) * n, f"{device.device_kind} datasheet, {which}"
    if device.platform != "cpu":
        return float("nan"), f"unknown accelerator {device.device_kind}: set --peak_flops for MFU"
    shape = tuple(int(s) for s in matmul_shape)
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{dtype}|{shape}"
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if remeasure or key not in cache:
        cache[key] = _time_matmul(shape, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass  # a read-only home: measure again next time
    # CPU "devices" share the host's cores, so one host measurement covers all of a process's devices.
    how = f"measured: {dtype} matmul {'x'.join(map(str, shape))} on this host, best of {TRIALS} (cached in {path})"
    return cache[key] * jax.process_count(), how


def run_peak_flops(cfg: Config, mesh, remeasure: bool = False) -> tuple[float, str]:
    """peak_flops for a training run of cfg on mesh: its dtype, and on a CPU its largest matmul on one
    device (the MLP's or the LM head's), at most 8192 rows (the rate stops growing long before)."""
    m = cfg.model
    rows = min(cfg.data.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"]) * m.block_size, 8192)
    shape = max([(rows, m.n_embd, 4 * m.n_embd), (rows, m.n_embd, m.padded_vocab_size)],
                key=lambda s: s[0] * s[1] * s[2])
    return peak_flops(cfg.train.peak_flops, m.compute_dtype, shape, remeasure)


def peak_memory() -> int | None:
    """Peak bytes allocated on this process's first device so far (None where the backend keeps no count,
    as on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def code_version() -> str:
    """The git commit of the code that runs, +dirty when the library or CLIs have uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gpt", "train.py", "sample.py"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a logged figure depends on."""
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Logger:
    """metrics.jsonl rows, mirrored to the experiment trackers given, and terminal lines; only process 0
    writes."""

    def __init__(self, out_dir: Path, trackers: Sequence[Tracker] = ()):
        self.main = jax.process_index() == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self.trackers = list(trackers)

    def row(self, **row) -> None:
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            for tracker in list(self.trackers):
                try:
                    tracker.log(row)
                except Exception as e:  # a tracker's hiccup (a full disk, its service) must not stop training
                    self.trackers.remove(tracker)
                    self.say(f"warning: {type(tracker).__name__} stopped logging ({type(e).__name__}: {e}); "
                             "metrics.jsonl goes on")

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                self.say(f"warning: closing {type(tracker).__name__} failed ({type(e).__name__}: {e})")

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)
