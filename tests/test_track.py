"""gpt/track.py: the log_to value, and each tracker fed the rows of a short run and read back from the files
it wrote (TensorBoard's event file, a wandb offline run), plus the one-line error of a missing library."""

import json
import struct
import subprocess
import sys

import pytest

from gpt import track
from gpt.config import ConfigError
from gpt.metrics import Logger
from tests.helpers import REPO

CONFIG = {"n_layer": 2, "n_embd": 32}
# The rows of a run evaluated at steps 0 and 20 and logged at steps 0 and 10, in the order the trainer writes
# them: the eval row and the train row of step 0 share the step, and both have train_s.
ROWS = [
    {"event": "start", "config": CONFIG, "start_step": 0, "devices": 1},
    {"step": 0, "val_loss": 4.5, "train_loss": 4.625, "train_s": 0.0},
    {"step": 0, "loss": 4.5, "lr": 1e-3, "grad_norm": 2.0, "mfu": None, "skipped_batches": 0, "train_s": 1.5},
    {"step": 10, "loss": 3.25, "lr": 5e-4, "grad_norm": float("inf"), "finite": True, "mfu": None,
     "skipped_batches": 1, "train_s": 2.5},
    {"step": 20, "val_loss": 3.0, "train_loss": 3.125, "train_s": 4.0},
]
# {(tag, step): value}: every number (infinite too) of a row with a step but the step; none of the event row,
# no None, no bool.
SCALARS = {
    ("eval/val_loss", 0): 4.5, ("eval/train_loss", 0): 4.625, ("eval/train_s", 0): 0.0,
    ("train/loss", 0): 4.5, ("train/lr", 0): 1e-3, ("train/grad_norm", 0): 2.0,
    ("train/skipped_batches", 0): 0, ("train/train_s", 0): 1.5,
    ("train/loss", 10): 3.25, ("train/lr", 10): 5e-4, ("train/grad_norm", 10): float("inf"),
    ("train/skipped_batches", 10): 1, ("train/train_s", 10): 2.5,
    ("eval/val_loss", 20): 3.0, ("eval/train_loss", 20): 3.125, ("eval/train_s", 20): 4.0,
}


@pytest.mark.parametrize("value, names", [
    ("jsonl", ("jsonl",)),
    ("", ("jsonl",)),
    ("wandb", ("jsonl", "wandb")),
    (" wandb , tensorboard,wandb ", ("jsonl", "wandb", "tensorboard")),
    ("tensorboard,jsonl,wandb", ("jsonl", "tensorboard", "wandb")),
])
def test_parse_log_to(value, names):
    assert track.parse_log_to(value) == names


def test_parse_log_to_unknown_name():
    with pytest.raises(ConfigError) as e:
        track.parse_log_to("jsonl,mlflow")
    assert str(e.value) == "log_to='jsonl,mlflow': unknown tracker 'mlflow'; use jsonl, tensorboard, wandb"


def test_import_is_cheap():
    code = "import sys, gpt.track; print(sorted({'tensorboardX', 'wandb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_logger_passes_rows_to_trackers_and_closes_them(tmp_path):
    class Recorder:
        def __init__(self):
            self.rows, self.closed = [], False

        def log(self, row):
            self.rows.append(row)

        def close(self):
            self.closed = True

    recorder = Recorder()
    log = Logger(tmp_path, [recorder])
    for row in ROWS:
        log.row(**row)
    log.close()
    assert recorder.rows == ROWS and recorder.closed
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS


def tfrecords(path):
    """The records of a TFRecord file (an event file): each is length (uint64), its CRC, data, data's CRC."""
    data, pos = path.read_bytes(), 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        yield data[pos + 12:pos + 12 + n]
        pos += 12 + n + 4


