"""The command lines as a user meets them: help, one-line errors with exit code 2, and a full train -> sample."""

import json
import re

import pytest

from gpt.config import Config, ConfigError, SampleArgs, parse_args
from tests.helpers import TINY


def test_overrides_are_typed_and_flat():
    cfg = parse_args(Config(), ["--n_layer=6", "--dropout=0.1", "--bias=False", "--mesh_fsdp=8", "--max_iters=1e3"])
    assert (cfg.model.n_layer, cfg.model.dropout, cfg.model.bias, cfg.mesh.mesh_fsdp) == (6, 0.1, False, 8)
    assert cfg.train.max_iters == 1000 and isinstance(cfg.train.max_iters, int)
    keys = list(Config().to_dict())
    assert len(keys) == len(set(keys))  # flat keys are unique across sections


def test_presets_load_and_command_line_wins():
    cfg = parse_args(Config(), ["gpt2_124m", "--n_layer=2"])
    assert cfg.model.n_embd == 768 and cfg.model.n_layer == 2 and cfg.data.tokenizer == "gpt2"


@pytest.mark.parametrize("argv, message", [
    (["--n_layr=3"], "unknown key 'n_layr' (did you mean 'n_layer'?)"),
    (["--n_layer=three"], "n_layer='three' is not a valid int"),
    (["--device=cuda"], "'device' has no meaning here"),
    (["--compile=True"], "'compile' has no meaning here"),
    (["--n_layer"], "must be written --n_layer=VALUE"),
    (["no_such_preset"], "unknown preset 'no_such_preset'"),
])
def test_bad_arguments_raise_clear_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(Config(), argv)
    assert message in str(e.value)


def help_defaults(text: str) -> dict:
    """{key: default} read from the `  --key   default   meaning` lines of --help (defaults are JSON)."""
    listed = {}
    for line in text.splitlines():
        if m := re.match(r"\s+--(\w+)\s+(.*)", line):
            assert m[1] not in listed, f"--{m[1]} is listed twice"
            listed[m[1]] = json.JSONDecoder().raw_decode(m[2])[0]
    return listed


