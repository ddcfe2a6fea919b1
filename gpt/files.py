"""Small file helpers the commands share: whole-file writes, JSON-lines input with one-line errors, and the
rows of a run's metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpt.config import ConfigError


def write_atomic(path: Path, text: str) -> None:
    """Write the whole file or nothing: a temporary file renamed over it, so a reader (another process, a
    shard of the same sweep) or a crash mid-write never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_lines(text: str, source: str) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of JSON-lines text; ConfigError naming `source` and the
    line for one that is not JSON."""
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: line {number} is not JSON ({e.msg})") from None
    return values


def log_rows(path: Path) -> tuple[list[dict], int]:
    """(the JSON-object rows of a JSON-lines log such as metrics.jsonl, in order; how many non-blank lines were
    not such rows: the torn tail of a killed run). A missing file has no rows."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += bool(line.strip())
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped
