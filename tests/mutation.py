"""Mutation score of the core modules: `python -m tests.mutation [--jobs 2] [--only optim,config]`.

Each mutant (one operator, comparison, number, boolean ... changed in one place by cosmic-ray) is tested
by the fast tests that import the module, in a fresh Python process (XLA's threads do not survive fork).
A mutant is killed when those tests fail or time out. Prints one JSON object: per target, the mutants
tried, killed, judged equivalent (EQUIVALENT below, each with its reason) and the score
killed / (tried - equivalent); the diffs of the survivors go to OUT/survivors.txt.

Not part of CI (it takes about an hour on 2 cores); needs `pip install -e .[mutation]`.

What is mutated: only the named functions of each module (the core the issue names: the optimizer, the
sampling filters, the batch source, the loss and train step, the config resolution and validation), and
not the operator replacements that can only raise TypeError on the float and array code here (shifts,
xor, power, modulo, `is`, `~`, `not` on numbers) nor cosmic-ray's variable replacer/inserter: any test
that runs the line kills those, and they would double the run. cosmic-ray does not mutate strings, so
no message-string mutant is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO


@dataclass(frozen=True)
class Target:
    module: str                    # path of the mutated file, relative to the repository
    functions: frozenset[str]      # the definitions mutated (cosmic-ray's definition_name); empty = all
    tests: str                     # pytest arguments: the fast tests that cover them


TARGETS = {
    "optim": Target("gpt/optim.py", frozenset(), "tests/test_optim.py "
                    "tests/test_run.py::test_checkpoints_of_another_layout_or_corpus_are_refused_in_one_line"),
    "sampling_filters": Target("gpt/logits.py", frozenset({"filter_logits", "sample_logits", "sample"}),
                               "tests/test_sampling.py -k 'top_k or top_p or empirical or rules or numpy or greedy_is or leading'"),
    "batch_source": Target("gpt/data.py", frozenset({"get_batch", "_load", "train", "eval", "offsets", "permute", "_mix",
                                                     "locate", "_block", "mix_counts", "consumed", "__getitem__",
                                                     "_produce", "get", "close"}),
                           "tests/test_tokenizer_data.py tests/test_batches.py tests/test_train.py"),
    "loss_and_step": Target("gpt/steps.py", frozenset({"loss_fn", "chunked_cross_entropy", "chunk_loss",
                                                       "make_train_step", "train_step", "micro_step"}),
                            "tests/test_train.py tests/test_optim.py tests/test_remat_attention.py "
                            "-k 'not (every_remat or remat_really or cudnn)'"),
    "config": Target("gpt/config.py", frozenset({
        "_parse_value", "_apply", "_check_finite", "read_args", "load_preset", "apply_layers", "validate",
        "validate_sample", "resolve", "tokens_per_step", "padded_vocab_size"}),
        "tests/test_config.py tests/test_inputs.py tests/test_presets.py "
        + " ".join(f"tests/test_optim.py::{t}" for t in ("test_help_and_readme_state_the_automatic_values",
                                                          "test_automatic_values_resolve_as_documented",
                                                          "test_explicit_values_are_kept"))),
}

# Operator replacements left out (see the docstring): they only produce TypeErrors on this code.
EXCLUDED_OPERATORS = re.compile(r"_(Mod|Pow|RShift|LShift|BitXor|Is|IsNot|Invert|Not)$|Variable(Replacer|Inserter)")

# Surviving mutants judged equivalent, each read against the code: no input the program accepts tells the
# mutant from the original. Keyed by (module, original line, mutated line), both stripped, as in the diff.
_VALIDATED = "validate() refuses, before this code runs, every value that would tell them apart"
_SAME_TYPE = "types equal only themselves: == and `is` agree on them"
_NO_CUT = "it filters with neither a top-k nor a top-p cut, which returns logits / temperature: the same result"
_TWO_D = "sample_logits takes [batch, vocab] logits: axis 1 is axis -1"
_GREEDY = ("temperature 0 goes to the argmax branch before either division, so the floor only guards a "
           "temperature that never reaches it")
_EQUIVALENT_GROUPS = [
    ("gpt/optim.py", "a label written into checkpoints and compared with this same constant: 3 behaves as 2 "
     "(1, the previous layout, is killed by the old-layout refusal test)", [
        ("STATE_LAYOUT = 2", "STATE_LAYOUT = 3")]),
    ("gpt/optim.py", "at step == warmup_iters both branches give learning_rate: the warmup line is "
     "learning_rate * (w + 1) / (w + 1), the cosine is at ratio 0", [
        ("return jnp.where(step < o.warmup_iters, warmup, o.learning_rate)",
         "return jnp.where(step <= o.warmup_iters, warmup, o.learning_rate)"),
        ("return jnp.where(step < o.warmup_iters, warmup, cosine)",
         "return jnp.where(step <= o.warmup_iters, warmup, cosine)")]),
    ("gpt/optim.py", "the ratio is negative only before warmup_iters, where the warmup branch is taken", [
        ("ratio = jnp.clip((step - o.warmup_iters) / span, 0.0, 1.0)",
         "ratio = jnp.clip((step - o.warmup_iters) / span, -1.0, 1.0)")]),
    ("gpt/optim.py", _VALIDATED + " (grad_clip < 0)", [
        ("clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []",
         "clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip != 0 else []")]),
    ("gpt/steps.py", "with rate 0 Flax's Dropout returns its input, so a step run non-deterministically at "
     "dropout=0 is the deterministic one; validate() keeps dropout in [0, 1)", [
        ("deterministic = cfg.model.dropout == 0.0", f"deterministic = cfg.model.dropout {op}")
        for op in ("< 0.0", "<= 0.0", "== 1.0", "== -1.0")]),
    ("gpt/steps.py", "on booleans jnp.multiply is the logical and", [
        ("finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)", "finite = jnp.isfinite(loss) * jnp.isfinite(grad_norm)")]),
    ("gpt/steps.py", "inputs (batch[0]) and targets (batch[1], batch[-1]) have the same shape", [
        ("n_micro = batch[0].shape[0]", f"n_micro = batch[{i}].shape[0]") for i in (" 1", " -1")]),
    ("gpt/data.py", "numpy reads any negative size as 'infer': reshape(-2) is reshape(-1)", [
        ("window = np.asarray(tokens[index.reshape(-1)], dtype=np.int32).reshape(index.shape)",
         "window = np.asarray(tokens[index.reshape(- 2)], dtype=np.int32).reshape(index.shape)")]),
    ("gpt/data.py", "the timeout only sets how often a producer blocked on a full queue looks for close()", [
        ("self.queue.put(item, timeout=0.1)", "self.queue.put(item, timeout= 1.1)")]),
    ("gpt/config.py", _SAME_TYPE, [
        ("if kind is str:", "if kind == str:"), ("if kind is bool:", "if kind == bool:"),
        ("if kind is not bool:", "if kind != bool:"),
        ("if value is None or (kind is int and not value.is_integer()):",
         "if value is None or (kind == int and not value.is_integer()):"),
        ("return int(value) if kind is int else value", "return int(value) if kind == int else value")]),
    ("gpt/config.py", "BARE is a plain object(): it equals only itself", [
        ("if raw is BARE:  # only here is the key's type known: a bare boolean means True, anything else needs a "
         "value", "if raw == BARE:  # only here is the key's type known: a bare boolean means True, anything else "
         "needs a value")]),
    ("gpt/config.py", "only the first close match is read, and with n=1 there is one: n=2 and close[-1] change "
     "nothing", [
        ("close = difflib.get_close_matches(key, list(known), n=1)",
         "close = difflib.get_close_matches(key, list(known), n= 2)"),
        ("hint = f\" (did you mean '{close[0]}'?)\" if close else \" (see --help for the keys)\"",
         "hint = f\" (did you mean '{close[ -1]}'?)\" if close else \" (see --help for the keys)\"")]),
    ("gpt/config.py", _VALIDATED + " (values below -1, or below 0 for checkpoint_interval)", [
        ("if o.warmup_iters == -1:", "if o.warmup_iters <= -1:"),
        ("if o.lr_decay_iters == -1:", "if o.lr_decay_iters <= -1:"),
        ("if t.checkpoint_interval == 0:", "if t.checkpoint_interval <= 0:")]),
    ("gpt/config.py", "no string sorts before \"\"", [
        ("if s.start == \"\" and not s.prompts:", "if s.start <= \"\" and not s.prompts:")]),
    ("gpt/sampling.py", _VALIDATED + " (top_k < 0, top_p > 1, temperature < 0)", [
        ("k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)",
         "k = jnp.where(top_k != 0, jnp.minimum(top_k, vocab), vocab)"),
        ("filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),",
         "filtered = jax.lax.cond((top_k != 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),"),
        ("filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),",
         "filtered = jax.lax.cond((top_k > 0) | (top_p != 1), lambda l: filter_logits(l, temperature, top_k, top_p),"),
        ("n_keep = jnp.where(top_p >= 1.0, k, jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1))",
         "n_keep = jnp.where(top_p == 1.0, k, jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1))"),
        ("return jax.lax.cond(temperature == 0, lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), sample, logits)",
         "return jax.lax.cond(temperature <= 0, lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), sample, logits)")]),
    ("gpt/sampling.py", "on booleans jnp.add is the logical or", [
        ("filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),",
         "filtered = jax.lax.cond((top_k > 0) + (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),")]),
    ("gpt/sampling.py", "the condition becomes always true: " + _NO_CUT, [
        ("filtered = jax.lax.cond((top_k > 0) | (top_p < 1), lambda l: filter_logits(l, temperature, top_k, top_p),",
         f"filtered = jax.lax.cond({cond}, lambda l: filter_logits(l, temperature, top_k, top_p),")
        for cond in ("(top_k >= 0) | (top_p < 1)", "(top_k > -1) | (top_p < 1)", "(top_k > 0) | (top_p <= 1)",
                     "(top_k > 0) | (top_p < 2)")]),
    ("gpt/sampling.py", "a guard never active: the top token's `before` is 0 < top_p, so the count is at least 1", [
        ("n_keep = jnp.where(top_p >= 1.0, k, jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1))",
         "n_keep = jnp.where(top_p >= 1.0, k, jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 0))")]),
    ("gpt/sampling.py", "differs only when a float32 cumulative probability equals top_p exactly", [
        ("n_keep = jnp.where(top_p >= 1.0, k, jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1))",
         "n_keep = jnp.where(top_p >= 1.0, k, jnp.maximum(jnp.sum(before <= top_p, axis=-1, keepdims=True), 1))")]),
    ("gpt/sampling.py", _TWO_D, [
        ("return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)",
         f"return jax.random.categorical(key, filtered, axis={a}).astype(jnp.int32)") for a in ("1", "+1")] + [
        ("return jax.lax.cond(temperature == 0, lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), sample, logits)",
         f"return jax.lax.cond(temperature == 0, lambda l: jnp.argmax(l, axis={a}).astype(jnp.int32), sample, logits)")
        for a in ("1", "+1")]),
    ("gpt/sampling.py", _GREEDY, [
        ("logits = logits / jnp.maximum(temperature, 1e-6)", "logits = logits / jnp.maximum(temperature, -0.999999)"),
        ("lambda l: l / jnp.maximum(temperature, 1e-6), logits)",
         "lambda l: l / jnp.maximum(temperature, -0.999999), logits)")]),
]
EQUIVALENT: dict[tuple[str, str, str], str] = {
    (module, original, mutated): reason for module, reason, pairs in _EQUIVALENT_GROUPS for original, mutated in pairs}


def changed_lines(diff: str) -> tuple[str, str]:
    """(original, mutated) line of a one-line mutant's diff, stripped."""
    lines = diff.splitlines()
    old = next(line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---"))
    new = next(line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++"))
    return old, new


# What the work copies need: the library, its tests and presets, and the README some tests read.
COPIED = ("gpt", "tests", "configs", "pyproject.toml", "README.md", "train.py", "sample.py")


def make_copy(root: Path) -> Path:
    root.mkdir(parents=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    return root


def cosmic_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", "cosmic_ray.cli", *args], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True)


def run_target(name: str, target: Target, copy: Path, out: Path, timeout: float, resume: bool) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    test_command = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {target.tests}"
    config = out / f"{name}.toml"
    config.write_text(f'[cosmic-ray]\nmodule-path = "{target.module}"\ntimeout = {timeout}\n'
                      f'excluded-modules = []\ntest-command = {json.dumps(test_command)}\n'
                      '[cosmic-ray.distributor]\nname = "local"\n')
    session = out / f"{name}.sqlite"
    if not resume:
        session.unlink(missing_ok=True)
    baseline = subprocess.run(shlex.split(test_command), cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)},
                              capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{name}: the unmutated tests fail:\n{baseline.stdout[-2000:]}")
    if session.exists():  # --resume: the session's pending mutants only (the module must not have changed)
        return finish(name, target, session, copy, config)
    cosmic_ray("init", str(config), str(session), cwd=copy)
    with use_db(str(session), WorkDB.Mode.open) as db:
        skipped = [item.job_id for item in db.work_items
                   if any(EXCLUDED_OPERATORS.search(m.operator_name)
                          or (target.functions and m.definition_name not in target.functions)
                          for m in item.mutations)]
        db.set_multiple_results(skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    return finish(name, target, session, copy, config)


def finish(name: str, target: Target, session: Path, copy: Path, config: Path) -> dict:
    start = time.time()
    cosmic_ray("exec", str(config), str(session), cwd=copy)
    return summarise(name, target, session, time.time() - start)


def summarise(name: str, target: Target, session: Path, seconds: float) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    killed, survivors, equivalent, incompetent = 0, [], [], 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            m = item.mutations[0]
            if result.test_outcome == TestOutcome.INCOMPETENT:
                incompetent += 1
            elif result.test_outcome == TestOutcome.KILLED:
                killed += 1
            else:
                key = (target.module, *changed_lines(result.diff))
                entry = {"line": m.start_pos[0], "column": m.start_pos[1], "operator": m.operator_name,
                         "function": m.definition_name, "diff": result.diff}
                if key in EQUIVALENT:
                    equivalent.append({**entry, "reason": EQUIVALENT[key]})
                else:
                    survivors.append(entry)
    tried = killed + len(survivors) + len(equivalent)
    return {"target": name, "module": target.module, "tests": target.tests, "tried": tried, "killed": killed,
            "equivalent": len(equivalent), "survived": len(survivors), "incompetent": incompetent,
            "score": round(killed / max(tried - len(equivalent), 1), 4), "seconds": round(seconds),
            "survivors": survivors, "equivalent_mutants": equivalent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TARGETS), help=f"comma-separated targets: {', '.join(TARGETS)}")
    parser.add_argument("--jobs", type=int, default=2, help="targets run at once, each in its own copy")
    parser.add_argument("--out", default="mutation-report", help="directory for sessions and the report")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a mutant's tests count as hung")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sessions in --out (targets without one start afresh)")
    args = parser.parse_args()
    names = args.only.split(",")
    if unknown := set(names) - set(TARGETS):
        parser.error(f"unknown target(s) {sorted(unknown)}: use {', '.join(TARGETS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        def one(name: str) -> dict:
            return run_target(name, TARGETS[name], make_copy(Path(tmp) / name), out, args.timeout, args.resume)

        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(one, names))
    with open(out / "survivors.txt", "w") as f:
        for r in results:
            for s in r["survivors"]:
                f.write(f"== {r['module']}:{s['line']}:{s['column']} {s['operator']} in {s['function']}\n{s['diff']}\n")
    (out / "report.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({r["target"]: {k: r[k] for k in ("module", "tried", "killed", "equivalent", "survived",
                                                       "score", "seconds")} for r in results}, indent=1))


if __name__ == "__main__":
    main()
