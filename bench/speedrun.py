"""The CPU speedrun: training seconds to reach a fixed validation loss on the built-in corpus, as records.

    python bench/speedrun.py run NAME [--seeds=3] [--target=1.83] [--previous=NAME] -- [preset] [--key=value ...]
    python bench/speedrun.py check NAME [--seeds=N]   # re-run a record beside the one it beat: still holds?
    python bench/speedrun.py ablate [--seconds=60] -- [preset] [--key=value ...]    # each switch alone
    python bench/speedrun.py table               # the records as a markdown table

A record is a train.py command run once per seed (--seed=0, 1, ...); its time is the `train_s` (seconds of
training steps: no compilation, evaluation or checkpointing) of the first evaluation whose validation loss
(the fixed evaluation batches) is at or below the target, and the record's figure is the mean over seeds.
`run` writes records/speedrun/NAME/: record.json (date, command, resolved config, code version, machine, each
seed's time, mean and spread) and each seed's metrics.jsonl. As modded-nanogpt requires, a record must beat the
previous one over every seed's mean; `check` re-runs both from their recorded configs, alternating seed by
seed on the same machine, and exits 1 if the record no longer reaches the target or no longer beats the
previous one.

`ablate` trains the base command and each switch of the modern recipe alone on top of it for the same training
time (each variant's steps from its own measured step time), and prints their final validation loss and tokens/s.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "records" / "speedrun"
RUNS = REPO / "sweeps" / "speedrun"  # run directories (ignored by git; records under records/, check and ablate
# under check/ and ablate/); the records keep their logs

# The switches `ablate` tries one at a time (gpt/model.py and gpt/optim.py say what each does).
SWITCHES = {
    "rmsnorm": ["--norm=rmsnorm"],
    "rmsnorm, no scale": ["--norm=rmsnorm", "--norm_scale=False"],
    "rope": ["--position=rope"],
    "relu2": ["--mlp=relu2"],
    "swiglu": ["--mlp=swiglu"],
    "qk_norm": ["--qk_norm=True"],
    "untied head": ["--tie_embeddings=False"],
    "logit_softcap=15": ["--logit_softcap=15"],
    "n_kv_head=1 (GQA)": ["--n_kv_head=1"],
    "zero_init": ["--zero_init=True"],
    "muon": ["--optimizer=muon", "--muon_learning_rate=0.05"],
}


def train(args: list[str], out_dir: Path) -> list[dict]:
    """Run train.py with args into a fresh out_dir; its metrics.jsonl rows."""
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [sys.executable, str(REPO / "train.py"), *args, f"--out_dir={out_dir}"]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def time_to_target(rows: list[dict], target: float) -> float | None:
    """train_s of the first evaluation at or below target, None if none reached it."""
    return next((r["train_s"] for r in rows if "val_loss" in r and r["val_loss"] <= target), None)


def record_run(name: str, args: list[str], seeds: int, target: float, previous: str | None) -> dict:
    out = RECORDS / name
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(seeds):
        rows = train([*args, f"--seed={seed}"], RUNS / "records" / name / f"seed{seed}")
        (out / f"metrics-seed{seed}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        evals = [r for r in rows if "val_loss" in r]
        results.append({"seed": seed, "seconds": time_to_target(rows, target), "final_val_loss": evals[-1]["val_loss"],
                        "steps": evals[-1]["step"], "train_s": evals[-1]["train_s"]})
        print(json.dumps(results[-1]), flush=True)
    start = rows[0]
    times = [r["seconds"] for r in results]
    record = {
        "name": name, "date": time.strftime("%Y-%m-%d"), "target_val_loss": target, "previous": previous,
        "command": "python train.py " + " ".join(args), "args": args, "code": start["code"],
        "config": start["config"], "versions": start["versions"],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "seeds": results,
        "mean_s": statistics.mean(times) if None not in times else None,
        "stdev_s": statistics.stdev(times) if None not in times and len(times) > 1 else None,
    }
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def check(name: str, seeds: int | None = None) -> int:
    """Re-run the record and the one it beat, seed by seed in turn (the record's seeds, or the first `seeds`);
    0 if it still reaches the target and beats the previous record's mean, 1 if not."""
    record = json.loads((RECORDS / name / "record.json").read_text())
    names = [name] + ([record["previous"]] if record["previous"] else [])
    specs = {n: json.loads((RECORDS / n / "record.json").read_text()) for n in names}
    times = {n: [] for n in names}
    for seed in range(seeds or len(record["seeds"])):
        for n in names:
            rows = train([*replay(specs[n]), f"--seed={seed}"], RUNS / "check" / n / f"seed{seed}")
            times[n].append(time_to_target(rows, record["target_val_loss"]))
    means = {n: statistics.mean(t) if None not in t else None for n, t in times.items()}
    holds = means[name] is not None and (len(names) == 1 or means[names[1]] is None or means[name] < means[names[1]])
    print(json.dumps({"bench": "speedrun_check", "record": name, "target_val_loss": record["target_val_loss"],
                      "seconds": times, "mean_s": means, "holds": holds}))
    return 0 if holds else 1


def replay(record: dict) -> list[str]:
    """The record's resolved config as train.py flags: it re-runs exactly what ran, whatever presets or defaults
    have become since."""
    return [f"--{key}={value}" for key, value in record["config"].items() if key not in ("out_dir", "seed")]


def step_speed(args: list[str]) -> tuple[float, float]:
    """(seconds per optimizer step, tokens/s) of train.py's compiled step for args (bench/train.py, 10 steps)."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "train.py"), *args, "--steps=10"], check=True,
                         cwd=REPO, capture_output=True, text=True).stdout
    bench = json.loads(out.strip().splitlines()[-1])
    return bench["step_ms"] / 1e3, bench["tokens_per_s"]


def ablate(seconds: float, base: list[str]) -> None:
    """Each switch alone on top of base, for `seconds` of training steps each (steps from the measured step
    time, so every variant gets the same time); one JSON line per variant."""
    for label, extra in {"baseline": [], **SWITCHES}.items():
        args = [*base, *extra]
        step_s, tokens_per_s = step_speed(args)
        steps = max(1, round(seconds / step_s))
        rows = train([*args, f"--max_iters={steps}", f"--eval_interval={steps}"], RUNS / "ablate" / label)
        final = [r for r in rows if "val_loss" in r][-1]
        print(json.dumps({"variant": label, "args": extra, "step_s": step_s, "steps": steps,
                          "tokens_per_s": tokens_per_s,
                          "val_loss": final["val_loss"], "train_s": final["train_s"]}), flush=True)


def table() -> str:
    """The records as a markdown table, oldest first (records/speedrun/README.md and the README show it)."""
    lines = ["| record | date | seconds to target, mean ± stdev (seeds) | vs previous | command | code |",
             "| --- | --- | --- | --- | --- | --- |"]
    records = [json.loads(p.read_text()) for p in RECORDS.glob("*/record.json")]
    means = {r["name"]: r["mean_s"] for r in records}
    for r in sorted(records, key=lambda r: r["name"]):
        seeds = ", ".join("-" if x["seconds"] is None else f"{x['seconds']:.1f}" for x in r["seeds"])
        finals = ", ".join(f"{x['final_val_loss']:.3f} at {x['train_s']:.1f} s" for x in r["seeds"])
        figure = f"not reached (final: {finals})" if r["mean_s"] is None else f"{r['mean_s']:.1f} ± {r['stdev_s'] or 0:.1f}"
        before = means.get(r["previous"]) if r["previous"] else None
        speedup = f"{before / r['mean_s']:.2f}x faster" if before and r["mean_s"] else ""
        lines.append(f"| {r['name']} | {r['date']} | {figure} ({seeds}) | {speedup} | `{r['command']}` | {r['code']} |")
    return "\n".join(lines)


def option(argv: list[str], key: str, default):
    return next((type(default)(a.split("=", 1)[1]) for a in argv if a.startswith(f"--{key}=")), default)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    own = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    if argv[0] in ("run", "check") and (not own or own[0].startswith("--")):
        print(f"{argv[0]} needs a record NAME: python bench/speedrun.py {argv[0]} NAME ...", file=sys.stderr)
        return 2
    if argv[0] == "run":
        name, previous = own[0], option(own, "previous", "") or None
        if previous and not (RECORDS / previous / "record.json").is_file():
            print(f"previous={previous!r} is not a record in {RECORDS}", file=sys.stderr)
            return 2
        record_run(name, train_args, option(own, "seeds", 3), option(own, "target", 1.83), previous)
        return 0
    if argv[0] == "check":
        return check(own[0], option(own, "seeds", 0) or None)
    if argv[0] == "ablate":
        ablate(option(own, "seconds", 60.0), train_args)
        return 0
    if argv[0] == "table":
        print(table())
        return 0
    print(f"unknown command {argv[0]!r}: use run, check, ablate or table", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
