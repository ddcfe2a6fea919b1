"""Optional experiment trackers beside metrics.jsonl: TensorBoard (through tensorboardX) and Weights & Biases.

metrics.jsonl stays the record of a run and is always written; a tracker only mirrors the rows that are points
on a curve. The libraries are imported when a tracker is opened, never here, so a run without trackers neither
needs them nor pays their import time."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Protocol

from gpt.config import ConfigError

TRACKERS = ("jsonl", "tensorboard", "wandb")


class Tracker(Protocol):
    def log(self, row: dict) -> None: ...
    def close(self) -> None: ...


def parse_log_to(value: str) -> tuple[str, ...]:
    """The tracker names of a comma-separated log_to value: "jsonl" first (it is always written), then the
    others in the order given, each once."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log_to={value!r}: unknown tracker {name!r}; use {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(["jsonl", *names]))


def open_trackers(names, out_dir: Path, run_name: str, config: dict) -> list[Tracker]:
    """A tracker for each name but "jsonl" (which Logger writes itself), writing under out_dir."""
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoard(Path(out_dir), config))
            elif name == "wandb":
                opened.append(WandB(Path(out_dir), run_name, config))
    except BaseException:
        for tracker in opened:  # a later one failed (say its library is missing): leave no writer open
            tracker.close()
        raise
    return opened


def _library(module: str, tracker: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # installed, but one of its own imports failed: that error says more
            raise
        raise ConfigError(f"log_to={tracker} needs the {module} library: pip install {module} "
                          f'(or pip install -e ".[track]")') from None


def _scalars(row: dict) -> dict[str, float]:
    """{tag: value} for the numbers of a row with a step (those of a table, such as the epoch of each corpus,
    as key/name), tagged eval/ for an evaluation row (it has val_loss) and train/ otherwise; {} for event rows and rows without a step, which are not points on a curve. The
    prefixes also keep apart the keys both kinds have (train_s), since an eval row and a train row can share
    a step."""
    if "event" in row or "step" not in row:
        return {}
    kind = "eval" if "val_loss" in row else "train"
    flat = {}
    for key, value in row.items():  # a table of numbers (the epoch of each corpus) becomes key/name tags
        flat.update({f"{key}/{name}": v for name, v in value.items()} if isinstance(value, dict) else {key: value})
    return {f"{kind}/{key}": value for key, value in flat.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoard:
    """Scalars in out_dir/tensorboard (`tensorboard --logdir <out_dir>/tensorboard`), and the config once
    as text."""

    def __init__(self, out_dir: Path, config: dict):
        tensorboardX = _library("tensorboardX", "tensorboard")
        self.writer = tensorboardX.SummaryWriter(logdir=str(out_dir / "tensorboard"))
        # Indented four spaces: a Markdown code block, so the text tab shows the JSON verbatim.
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "))

    def log(self, row: dict) -> None:
        for tag, value in _scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.writer.close()  # flushes the events still queued


class WandB:
    """A Weights & Biases run in out_dir/wandb, in project $WANDB_PROJECT (default "gpt-jax").

    wandb reads its mode from the environment: WANDB_MODE=offline writes the run locally with no network
    (upload it later with `wandb sync`), WANDB_MODE=disabled turns it off, and online needs `wandb login`."""

    def __init__(self, out_dir: Path, run_name: str, config: dict):
        wandb = _library("wandb", "wandb")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gpt-jax"), name=run_name,
                                  dir=str(out_dir), config=config)
        except Exception as e:  # not logged in, no network: say so in one line before training starts
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"log_to=wandb: wandb.init failed ({why}); WANDB_MODE=offline needs no network") from None

    def log(self, row: dict) -> None:
        # wandb merges the logs of one step into one history row until a larger step comes, and drops (with
        # a warning) a step smaller than the last: the eval and train rows of a step land together.
        scalars = _scalars(row)
        if scalars:
            self.run.log(scalars, step=row["step"])

    def close(self) -> None:
        self.run.finish()
