"""Running a sweep: each point an ordinary training run in SWEEP_DIR/<point>, then scored on the whole
validation split (gpt/eval.py) into SWEEP_DIR/<point>/eval.json.

    python -m gpt.scaling run GRID [--out=SWEEP_DIR] [--workers=N] [--shard=i/n] [--schedule=cosine|wsd]

Resumable: a point with eval.json is done and skipped; one with checkpoints resumes from the latest (a
Ctrl-C or SIGTERM makes every running point save first). --workers=N runs N points side by side, each on its
own share of the GPUs (CUDA_VISIBLE_DEVICES) or, on a CPU machine, of the cores (its CPU affinity).
--shard=i/n takes every n-th point (a wsd shape's runs stay together) for one machine of a job array; every
shard writes into the same SWEEP_DIR (a shared filesystem), and the last to finish sees the whole table.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpt.config import ConfigError
from gpt.files import write_atomic
from gpt.scaling import collect
from gpt.scaling.grid import SHAPE_KEYS, Point, load_grid


# The CPU cores a point may use (comma-separated): it pins itself to them before JAX starts its threads.
CPUS_ENV = "GPT_SWEEP_CPUS"


def parse_shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"shard={text!r}: write i/n with 0 <= i < n (this machine's index of n)")
    return int(index), int(count)


def shard_points(points: list[Point], index: int, count: int) -> list[Point]:
    """Every count-th group of points from index on; a group is one point, or a wsd shape's runs (its branches
    need its long run's checkpoints)."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        key = tuple(p.flags[k] for k in SHAPE_KEYS) if p.mode != "cosine" else (p.name,)
        groups.setdefault(key, []).append(p)
    return [p for group in list(groups.values())[index::count] for p in group]


def _gpu_count() -> int:
    """GPUs this process may use, found without starting JAX (which would claim their memory)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if not shutil.which("nvidia-smi"):
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listing.stdout.count("GPU ") if listing.returncode == 0 else 0


def worker_slots(workers: int) -> tuple[list[dict], str]:
    """The environment each of `workers` side-by-side runs gets (its GPUs, or its CPU cores), and a
    sentence saying so."""
    gpus = _gpu_count()
    if gpus:
        if gpus % workers:
            raise ConfigError(f"workers={workers} does not divide the {gpus} GPUs evenly")
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        per = gpus // workers
        return ([{"env": {"CUDA_VISIBLE_DEVICES": ",".join(ids[i * per:(i + 1) * per])}} for i in range(workers)],
                f"{workers} worker(s), {per} GPU(s) each")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if workers > len(cores):
        raise ConfigError(f"workers={workers} is more than the {len(cores)} CPU cores this process may use")
    per = len(cores) // workers
    return ([{"env": {CPUS_ENV: ",".join(map(str, cores[i * per:(i + 1) * per]))}} for i in range(workers)],
            f"{workers} worker(s), {per} CPU core(s) each")


def point_argv(sweep_dir: Path, point: Point) -> list[str]:
    """The training command line of a point: resume it if it has checkpoints, else start it (a wsd branch from
    its long run's checkpoint)."""
    from gpt.trainer import checkpoint_steps

    out = sweep_dir / point.name
    if checkpoint_steps(str(out)):
        init = "resume"
    elif point.branch_of:
        init = f"{sweep_dir / point.branch_of}@{point.branch_step}"
    else:
        init = "scratch"
    flags = {**point.flags, "out_dir": str(out), "init_from": init}
    return [*([point.preset] if point.preset else []), *(f"--{k}={v}" for k, v in flags.items())]


class Sweep:
    def __init__(self, sweep_dir: Path, points: list[Point], slots: list[dict]):
        self.dir, self.points, self.free = sweep_dir, {p.name: p for p in points}, list(slots)
        self.running: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def done(self, name: str) -> bool:
        return (self.dir / name / "eval.json").is_file()

    def run_point(self, point: Point) -> int:
        with self.lock:
            slot = self.free.pop()
        try:
            log = open(self.dir / point.name / "train.log", "a")
            child = subprocess.Popen([sys.executable, "-m", "gpt.scaling", "point", *point_argv(self.dir, point)],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **slot["env"]})
            with self.lock:
                self.running[point.name] = child
                if self.stopping:  # the stop came while this point was starting: it stops too
                    child.send_signal(signal.SIGTERM)
            code = child.wait()
            log.close()
            return code
        finally:
            with self.lock:
                self.running.pop(point.name, None)
                self.free.append(slot)

    def stop(self, signum=None, frame=None) -> None:
        """The handler of SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption): nothing new starts, and
        every running point gets SIGTERM, so it saves and stops (a terminal's Ctrl-C also reaches the
        points themselves, and a second SIGINT would stop them without saving)."""
        self.stopping = True
        with self.lock:
            for child in self.running.values():
                child.send_signal(signal.SIGTERM)

    def run(self) -> tuple[list[str], list[str]]:
        """Run every point not yet done, at most len(slots) at once, branches after their long run.
        Returns (failed, skipped because what they branch from failed)."""
        todo = [p for p in self.points.values() if not self.done(p.name)]
        failed: list[str] = []
        skipped: list[str] = []
        workers = len(self.free)
        with futures.ThreadPoolExecutor(max_workers=workers) as pool:
            active: dict[futures.Future, Point] = {}
            while not self.stopping:
                for p in list(todo):
                    if p.branch_of in failed:
                        todo.remove(p)
                        skipped.append(p.name)
                    elif len(active) < workers and (not p.branch_of or self.done(p.branch_of)):
                        todo.remove(p)
                        (self.dir / p.name).mkdir(parents=True, exist_ok=True)
                        print(f"[{time.strftime('%H:%M:%S')}] start {p.name} ({p.mode}, {p.tokens:,} tokens)",
                              flush=True)
                        active[pool.submit(self.run_point, p)] = p
                if not active:
                    break
                finished, _ = futures.wait(active, return_when=futures.FIRST_COMPLETED)
                for f in finished:
                    p, code = active.pop(f), f.result()
                    if code == 0 and self.done(p.name):
                        print(f"[{time.strftime('%H:%M:%S')}] done  {p.name}", flush=True)
                    elif code in (130, -signal.SIGINT, 143, -signal.SIGTERM):
                        self.stopping = True
                    else:
                        failed.append(p.name)
                        print(f"[{time.strftime('%H:%M:%S')}] FAILED {p.name} (exit {code}): see "
                              f"{self.dir / p.name / 'train.log'}", flush=True)
        return failed, skipped


