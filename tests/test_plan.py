"""The planner: its closed-form parameter count against the real tree, its refusals (exit 3, one line, with
remedies computed from the shapes), and the compiled plan of a run against what that run measures."""

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from gpt import cli, plan
from gpt.config import Config, ModelConfig
from gpt.model import init_params
from tests.helpers import REPO, TINY, tiny_model_config, tiny_model_flags


@pytest.mark.parametrize("changes", [{}, {"bias": False}, {"n_layer": 3, "n_embd": 48, "vocab_size": 300},
                                     {"block_size": 17, "n_head": 1}])
def test_closed_form_parameter_count_is_the_tree_size(changes):
    m = tiny_model_config(**changes)
    tree = jax.eval_shape(lambda: init_params(m, jax.random.key(0)))
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "value"))
    assert plan.n_params(m) == sum(getattr(x, "value", x).size for x in leaves)


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.run_train(argv)
    return code, out.getvalue(), err.getvalue()


def test_gpt2_xl_does_not_fit_one_24_gib_device(tmp_path):
    # --dry_run: were the refusal ever to fail, this compiles abstractly instead of allocating 25 GB.
    code, _, err = _run(["gpt2_1558m", f"--out_dir={tmp_path}", f"--data_dir={tmp_path}", "--device_memory_gb=24",
                         "--dry_run"])
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1, err
    assert "does not fit" in lines[0] and "24.00 GiB" in lines[0] and "mesh_fsdp" in lines[0]
    # The state (parameters, AdamW moments, gradients: 16 bytes each) takes nearly all of it.
    need = plan.lower_bound(Config(model=ModelConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024,
                                                     vocab_size=50257)), {"data": 1, "fsdp": 1, "tensor": 1})
    assert 22 * plan.GiB < need["parameters"] + need["optimizer_state"] + need["gradients"] < 24 * plan.GiB


