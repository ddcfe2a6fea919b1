"""The same train step on any mesh: 8 simulated CPU devices in a subprocess against one device in-process."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt import sharding
from gpt.config import ConfigError, MeshConfig
from tests.helpers import REPO, TINY_MODEL, TINY_TRAIN, simulated_devices_env, tiny_model_flags
from tests.sharded_steps import restored_params

MESHES = ["8,1,1", "1,8,1", "2,1,4", "2,2,2"]  # data=8, fsdp=8, tensor=4 x data=2, all three

# The mesh axes each parameter must be split over, as gpt/sharding.py's RULES map the model's logical axes
# (vocab, heads, mlp -> tensor; embed -> fsdp; pos, head_dim and the q/k/v axis whole), by parameter path
# with the block index dropped. A parameter missing here fails the test: say how a new one is sharded.
EXPECTED_SPECS = {
    "['wte']['embedding']": ["tensor", "fsdp"],  # (vocab, embed)
    "['wpe']['embedding']": [None, "fsdp"],  # (pos, embed)
    "['attn']['c_attn']['kernel']": ["fsdp", None, "tensor", None],  # (embed, q/k/v, heads, head_dim)
    "['attn']['c_attn']['bias']": [None, "tensor", None],
    "['attn']['c_proj']['kernel']": ["tensor", None, "fsdp"],  # (heads, head_dim, embed)
    "['attn']['c_proj']['bias']": ["fsdp"],
    "['mlp']['c_fc']['kernel']": ["fsdp", "tensor"],  # (embed, mlp)
    "['mlp']['c_fc']['bias']": ["tensor"],
    "['mlp']['c_proj']['kernel']": ["tensor", "fsdp"],  # (mlp, embed)
    "['mlp']['c_proj']['bias']": ["fsdp"],
    **{f"['{ln}']['{p}']": ["fsdp"] for ln in ("ln_1", "ln_2", "ln_f") for p in ("scale", "bias")},  # (embed,)
}


@pytest.fixture(scope="module")
def sharded(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "result.json"
    # The single-device reference runs on one CPU device in a process of its own, so both sides run on the
    # same platform whatever JAX_PLATFORMS the suite runs on.
    for meshes, devices in ((MESHES, 8), (["1,1,1"], 1)):
        r = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_steps.py"), f"{out}.{devices}", str(data_dir),
                            *meshes], env=simulated_devices_env(devices), capture_output=True, text=True, timeout=900,
                           cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
    result = {**json.loads(Path(f"{out}.8").read_text()), **json.loads(Path(f"{out}.1").read_text())}
    for m in [*MESHES, "1,1,1"]:
        result[m]["params"] = dict(np.load(f"{out}.{8 if m in MESHES else 1}.{m.replace(',', '_')}.npz"))
    return result


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_equal_single_device(sharded, mesh):
    losses, params = sharded["1,1,1"]["losses"], sharded["1,1,1"]["params"]
    # float32 sums reordered across devices differ in the last bits; after 3 Adam steps of lr 2e-3 the
    # parameters agree to ~1e-6, so 1e-5 is tight enough to catch any wrong sharding (those are O(1e-3)).
    np.testing.assert_allclose(sharded[mesh]["losses"], losses, rtol=1e-5)
    assert sharded[mesh]["params"].keys() == params.keys()
    for name, value in params.items():
        np.testing.assert_allclose(sharded[mesh]["params"][name], value, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_parameters_are_sharded_as_the_rules_say(sharded):
    for mesh in MESHES:
        sizes = dict(zip(sharding.AXES, (int(n) for n in mesh.split(","))))
        specs, layout = sharded[mesh]["specs"], sharded[mesh]["layout"]
        assert specs.keys() == layout.keys() == sharded["1,1,1"]["params"].keys()
        for path, spec in specs.items():
            assert spec == EXPECTED_SPECS[re.sub(r"^\['h_\d+'\]", "", path)], (mesh, path)
            # A device holds 1/n of each dimension split over a mesh axis of n devices, all of the others.
            shape, shard, replicated = layout[path]
            ways = [sizes[axis] if axis else 1 for axis in spec]
            assert shard == [n // w for n, w in zip(shape, ways)] and replicated == (ways == [1] * len(ways)), \
                (mesh, path, layout[path])
    # Data parallelism (data=8): every device holds every parameter whole. The specs still name fsdp and
    # tensor, but those mesh axes have one device each.
    assert all(replicated and shard == shape for shape, shard, replicated in sharded["8,1,1"]["layout"].values())
    # data=2 x fsdp=2 x tensor=2: every parameter is split, over fsdp, tensor or both (4 heads of width c/4).
    layout, c = sharded["2,2,2"]["layout"], TINY_MODEL["n_embd"]
    assert not any(replicated for _, _, replicated in layout.values())
    assert layout["['h_0']['mlp']['c_fc']['kernel']"][:2] == [[c, 4 * c], [c // 2, 2 * c]]  # embed/fsdp, mlp/tensor
    assert layout["['wte']['embedding']"][:2] == [[256, c], [128, c // 2]]  # vocab/tensor, embed/fsdp
    assert layout["['h_1']['attn']['c_attn']['kernel']"][:2] == [[c, 3, 4, c // 4], [c // 2, 3, 2, c // 4]]
    # Per-device bytes of params + optimizer state: FSDP over 8 holds about 1/8 of the replicated copy
    # (only a few small biases without an embed axis, and Adam's step counters, stay replicated).
    ratio = sharded["1,8,1"]["shard_bytes"] / sharded["8,1,1"]["shard_bytes"]
    assert 1 / 8 <= ratio < 0.14, ratio


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert sharding.mesh_shape(MeshConfig(mesh_fsdp=-1), 8) == (1, 8, 1)
    assert sharding.mesh_shape(MeshConfig(mesh_data=2, mesh_tensor=-1), 8) == (2, 1, 4)
    with pytest.raises(ConfigError, match="but there are 8"):
        sharding.mesh_shape(MeshConfig(mesh_data=2, mesh_fsdp=2, mesh_tensor=1), 8)
    with pytest.raises(ConfigError, match="does not divide"):
        sharding.mesh_shape(MeshConfig(mesh_fsdp=3), 8)


@pytest.mark.slow
def test_checkpoint_saved_on_fsdp_restores_on_other_meshes(cli, data_dir, tmp_path):
    out = tmp_path / "fsdp"
    r = cli("train.py", *tiny_model_flags(n_head=4), f"--batch_size={TINY_TRAIN['batch_size']}", "--max_iters=10",
            "--eval_interval=10", "--eval_iters=1", f"--data_dir={data_dir}", f"--out_dir={out}",
            "--mesh_data=1", "--mesh_fsdp=8", devices=8)  # 4 heads: the restore below splits them over tensor=4
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'fsdp': 8" in r.stdout
    # The values restored on one device (here) equal those restored on data=2 x tensor=4 (8 devices).
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_steps.py"), "restore", str(tmp_path / "p.npz"),
                        str(out), "2,1,4"], env=simulated_devices_env(8), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    on_mesh, on_one = dict(np.load(tmp_path / "p.npz")), restored_params(str(out), (1, 1, 1))
    assert on_mesh.keys() == on_one.keys()
    for name in on_one:
        np.testing.assert_array_equal(on_mesh[name], on_one[name], err_msg=name)
    greedy = ["--start=ROMEO:", "--temperature=0", "--max_new_tokens=16", "--num_samples=1", "--json=True"]
    single = cli("sample.py", f"--out_dir={out}", *greedy, devices=1)
    tensor = cli("sample.py", f"--out_dir={out}", *greedy, "--mesh_data=2", "--mesh_tensor=4", devices=8)
    assert single.returncode == 0 and tensor.returncode == 0, single.stderr + tensor.stderr
    a, b = json.loads(single.stdout), json.loads(tensor.stdout)
    assert len(a["tokens"]) == 16 and a["tokens"] == b["tokens"]
    # Beam search too: the same beams and scores on one device and on data=2 x tensor=4.
    beams = ["--start=ROMEO:", "--num_beams=3", "--num_return_sequences=2", "--max_new_tokens=12", "--json=True"]
    single = cli("sample.py", f"--out_dir={out}", *beams, devices=1)
    tensor = cli("sample.py", f"--out_dir={out}", *beams, "--mesh_data=2", "--mesh_tensor=4", devices=8)
    assert single.returncode == 0 and tensor.returncode == 0, single.stderr + tensor.stderr
    a, b = ([json.loads(line) for line in r.stdout.splitlines()] for r in (single, tensor))
    assert [row["beam"] for row in a] == [0, 1] and a[0]["score"] >= a[1]["score"]
    assert [row["tokens"] for row in a] == [row["tokens"] for row in b]
    np.testing.assert_allclose([row["score"] for row in a], [row["score"] for row in b], rtol=1e-4)
