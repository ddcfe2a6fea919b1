"""Two real processes joined by jax.distributed (CPU collectives over 127.0.0.1) train data-parallel and log
the losses one process logs for the same global batch."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, TINY, simulated_devices_env

# What process 0 says when the coordinator's port is taken (gRPC cannot bind it).
PORT_TAKEN = ("Failed to start RPC server", "Failed to add port", "Address already in use")


def free_port() -> int:
    """A port free now; another program may take it before the coordinator binds it (see train_two)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two(args: list[str], root, attempts: int = 3):
    """Train with two processes on a fresh coordinator port, into root/<attempt>/run: (that out_dir,
    [(returncode, stdout, stderr) of each process]).

    The port is free when chosen but not held, so another program can take it first: process 0 then fails
    at once, unable to bind it, while process 1 would wait minutes for a coordinator that never comes.
    Such a launch is stopped and made again on another port, a bounded number of times."""
    for attempt in range(attempts):
        address, out_dir = f"127.0.0.1:{free_port()}", root / str(attempt) / "run"
        out_dir.parent.mkdir(parents=True)
        files = [(out_dir.parent / f"process{i}.out", out_dir.parent / f"process{i}.err") for i in range(2)]
        procs = []
        try:
            for i, (stdout, stderr) in enumerate(files):
                with open(stdout, "w") as o, open(stderr, "w") as e:  # files, not pipes: nothing blocks on output
                    procs.append(subprocess.Popen(
                        [sys.executable, str(REPO / "train.py"), *args, f"--out_dir={out_dir}",
                         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                        cwd=REPO, env=simulated_devices_env(1), stdout=o, stderr=e))
            if procs[0].wait(timeout=300) != 0 and any(m in files[0][1].read_text() for m in PORT_TAKEN):
                continue  # the port was taken: process 1 is stopped below, and the launch made again
            procs[1].wait(timeout=300)
            return out_dir, [(p.returncode, o.read_text(), e.read_text()) for p, (o, e) in zip(procs, files)]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    raise AssertionError(f"the coordinator's port was taken {attempts} times in a row")


def losses(out_dir) -> dict:
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one(cli, data_dir, tmp_path):
    common = [*TINY, f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=3"]
    r = cli("train.py", *common, f"--out_dir={tmp_path / 'one'}", devices=1)
    assert r.returncode == 0, r.stderr

    two_dir, results = train_two(common, tmp_path / "two")
    for returncode, _, err in results:
        assert returncode == 0, err[-3000:]
    (_, out0, _), (_, out1, _) = results
    assert "mesh {'data': 2" in out0  # one device per process, data-parallel over both
    assert "loss" not in out1 and "parameters" not in out1  # only process 0 prints
    one, two = losses(tmp_path / "one"), losses(two_dir)
    assert one.keys() == two.keys() == {0, 1, 2, 3, 4, 5}
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert (two_dir / "checkpoints" / "6").is_dir()