def test_the_lower_bound_shrinks_with_the_mesh_as_sharding_says():
    cfg = Config(model=tiny_model_config(), )
    one = plan.lower_bound(cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    fsdp = plan.lower_bound(cfg, {"data": 1, "fsdp": 4, "tensor": 1})
    data = plan.lower_bound(cfg, {"data": 4, "fsdp": 1, "tensor": 1})
    assert fsdp["parameters"] == one["parameters"] // 4 and data["parameters"] == one["parameters"]
    assert fsdp["logits"] == data["logits"] == one["logits"] // 4  # the batch splits over data and fsdp


def test_dry_run_reports_the_compiled_step_and_writes_plan_json(tmp_path, data_dir):
    code, out, err = _run([*TINY, f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--dry_run"])
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((tmp_path / "plan.json").read_text())
    assert report["fits"] and report["tokens_per_step"] == 8 * 32
    bytes_ = report["bytes_per_device"]
    assert bytes_["parameters"] == 4 * plan.n_params(tiny_model_config())
    assert bytes_["optimizer_state"] >= 2 * bytes_["parameters"]  # AdamW's two moments (+ a step count)
    assert bytes_["peak"] >= report["lower_bound_bytes"] - bytes_["parameters"]  # donated state is counted once
    flops = report["flops_per_step"]
    assert 0.5 < flops["xla_cost_analysis"] / flops["model_6n_plus_attention"] < 2.0
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, nothing saved


def test_a_compiled_step_that_does_not_fit_lists_remedies_that_were_compiled(tmp_path, data_dir):
    # Between the lower bound (which passes) and the compiled peak: the compiled plan must say no.
    argv = [*TINY, f"--out_dir={tmp_path}", f"--data_dir={data_dir}", "--dry_run"]
    _, out, _ = _run(argv)
    peak = json.loads(out)["bytes_per_device"]["peak"]
    code, out, err = _run([*argv, f"--device_memory_gb={0.9 * peak / plan.GiB}"])
    assert code == 3, err
    report = json.loads(out)
    assert not report["fits"] and report["remedies"]
    assert err.strip().startswith("error: does not fit") and len(err.strip().splitlines()) == 1
    for remedy in report["remedies"]:  # each one was compiled: its peak is below the original
        remedy_peak = float(remedy.split("peak ")[1].split(" GiB")[0]) * plan.GiB
        assert remedy_peak < peak


RSS_SCRIPT = """
import json, sys
import jax
from gpt import cli, data, plan, sharding, steps

def peak_rss():  # VmHWM: this process's own high-water mark (getrusage's ru_maxrss carries the parent's over exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

cfg = cli.preflight(sys.argv[1:])
mesh = sharding.make_mesh(cfg.mesh)
batches = data.Batches(cfg, data.load_corpora(cfg.data, cfg.model.block_size, quiet=True), mesh)
baseline = peak_rss()
predicted = plan.compiled_plan(cfg, mesh)["bytes_per_device"]["peak"]
with sharding.activate(mesh):
    model, tx, abstract, shardings, init = steps.build(cfg, mesh)
    state, metrics = steps.jit_train_step(model, tx, cfg, shardings)(init(jax.random.key(0)), batches.train(0))
    jax.block_until_ready(state)
print(json.dumps({"baseline": baseline, "predicted": predicted, "peak": peak_rss()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("shape", [["--n_layer=8", "--n_embd=768", "--n_head=12"],
                                   ["--n_layer=4", "--n_embd=1024", "--n_head=16"]])
def test_predicted_peak_is_within_a_quarter_of_the_measured_rss(shape, tmp_path, data_dir):
    """Two shapes of more than 1 GB of state (parameters and AdamW moments): one train step, as the trainer
    compiles it, measured by the process's peak RSS less its RSS before the first compile."""
    from gpt.config import DataConfig
    from gpt.prepare import prepare

    prepare(DataConfig(tokenizer="gpt2", data_dir=str(data_dir)), quiet=True)  # not in the measured process
    argv = [*shape, "--block_size=128", "--batch_size=8", "--max_iters=1", "--eval_iters=1", "--tokenizer=gpt2",
            "--eval_interval=1", "--checkpoint_interval=1000", f"--out_dir={tmp_path}", f"--data_dir={data_dir}"]
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *argv], capture_output=True, text=True, timeout=900,
                       cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    measured = m["peak"] - m["baseline"]
    print(json.dumps({"shape": shape, **m, "measured": measured, "ratio": m["predicted"] / measured}))
    assert abs(m["predicted"] - measured) <= 0.25 * measured, m


@pytest.mark.slow
def test_a_mesh_larger_than_the_machine_is_planned_on_simulated_devices(tmp_path, data_dir):
    """This test process has one CPU device; a 2 x 4 mesh is planned in a fresh process on 8 simulated ones."""
    assert jax.device_count() < 8
    r = subprocess.run([sys.executable, "train.py", *TINY, f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
                        "--dry_run", "--mesh_data=2", "--mesh_fsdp=4"], capture_output=True, text=True,
                       timeout=600, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "planning on 8 simulated CPU devices" in r.stderr
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["devices"] == 8
    # fsdp splits the parameters four ways (up to the leaves too small to split)
    assert report["bytes_per_device"]["parameters"] < 0.3 * 4 * plan.n_params(tiny_model_config())


@pytest.mark.parametrize("flags", [[], ["--optimizer=muon"], ["--optimizer=muon", "--mlp=swiglu", "--n_kv_head=1"]])
def test_optimizer_state_bound_is_the_optimizers_state(flags):
    """The lower bound's optimizer state against the bytes of the state the optimizer builds: AdamW keeps two
    moments of every parameter, Muon one of the blocks' matrices (its bound must not refuse what fits)."""
    from gpt.config import load_config
    from gpt.optim import make_optimizer

    cfg = load_config([*tiny_model_flags(), "--vocab_size=256", *flags])
    params = jax.eval_shape(lambda: jax.tree.map(lambda x: x.value, init_params(cfg.model, jax.random.key(0)),
                                                 is_leaf=lambda x: hasattr(x, "value")))
    state = jax.eval_shape(make_optimizer(cfg.optim).init, params)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    bound = plan.lower_bound(cfg, {"data": 1, "fsdp": 1, "tensor": 1})["optimizer_state"]
    assert 0 <= state_bytes - bound < 64  # the step counts (and Newton-Schulz's coefficients) beside the moments
