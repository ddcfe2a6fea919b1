"""Two real processes joined by jax.distributed (CPU collectives over 127.0.0.1) train data-parallel and log
the losses one process logs for the same global batch."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TINY, simulated_devices_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out_dir) -> dict:
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one(cli, data_dir, tmp_path):
    common = [*TINY, f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=3"]
    r = cli("train.py", *common, f"--out_dir={tmp_path / 'one'}", devices=1)
    assert r.returncode == 0, r.stderr

    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *common, f"--out_dir={tmp_path / 'two'}",
                               f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=simulated_devices_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "mesh {'data': 2" in outputs[0][0]  # one device per process, data-parallel over both
    assert "loss" not in outputs[1][0] and "parameters" not in outputs[1][0]  # only process 0 prints
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {0, 1, 2, 3, 4, 5}
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "6").is_dir()