def run_sweep(grid: str, out: str | None, workers: int, shard: tuple[int, int], schedule: str | None = None) -> int:
    """Run (or resume) this shard's points of the grid, collect the table, and fit it once the grid is done.
    The sweep directory defaults to sweeps/<grid name>-<schedule>."""
    sweep, _, points = load_grid(grid, schedule)
    sweep_dir = Path(out or Path("sweeps") / f"{Path(grid).name.removesuffix('.toml')}-{sweep.get('schedule', 'cosine')}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    plan = json.dumps([dataclasses.asdict(p) for p in points], indent=1) + "\n"
    saved = sweep_dir / "points.json"
    if not saved.is_file():
        write_atomic(saved, plan)  # shards starting together may race here: whole files only
    elif json.loads(saved.read_text()) != json.loads(plan):
        raise ConfigError(f"{sweep_dir} holds a sweep of another grid (its points.json differs): use another --out")
    slots, how = worker_slots(workers)
    mine = shard_points(points, *shard)
    print(f"sweep {grid}: {len(points)} points in {sweep_dir}; this shard ({shard[0]}/{shard[1]}) runs {len(mine)} "
          f"with {how}", flush=True)
    runner = Sweep(sweep_dir, mine, slots)
    previous = {s: signal.signal(s, runner.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed, skipped = runner.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    rows = collect.collect(sweep_dir)
    print(collect.table(rows, len(points)))
    if runner.stopping:
        print(f"interrupted: run the same command again to resume ({len(rows)} of {len(points)} points done)",
              file=sys.stderr)
        return 130
    if failed or skipped:
        print(f"error: {len(failed)} point(s) failed ({', '.join(failed)})"
              + (f"; not started, as their long run failed: {', '.join(skipped)}" if skipped else ""), file=sys.stderr)
        return 1
    if len(rows) == len(points):  # the whole grid is done (on this machine or by every shard): fit and plot it
        from gpt.scaling import report

        try:
            report.main([str(sweep_dir)])
        except ConfigError as e:
            print(f"fit skipped: {e}")
    return 0
