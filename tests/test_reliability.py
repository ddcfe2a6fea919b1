"""Faults injected on purpose: kill -9 at random moments (mid-save included), SIGTERM, a damaged latest
checkpoint, a diverging run, and bad input at every entry point."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, TINY

# Checkpoint every step so that saves are nearly always in flight: random kills land mid-save too.
RUN = [*TINY, "--max_iters=30", "--eval_interval=10", "--checkpoint_interval=1", "--warmup_iters=3",
       "--lr_decay_iters=30", "--dropout=0.1"]


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def last_by_step(out_dir, key) -> dict:
    """{step: value}, the last row of each step winning (a resumed run rewrites what the killed one logged)."""
    return {r["step"]: r[key] for r in rows(out_dir) if key in r}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *RUN, f"--data_dir={data_dir}", f"--out_dir={out}"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return out


def has_checkpoint(out_dir) -> bool:
    d = out_dir / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moments_then_resume_is_exact(reference, data_dir, tmp_path, seed):
    out = tmp_path / "run"
    rng = random.Random(seed)
    kills, mid_save = 0, []  # mid_save: whether a kill left a half-written checkpoint behind
    for attempt in range(6):
        init = "resume" if has_checkpoint(out) else "scratch"
        args = [*RUN, f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={init}", "--overwrite=True"]
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if attempt < 2:  # kill the first two attempts at a random moment of training, then let it finish
            for line in proc.stdout:
                if line.startswith("compiled train step"):
                    break
            time.sleep(rng.uniform(0.0, 3.0))
            proc.send_signal(signal.SIGKILL)
            kills += 1
            mid_save.append(any("tmp" in p.name for p in (out / "checkpoints").iterdir()))
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0 and last_by_step(out, "val_loss").get(30) is not None:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert kills == 2
    print(f"kills that interrupted a save: {sum(mid_save)} of {kills}")
    expected, got = last_by_step(reference, "loss"), last_by_step(out, "loss")
    assert sorted(got) == sorted(expected)
    assert all(got[s] == expected[s] for s in expected), "resumed losses differ from the uninterrupted run"
    assert last_by_step(out, "val_loss")[30] == last_by_step(reference, "val_loss")[30]


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_exactly(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, f"--data_dir={data_dir}", f"--out_dir={out}", "--checkpoint_interval=100"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step      5"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM: saved checkpoint at step" in stdout
    step = int(stdout.split("saved checkpoint at step ")[1].split(";")[0])
    assert 5 < step < 30 and (out / "checkpoints" / str(step)).is_dir()
    r = subprocess.run([sys.executable, str(REPO / "train.py"), f"--out_dir={out}", "--init_from=resume"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    expected, got = last_by_step(reference, "loss"), last_by_step(out, "loss")
    assert all(got[s] == expected[s] for s in expected)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(cli, data_dir, tmp_path):
    out = tmp_path / "run"
    base = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--checkpoint_interval=4"]
    assert cli("train.py", *base).returncode == 0  # checkpoints at 4 and 8
    victims = [p for p in (out / "checkpoints" / "8" / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    assert victims
    for p in victims:  # truncate the array data of the latest checkpoint
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    r = cli("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=12")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint 8" in r.stderr and "does not restore" in r.stderr and "trying step 4" in r.stderr
    assert "resumed from" in r.stdout and r.stdout.split("resumed from")[1].split("\n")[0].endswith("/4")
    assert any(p.name.startswith("8.broken-") for p in (out / "checkpoints").iterdir())  # kept, not deleted
    assert (out / "checkpoints" / "12").is_dir() and (out / "checkpoints" / "8").is_dir()


@pytest.mark.slow
def test_divergence_stops_with_the_step_named(cli, data_dir, tmp_path):
    out = tmp_path / "run"
    r = cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--learning_rate=1e30",
            "--warmup_iters=0", "--grad_clip=0", "--max_iters=30", "--eval_interval=100", "--log_interval=5")
    assert r.returncode == 1
    assert "non-finite loss" in r.stderr and "at step" in r.stderr and "Traceback" not in r.stderr
    r = cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'skip'}", "--learning_rate=1e30",
            "--warmup_iters=0", "--grad_clip=0", "--max_iters=12", "--eval_interval=100", "--skip_nonfinite=True")
    assert r.returncode == 0, r.stderr
    assert "skipped the batch of step" in r.stdout
    assert rows(tmp_path / "skip")[-2]["skipped_batches"] > 0


def write_corpus(directory, tokens, dtype="uint8", vocab=256, tokenizer="byte"):
    directory.mkdir(parents=True)
    np.asarray(tokens[:-100], dtype).tofile(directory / "train.bin")
    np.asarray(tokens[-100:], dtype).tofile(directory / "val.bin")
    (directory / "meta.json").write_text(json.dumps({"tokenizer": tokenizer, "vocab_size": vocab, "dtype": dtype,
                                                    "train_tokens": len(tokens) - 100, "val_tokens": 100}))


@pytest.mark.slow
def test_bad_data_files_are_refused(cli, tmp_path):
    data = tmp_path / "data"
    (tmp_path / "c1.txt").write_text("x")  # names the prepared directories c1-byte, c2-byte, ...
    write_corpus(data / "c1-byte", np.arange(1000) % 300, dtype="uint16")  # ids beyond the byte vocabulary
    write_corpus(data / "c2-byte", np.arange(1000) % 200)
    (data / "c2-byte" / "train.bin").write_bytes(b"\x01" * 17)  # truncated
    write_corpus(data / "c3-byte", np.arange(1000) % 200, tokenizer="gpt2", vocab=50257, dtype="uint16")
    write_corpus(data / "c4-byte", np.arange(130) % 200)  # val split of 100 tokens < block_size 128
    cases = {"c1": "holds token id 299, outside the byte vocabulary of 256",
             "c2": "not the 900 uint8 tokens its meta.json describes",
             "c3": "was tokenized with gpt2, but tokenizer=byte",
             "c4": "block_size=128 is not smaller than the train split"}
    for name, message in cases.items():
        r = cli("train.py", f"--dataset={tmp_path / name}.txt", f"--data_dir={data}", f"--out_dir={tmp_path / name}")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_batch_not_divisible_over_the_mesh(cli, data_dir, tmp_path):
    r = cli("train.py", *TINY, "--batch_size=12", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", devices=8)
    assert r.returncode == 2 and "batch_size=12 does not split over data x fsdp = 8 devices" in r.stderr
    r = cli("train.py", *TINY, "--mesh_fsdp=3", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", devices=8)
    assert r.returncode == 2 and "does not divide the 8 devices" in r.stderr


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_time_based_saves(data_dir, tmp_path):
    out = tmp_path / "run"
    # --checkpoint_minutes tiny: a save is due at every step, whatever checkpoint_interval says.
    args = [*RUN, f"--data_dir={data_dir}", f"--out_dir={out}", "--checkpoint_interval=1000",
            "--checkpoint_minutes=0.0001", "--max_iters=100000", "--eval_interval=100000"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step     20"):
            break
    # Ctrl-C pressed repeatedly, 0.1 s apart (signals sent back to back are merged into one by the OS).
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted twice" in stderr and "Traceback" not in stderr, stderr[-2000:]
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    # Time-based saves kept coming (checkpoint_interval alone would have saved none); old ones are pruned
    # to keep_checkpoints=3, or 4 if the exit came between a save and the pruning of the oldest.
    assert len(steps) in (3, 4) and steps[-1] >= 18, steps