@pytest.mark.parametrize("script, args", [("train.py", Config), ("sample.py", SampleArgs)])
def test_help_lists_every_key_with_default(cli, script, args):
    r = cli(script, "--help")
    assert r.returncode == 0, r.stderr
    listed, expected = help_defaults(r.stdout), {}
    for section in vars(args()).values():  # the flat keys of every section, as the command line takes them
        expected.update(vars(section))
    assert listed.keys() == expected.keys()
    for key, value in expected.items():  # the default on the key's own line, of the key's own type
        assert listed[key] == value and type(listed[key]) is type(value), (key, listed[key], value)


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--n_layr=3"], "did you mean 'n_layer'"),
    (["--learning_rate=fast"], "learning_rate='fast' is not a valid float"),
    (["--n_embd=30", "--n_head=4"], "n_embd=30 is not divisible by n_head=4"),
    (["--dtype=float16"], "dtype='float16': use auto, float32 or bfloat16"),
    (["--wandb_log=True"], "use --log_to=wandb"),
    (["--init_from=resume"], "no checkpoint to resume"),
    (["--eval_only=True"], "no checkpoint to resume"),
])
def test_train_cli_errors_are_one_line_exit_2(cli, tmp_path, argv, message):
    r = cli("train.py", f"--out_dir={tmp_path / 'none'}", *argv, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--top_p=0"], "top_p=0.0: must be in (0, 1]"),
    (["--top_k=-1"], "top_k=-1: must be >= 0"),
    (["--temperature=-1"], "temperature=-1.0: must be >= 0"),
    (["--start="], "the prompt is empty"),
    (["--start=FILE:/no/such/file"], "cannot read the file"),
    ([], "no checkpoint in"),
])
def test_sample_cli_errors_are_one_line_exit_2(cli, tmp_path, argv, message):
    r = cli("sample.py", f"--out_dir={tmp_path / 'none'}", *argv, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_then_sample_end_to_end(cli, data_dir, tmp_path):
    out = tmp_path / "run"
    r = cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=10")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "tok/s" in r.stdout
    evals = [json.loads(l) for l in open(out / "metrics.jsonl") if "val_loss" in l]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # from ~5.5 (uniform over bytes) down

    # Starting from scratch again into the same out_dir refuses rather than destroying the checkpoints.
    r = cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr

    # A resumed run with a different architecture is refused.
    r = cli("train.py", f"--out_dir={out}", "--init_from=resume", "--n_layer=3")
    assert r.returncode == 2 and "holds a model with n_layer=2" in r.stderr
    # How it computes may change on resume: remat, the loss chunk, the dtype.
    from gpt.trainer import prepare_run

    cfg = prepare_run([f"--out_dir={out}", "--init_from=resume", "--remat=full", "--loss_chunk=8", "--dtype=float32"])
    assert (cfg.model.remat, cfg.model.loss_chunk, cfg.model.n_layer) == ("full", 8, 2)

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\n")
    r = cli("sample.py", f"--out_dir={out}", f"--start=FILE:{prompt}", "--num_samples=2", "--max_new_tokens=20",
            "--json=True", "--step=10")
    assert r.returncode == 0, r.stderr
    samples = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(samples) == 2 and all(s["prompt"] == "ROMEO:\n" and len(s["tokens"]) == 20 for s in samples)
    assert "step 10" in r.stderr

    r = cli("sample.py", f"--out_dir={out}", "--start=To be", "--temperature=0", "--max_new_tokens=10",
            "--num_samples=2")
    assert r.returncode == 0, r.stderr
    texts = r.stdout.split("-" * 40)
    assert texts[0].strip() == texts[1].strip() and texts[0].strip().startswith("To be")  # greedy: identical

    r = cli("train.py", f"--out_dir={out}", "--eval_only=True")
    assert r.returncode == 0 and "val loss" in r.stdout


def stop_string_from(texts: list[str]) -> str:
    """A short piece of one of the texts, taken from the middle outwards, whose first occurrence has text
    before it and after it, made of characters a command line can carry (printable ASCII, newline, tab)."""
    for text in texts:
        middle = len(text) // 2
        for start in sorted(range(len(text)), key=lambda i: abs(i - middle)):
            for length in (2, 3):
                piece = text[start:start + length]
                first = text.find(piece)
                if (len(piece) == length and 0 < first and first + length < len(text) and "\\" not in piece
                        and all(c in "\n\t" or " " <= c <= "~" for c in piece)):
                    return piece
    raise AssertionError(f"no usable stop string in {texts!r}")


@pytest.mark.slow
def test_sample_batches_prompts_of_different_lengths_and_stops_at_the_stop_string(cli, data_dir, tmp_path):
    out = tmp_path / "run"
    assert cli("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"ROMEO:"\n"To be, or not"\n')
    # Sampled (temperature 0.8) with the default seed, so a second run draws the same tokens: the barely
    # trained model's greedy output would be a single repeated character, where no stop string can be cut.
    common = [f"--out_dir={out}", f"--prompts={prompts}", "--num_samples=2", "--max_new_tokens=19", "--json=True"]
    r = cli("sample.py", *common)
    assert r.returncode == 0, r.stderr
    full = [json.loads(line) for line in r.stdout.splitlines()]
    assert [s["prompt"] for s in full] == ["ROMEO:", "ROMEO:", "To be, or not", "To be, or not"]
    assert all(len(s["tokens"]) == 19 for s in full)

    # A stop string that certainly occurs, with text before and after it: each sample that holds it ends
    # right before it (the tokens end with the one that completes it); the others are unchanged.
    stop = stop_string_from([s["text"] for s in full])
    r = cli("sample.py", *common, "--stop=" + stop.replace("\n", "\\n").replace("\t", "\\t"))
    assert r.returncode == 0, r.stderr
    stopped = [json.loads(line) for line in r.stdout.splitlines()]
    assert [s["prompt"] for s in stopped] == [s["prompt"] for s in full]
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # the byte tokenizer's decode
    for s, f in zip(stopped, full):
        if stop not in f["text"]:
            assert (s["text"], s["tokens"]) == (f["text"], f["tokens"])
            continue
        assert s["text"] == f["text"][: f["text"].index(stop)], (stop, s["text"], f["text"])
        assert s["tokens"] == f["tokens"][: len(s["tokens"])] and len(s["tokens"]) < len(f["tokens"])
        assert stop in decode(s["tokens"]) and stop not in decode(s["tokens"][:-1])
    r = cli("sample.py", f"--out_dir={out}", "--start=hi", "--max_new_tokens=40", "--sliding_window=False")
    assert r.returncode == 2 and "exceeds the model's context of block_size=32" in r.stderr
