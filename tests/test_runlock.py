"""One run per out_dir: the lock refuses a live holder and takes over a dead one."""

import json
import socket
import subprocess
import sys
import time

import pytest

from gpt.config import ConfigError
from gpt.files import log_rows
from gpt.runlock import STALE_S, RunLock
from tests.helpers import REPO, TINY


def test_a_live_holder_is_refused_and_release_frees_the_directory(tmp_path):
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(ConfigError, match=r"is in use by another run: pid \d+ on "):
        RunLock(tmp_path).acquire()  # this very process holds it, and it is alive
    first.release()
    assert not (tmp_path / "run.lock").exists()
    second = RunLock(tmp_path)
    assert second.acquire() is None
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs, as after kill -9
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                   "started": "then", "heartbeat": time.time()}))
    lock = RunLock(tmp_path)
    assert "took over" in lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] != gone.pid
    lock.release()


def test_a_holder_on_another_host_is_taken_over_only_when_its_heartbeat_stopped(tmp_path):
    holder = {"host": "another-host", "pid": 1, "started": "then"}
    (tmp_path / "run.lock").write_text(json.dumps({**holder, "heartbeat": time.time() - 10}))
    with pytest.raises(ConfigError, match="another-host"):
        RunLock(tmp_path).acquire()
    (tmp_path / "run.lock").write_text(json.dumps({**holder, "heartbeat": time.time() - STALE_S - 1}))
    lock = RunLock(tmp_path)
    assert "no heartbeat" in lock.acquire()
    lock.release()


@pytest.mark.slow
def test_a_second_trainer_in_the_same_out_dir_is_refused_and_the_first_is_unharmed(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), *TINY, f"--data_dir={data_dir}", f"--out_dir={out}"]
    first = subprocess.Popen([*args, "--max_iters=100000", "--eval_interval=1000"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any("tokens_per_s" in row for row in log_rows(out / "metrics.jsonl")[0]):  # a train row: it trains
            assert first.poll() is None and time.monotonic() < deadline, "the first run never trained"
            time.sleep(0.2)
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another run" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.terminate()  # SIGTERM: the first run saves and exits cleanly
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(row.get("event") == "start" for row in rows) == 1
    assert not (out / "run.lock").exists()
