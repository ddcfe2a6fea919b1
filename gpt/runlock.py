"""One run per out_dir: out_dir/run.lock, taken before a run writes anything and removed when it ends.

The lock file holds who runs there (host, pid, start time) and a heartbeat its holder rewrites every
HEARTBEAT_S seconds. A second run is refused with one line naming the holder, unless the holder is dead: on
the same host, a pid that no longer exists is taken over at once (so a resume right after kill -9 just
works); on another host (a shared filesystem, a multi-host run's process 0 elsewhere), a heartbeat older
than STALE_S seconds is. Only process 0 of a multi-process run holds the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from gpt.config import ConfigError
from gpt.files import write_atomic

HEARTBEAT_S = 30.0
STALE_S = 300.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "run.lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, create: bool) -> None:
        body = json.dumps({**self.me, "heartbeat": time.time()})
        if create:  # O_EXCL: of two runs creating the lock at once, exactly one succeeds
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
        else:  # a heartbeat or a take-over: replace the file whole, never leave it half-written
            write_atomic(self.path, body)

    def acquire(self) -> str | None:
        """Take the lock, or raise ConfigError naming the holder. Returns a message when a dead holder's
        lock was taken over, else None."""
        try:
            self._write(create=True)
            note = None
        except FileExistsError:
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                holder = {}  # unreadable: a holder killed mid-write; treat as dead
            same_host = holder.get("host") == self.me["host"]
            age = time.time() - float(holder.get("heartbeat", 0))
            who = f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"
            if holder and (same_host and _alive(int(holder.get("pid", 0))) or not same_host and age < STALE_S):
                raise ConfigError(f"{self.path.parent} is in use by another run: {who}, last heartbeat {age:.0f}s ago; "
                                  f"wait for it, stop it, or use another --out_dir") from None
            self._write(create=False)
            note = (f"took over {self.path} from a run that is gone: {who}"
                    + ("" if same_host else f", no heartbeat for {age:.0f}s"))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
        self._thread.start()
        return note

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(create=False)
            except OSError:
                pass  # a full disk: the next beat tries again; the run's own writes report the error

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder = json.loads(self.path.read_text())
            if (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"]):
                self.path.unlink()
        except (OSError, ValueError):
            pass
