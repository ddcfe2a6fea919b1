"""Every key of train.py and sample.py against a table of hostile values. Each must be accepted, or refused
with one line on stderr and a documented exit code: 2 for usage errors, 3 for the planner's "does not fit".
Never a traceback, never a hang.

The keys come from the config dataclasses, so a key added later is fuzzed without touching this file. Each
case runs what stands before compiling (cli.preflight: config, paths, mesh, the planner's lower bound; for
sampling the prompt files and the checkpoint), in-process under an alarm; a seeded sample of the accepted
cases then runs the real CLI for one training step or a few sampled tokens, in a subprocess under a timeout.
"""

import contextlib
import io
import os
import random
import signal
import sys

import pytest

from gpt import cli
from gpt.exits import guarded
from gpt.config import Config, SampleArgs, _fields
from tests.helpers import REPO, TINY

NOWHERE = "/proc/gpt-fuzz/nowhere"  # a path not even root can create
NON_UTF8 = os.fsdecode(b"\xff\xfe")  # how bytes that are not UTF-8 reach sys.argv on Linux
HOSTILE = ["", "nan", "inf", "-inf", "-1", "0", "1e12", "abc", NOWHERE, NON_UTF8]
TRAIN_KEYS = list(_fields(Config()))
SAMPLE_KEYS = list(_fields(SampleArgs()))
CASE_SECONDS = 20  # an alarm per in-process case: a hang fails the test instead of stalling CI
# Keys that set how much work a run does: huge values there are accepted and honoured (a long run), so the
# real-step sample leaves them out. Every key still goes through the pre-compile checks.
AMOUNT_OF_WORK = {"max_iters", "eval_iters", "lr_decay_iters", "num_samples", "max_new_tokens"}
REAL_RUNS = 3  # per CLI: each is a fresh process that compiles (about 10 s)


def _exit_and_stderr(body) -> tuple[int, str]:
    """Run body() as the CLI would (gpt.exits.guarded maps errors to exit codes) under an alarm."""

    def hang(*_):
        raise TimeoutError(f"no answer within {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = guarded(body)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def _assert_accepted_or_one_line(code: int, err: str, case: str, progress: bool = False) -> None:
    """Exit 0, or 2/3 with one error line; progress=True allows the lines a run prints before it (a real
    run reports its progress on stderr), as long as the error is the last and there is no traceback."""
    assert code in (0, 2, 3) and "Traceback" not in err, f"{case}: exit {code}\n{err[-3000:]}"
    lines = err.strip().splitlines()
    if code:
        errors = [line for line in lines if line.startswith("error: ")]
        assert errors == lines[-1:] and (progress or len(lines) == 1), f"{case}: exit {code}, stderr:\n{err[-3000:]}"


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """The tiny run every case starts from, writing into its own directories."""
    root = tmp_path_factory.mktemp("fuzz")
    cwd = os.getcwd()
    os.chdir(root)  # relative paths among the values (out_dir=nan) land here, not in the repository
    yield root, [*TINY, f"--data_dir={data_dir}", f"--out_dir={root / 'out'}"]
    os.chdir(cwd)


@pytest.fixture(scope="module")
def run_dir(base, tmp_path_factory):
    """A tiny trained run for sample.py to read (two steps, one checkpoint)."""
    import subprocess

    out = tmp_path_factory.mktemp("fuzz-run")
    _, argv = base
    r = subprocess.run([sys.executable, "train.py", *argv, f"--out_dir={out}", "--max_iters=2", "--eval_interval=2"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _file_values(root) -> dict[str, str]:
    """Files a key may read: one that is not UTF-8, one that is not JSON lines, an empty one."""
    (root / "bytes.txt").write_bytes(b"\xff\xfeROMEO")
    (root / "bad.jsonl").write_text('"fine"\n{not json\n')
    (root / "empty.txt").write_text("")
    return {"bytes": str(root / "bytes.txt"), "bad_jsonl": str(root / "bad.jsonl"), "empty": str(root / "empty.txt")}


def _values(root) -> list[str]:
    files = _file_values(root)
    return [*HOSTILE, files["bytes"], files["bad_jsonl"], files["empty"], "FILE:" + files["bytes"],
            "FILE:" + NOWHERE, str(root)]


@pytest.fixture(scope="module")
def train_cases(base):
    """(key, value, exit code, stderr) for every train key and value, through cli.preflight."""
    root, argv = base
    cases = []
    for key in TRAIN_KEYS:
        for value in _values(root):
            case = [*argv, f"--{key}={value}"]
            cases.append((key, value, *_exit_and_stderr(lambda: (cli.preflight(case), 0)[1])))
    return cases


@pytest.fixture(scope="module")
def sample_cases(base, run_dir):
    """(key, value, exit code, stderr) for every sample key and value, through cli.sample_preflight."""
    root, _ = base
    cases = []
    for key in SAMPLE_KEYS:
        for value in _values(root):
            case = [f"--out_dir={run_dir}", "--max_new_tokens=4", f"--{key}={value}"]
            cases.append((key, value, *_exit_and_stderr(lambda: (cli.sample_preflight(case), 0)[1])))
    return cases


@pytest.mark.parametrize("which", ["train", "sample"])
def test_every_key_takes_hostile_values_or_refuses_them_in_one_line(which, request):
    cases = request.getfixturevalue(f"{which}_cases")
    for key, value, code, err in cases:
        _assert_accepted_or_one_line(code, err, f"{which} --{key}={value!r}")
    keys = TRAIN_KEYS if which == "train" else SAMPLE_KEYS
    accepted = {key for key, _, code, _ in cases if code == 0}
    assert len(accepted) > len(keys) / 2  # the table is not all refusals: most keys take some odd value
    numeric = {key for key, (section, _) in _fields(Config() if which == "train" else SampleArgs()).items()
               if type(getattr(section, key)) in (int, float)}
    wrong_type = {key for key, value, code, _ in cases if value in ("", "abc") and code == 2}
    assert numeric <= wrong_type  # an empty or non-numeric value for a number is always a usage error


def _real_run(which: str, args: list[str], cwd, timeout: int):
    """The real CLI in a subprocess, run from cwd: relative paths among the values (out_dir=inf) land there."""
    import subprocess

    return subprocess.run([sys.executable, str(REPO / f"{which}.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["train", "sample"])
def test_a_sample_of_accepted_values_runs_for_real(which, request, base, run_dir):
    """Accepted values go on through the real CLI: one training step, or four sampled tokens."""
    cases = request.getfixturevalue(f"{which}_cases")
    candidates = [(k, v) for k, v, code, _ in cases if code == 0 and k not in AMOUNT_OF_WORK]
    root, argv = base
    for key, value in random.Random(0).sample(candidates, REAL_RUNS):
        if which == "train":
            args = [*argv, f"--out_dir={root / 'real'}", "--max_iters=1", "--overwrite", f"--{key}={value}"]
        else:
            args = [f"--out_dir={run_dir}", "--max_new_tokens=4", "--num_samples=1", f"--{key}={value}"]
        r = _real_run(which, args, root, timeout=120)
        _assert_accepted_or_one_line(r.returncode, r.stderr, f"{which} --{key}={value!r} (real run)", progress=True)
