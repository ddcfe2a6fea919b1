"""Bad input of the kinds an unlucky operator gives: non-finite numbers, schedules nobody means, paths that
cannot be written, prompt files that are not UTF-8 or not JSON. Each is one line on stderr and exit 2."""

import pytest

from gpt.config import Config, ConfigError, SampleConfig, load_config, validate_sample

# Every float key, read from the dataclasses: a key added later is covered without touching this file.
FLOAT_TRAIN_KEYS = [k for k, v in Config().to_dict().items() if isinstance(v, float)]
FLOAT_SAMPLE_KEYS = [k for k, v in vars(SampleConfig()).items() if isinstance(v, float)]


def test_the_key_lists_are_not_empty():
    assert {"learning_rate", "grad_clip", "min_lr", "dropout"} <= set(FLOAT_TRAIN_KEYS)
    assert {"temperature", "top_p"} <= set(FLOAT_SAMPLE_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_TRAIN_KEYS)
def test_every_float_train_key_refuses_non_finite_values(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}=.*must be a finite number"):
        load_config([f"--{key}={value}"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_SAMPLE_KEYS)
def test_every_float_sample_key_refuses_non_finite_values(key, value):
    s = SampleConfig()
    setattr(s, key, float(value))
    with pytest.raises(ConfigError, match=rf"^{key}=.*must be a finite number"):
        validate_sample(s)


@pytest.mark.parametrize("args, message", [
    (["--min_lr=0.01", "--learning_rate=0.001"], "min_lr=0.01 is above learning_rate=0.001"),
    (["--warmup_iters=900"], "warmup_iters=900 is beyond the end of the decay"),  # max_iters is 800
    (["--warmup_iters=50", "--lr_decay_iters=40"], "warmup_iters=50 is beyond the end of the decay"),
])
def test_schedules_nobody_means_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_a_sensible_schedule_is_accepted():
    cfg = load_config(["--warmup_iters=800", "--min_lr=0.002"])  # warmup to the end, a flat floor: allowed
    assert cfg.optim.warmup_iters == 800


def _one_error_line(r) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("key, path, message", [
    ("out_dir", "/proc/gpt-test", "cannot create that directory"),
    ("data_dir", "/proc/gpt-test", "cannot create that directory"),
])
def test_unwritable_directories_are_one_line(cli, tmp_path, key, path, message):
    args = {"out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"), key: path}
    line = _one_error_line(cli("train.py", *(f"--{k}={v}" for k, v in args.items())))
    assert f"{key}='{path}'" in line and message in line


def test_a_file_where_out_dir_should_be_is_one_line(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_error_line(cli("train.py", f"--out_dir={tmp_path / 'file'}"))
    assert "out_dir=" in line and "cannot create that directory" in line


def test_prompt_files_that_are_not_utf8_or_not_json_name_the_problem(cli, tmp_path):
    (tmp_path / "bytes.txt").write_bytes(b"\xff\xfeROMEO")
    line = _one_error_line(cli("sample.py", f"--out_dir={tmp_path}", f"--start=FILE:{tmp_path / 'bytes.txt'}"))
    assert "not UTF-8" in line and "0xff" in line
    (tmp_path / "p.jsonl").write_text('"fine"\n\n{not json\n')
    line = _one_error_line(cli("sample.py", f"--out_dir={tmp_path}", f"--prompts={tmp_path / 'p.jsonl'}"))
    assert "line 3 is not JSON" in line  # the file's line, counting the blank one
    (tmp_path / "n.jsonl").write_text('"fine"\n42\n')
    line = _one_error_line(cli("sample.py", f"--out_dir={tmp_path}", f"--prompts={tmp_path / 'n.jsonl'}"))
    assert "line 2 is not a non-empty JSON string" in line


@pytest.mark.parametrize("command", ["prepare", "export"])
def test_directories_the_other_commands_write_are_checked_first(command, tmp_path, capsys):
    from gpt import cli

    argv = (["prepare", "--data_dir=/proc/gpt-test"] if command == "prepare"
            else ["export", f"--out_dir={tmp_path}", "--to=/proc/gpt-test"])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/proc/gpt-test" in err[0] and "cannot create that directory" in err[0]