def read_tensorboard(directory, texts=None) -> dict:
    """{(tag, step): value} of the scalars in the one event file under directory; texts, if given, gets
    {tag: text}."""
    from tensorboardX.proto.event_pb2 import Event

    (path,) = directory.glob("events.out.tfevents.*")
    scalars = {}
    for record in tfrecords(path):
        event = Event.FromString(record)
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "text":
                if texts is not None:
                    texts[value.tag] = value.tensor.string_val[0].decode()
            else:
                scalars[value.tag, event.step] = value.simple_value
    return scalars


def test_tensorboard(tmp_path):
    (tracker,) = track.open_trackers(("jsonl", "tensorboard"), tmp_path, "tiny-run", CONFIG)
    for row in ROWS:
        tracker.log(row)
    tracker.close()

    texts = {}
    scalars = read_tensorboard(tmp_path / "tensorboard", texts)
    assert scalars == pytest.approx(SCALARS, rel=1e-6)  # simple_value is a float32
    assert json.loads(texts["config/text_summary"]) == CONFIG


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB's log format, 32 KiB blocks of
    chunks (CRC, uint16 length, type: 1 whole record, 2 first, 3 middle, 4 last piece), a block's last < 7
    bytes padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, pieces = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield Record.FromString(pieces)
            pieces = b""


def test_wandb_offline(tmp_path, monkeypatch):
    for name, value in [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path)),
                        ("WANDB_CACHE_DIR", str(tmp_path / "cache"))]:  # wandb-core logs there, not in ~/.cache
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out_dir = tmp_path / "run"
    out_dir.mkdir()

    (tracker,) = track.open_trackers(("jsonl", "wandb"), out_dir, "tiny-run", CONFIG)
    for row in ROWS:
        tracker.log(row)
    tracker.close()

    (path,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")  # under dir=out_dir, not WANDB_DIR
    records = list(wandb_records(path))
    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name) == ("gpt-jax", "tiny-run")
    assert {item.key: json.loads(item.value_json) for item in run.config.update}.items() >= CONFIG.items()
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.HasField("history")]
    assert [row["_step"] for row in history] == [0, 10, 20]  # step 0's eval and train rows make one row
    logged = {(key, row["_step"]): value for row in history for key, value in row.items() if not key.startswith("_")}
    assert logged == pytest.approx(SCALARS)


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_missing_library(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    with pytest.raises(ConfigError) as e:
        track.open_trackers(("jsonl", name), tmp_path, "tiny-run", CONFIG)
    assert str(e.value) == (f"log_to={name} needs the {module} library: pip install {module} "
                            '(or pip install -e ".[track]")')


def test_failed_open_closes_the_trackers_opened(tmp_path, monkeypatch):
    closed = []

    class Opened:
        def __init__(self, out_dir, config):
            pass

        def close(self):
            closed.append(self)

    monkeypatch.setattr(track, "TensorBoard", Opened)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError):
        track.open_trackers(("jsonl", "tensorboard", "wandb"), tmp_path, "tiny-run", CONFIG)
    assert len(closed) == 1


def test_a_training_run_mirrors_its_rows_to_tensorboard(tmp_path, data_dir):
    """train.py --log_to=tensorboard: the event file holds the train rows' loss and data position (the epoch
    of each corpus as its own tag) and the eval rows' val_loss, at the steps metrics.jsonl has them."""
    from gpt.cli import run_train
    from tests.helpers import TINY

    out = tmp_path / "run"
    assert run_train([*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--log_to=tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_tensorboard(out / "tensorboard")
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 8 and all(0 < r["epoch"]["shakespeare"] < 1 for r in train_rows)
    for r in train_rows:
        assert scalars["train/loss", r["step"]] == pytest.approx(r["loss"])
        assert scalars["train/epoch/shakespeare", r["step"]] == pytest.approx(r["epoch"]["shakespeare"])
    for r in (r for r in rows if "val_loss" in r):
        assert scalars["eval/val_loss", r["step"]] == pytest.approx(r["val_loss"])
    assert run_train([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}", "--log_to=mlflow"]) == 2
