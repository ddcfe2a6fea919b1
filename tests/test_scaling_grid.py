"""Sweep grids (gpt/scaling/grid.py): parameter and FLOP counts against hand-computed values, the three ways
of writing a grid, the WSD branch plan, sharding, and one-line refusals of bad grids."""

import jax
import pytest

from gpt.config import Config, ConfigError, cooldown_start
from gpt.model import init_params, param_counts
from gpt.scaling.__main__ import main
from gpt.scaling.grid import counts, flops, load_grid
from gpt.scaling.sweep import parse_shard, shard_points


def config(**model) -> Config:
    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def test_gpt2_small_counts_by_hand():
    """GPT-2 small (12 x 768, vocabulary 50257, context 1024), counted by hand: per block two LayerNorms
    (2 x 2 x 768), the attention and MLP matrices (12 x 768^2) and their biases (9 x 768); the tied token
    embedding 50257 x 768, the position embedding 1024 x 768, the final LayerNorm 2 x 768."""
    block = 4 * 768 + 12 * 768 ** 2 + 9 * 768
    assert block == 7_087_872
    cfg = config(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    assert counts(cfg) == {"params_total": 124_439_808, "params_non_embedding": 85_056_000}
    assert 12 * block + 2 * 768 == 85_056_000
    f = flops(cfg, tokens=1000)
    assert f["flops_6nd"] == 6 * 85_056_000 * 1000
    assert f["flops_attention"] == 12 * 12 * 768 * 1024 * 1000
    assert f["flops"] == f["flops_6nd"] + f["flops_attention"]


def test_tiny_counts_by_hand_and_from_the_real_parameter_tree():
    cfg = config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)
    hand = {"params_total": 2 * (4 * 32 + 12 * 32 ** 2 + 9 * 32) + 2 * 32 + 256 * 32 + 32 * 32,
            "params_non_embedding": 2 * (4 * 32 + 12 * 32 ** 2 + 9 * 32) + 2 * 32}
    assert counts(cfg) == hand == {"params_total": 34_688, "params_non_embedding": 25_472}
    real = param_counts(cfg.model, jax.eval_shape(lambda: init_params(cfg.model, jax.random.key(0))))
    assert (real["total"], real["non_embedding"]) == (hand["params_total"], hand["params_non_embedding"])


def write_grid(tmp_path, sweep: str, train: str = "block_size = 32\nbatch_size = 8\n"):
    path = tmp_path / "grid.toml"
    path.write_text(f"[sweep]\n{sweep}\n[train]\n{train}")
    return str(path)


def test_explicit_grid_is_every_shape_times_every_budget(tmp_path):
    _, _, points = load_grid(write_grid(tmp_path, 'shapes = [{n_layer = 1, n_embd = 32, n_head = 2}, '
                                        '{n_layer = 2, n_embd = 64, n_head = 2, learning_rate = 1e-3}]\n'
                                        'tokens = [2560, 25600]\nwarmup_frac = 0.5'))
    assert [(p.flags["n_layer"], p.steps, p.tokens) for p in points] == [
        (1, 10, 2560), (1, 100, 25600), (2, 10, 2560), (2, 100, 25600)]  # 256 tokens per step
    assert {p.flags["warmup_iters"] for p in points} == {5}  # one warmup for the grid: half the shortest run
    assert [p.flags.get("learning_rate") for p in points] == [None, None, 1e-3, 1e-3]  # a shape's own key
    assert all(p.mode == "cosine" and p.branch_of is None for p in points)


def test_isoflop_grid_spends_each_budget_on_every_shape(tmp_path):
    _, _, points = load_grid(write_grid(tmp_path, "depths = [1, 2]\naspect = 32\nhead_dim = 16\nflops = [1e10, 4e10]"))
    assert [(p.flags["n_layer"], p.flags["n_embd"], p.flags["n_head"]) for p in points] == [
        (1, 32, 2), (1, 32, 2), (2, 64, 4), (2, 64, 4)]  # the width rule: n_embd = 32 x depth
    for p in points:
        cfg = config(n_layer=p.flags["n_layer"], n_embd=p.flags["n_embd"], block_size=32, vocab_size=256)
        per_token = 6 * counts(cfg)["params_non_embedding"] + 12 * p.flags["n_layer"] * p.flags["n_embd"] * 32
        assert p.steps == round(p.compute_budget / per_token / 256)  # tokens = C / (6N + attention), in steps
        assert flops(cfg, p.tokens)["flops"] == pytest.approx(p.compute_budget, rel=256 * per_token / p.compute_budget)


def test_wsd_grid_branches_each_shorter_run_off_the_longest_at_its_cooldown(tmp_path):
    _, _, points = load_grid(write_grid(tmp_path, 'shapes = [{n_layer = 1, n_embd = 32, n_head = 2}]\n'
                                        'tokens = [2560, 5120, 12800]\nschedule = "wsd"\ncooldown_frac = 0.2'))
    trunk, *branches = sorted(points, key=lambda p: -p.steps)
    assert trunk.mode == "wsd" and trunk.steps == 50
    assert [(b.mode, b.branch_of, b.branch_step) for b in branches] == [
        ("wsd-branch", trunk.name, cooldown_start(0.2, 20)), ("wsd-branch", trunk.name, cooldown_start(0.2, 10))]
    assert trunk.flags["save_steps"] == "8,16" and trunk.save_steps == (8, 16)


def test_a_wsd_run_with_no_step_to_branch_from_runs_alone(tmp_path):
    """cooldown_frac=1: every run decays from step 0, which no run saves: each trains alone (as wsd)."""
    _, _, points = load_grid(write_grid(tmp_path, 'shapes = [{n_layer = 1, n_embd = 32, n_head = 2}]\n'
                                        'tokens = [2560, 5120]\nschedule = "wsd"\ncooldown_frac = 1.0\n'
                                        'warmup_frac = 0'))
    assert [(p.mode, p.branch_of, p.save_steps) for p in points] == [("wsd", None, ())] * 2
    assert all("save_steps" not in p.flags for p in points)


def test_shards_cover_the_grid_once_and_keep_a_wsd_shape_together(tmp_path):
    grid = 'shapes = [{n_layer = 1, n_embd = 32, n_head = 2}, {n_layer = 2, n_embd = 32, n_head = 2}]\n' \
           'tokens = [2560, 5120, 12800]'
    for schedule in ("cosine", "wsd"):
        _, _, points = load_grid(write_grid(tmp_path, f'{grid}\nschedule = "{schedule}"'))
        shards = [shard_points(points, i, 4) for i in range(4)]
        assert sorted(p.name for s in shards for p in s) == sorted(p.name for p in points)
        if schedule == "wsd":
            assert sorted(len(s) for s in shards) == [0, 0, 3, 3]  # two shapes, each whole on one machine
    assert parse_shard("2/3") == (2, 3)


@pytest.mark.parametrize("sweep, train, message", [
    ("depths = [1]\ntokens = [1e4]\nwidth = 3", "", "unknown [sweep] key(s) ['width']"),
    ("depths = [1]\ntokens = [1e4]\nflops = [1e9]", "", "give either tokens"),
    ("depths = [1]", "", "give either tokens"),
    ("tokens = [1e4]", "", "give either shapes"),
    ("depths = [1]\ntokens = [1e4, -5]", "", "must be a non-empty list of positive numbers"),
    ("shapes = [{n_layer = 1, n_embd = 32}]\ntokens = [1e4]", "", "lacks n_head"),
    ("depths = [1]\ntokens = [1e4]", "n_layers = 3\n", "unknown key 'n_layers' (did you mean 'n_layer'?)"),
    ("depths = [1]\ntokens = [1e4]", "max_iters = 3\n", "may not set max_iters"),
    ("depths = [1]\ntokens = [1e4]\naspect = 30", "", "head_dim=64 does not divide"),
    ("depths = [1]\ntokens = [1e4, 1.01e4]\naspect = 64", "block_size = 32\nbatch_size = 8\n", "the same shape and step count"),
    ('depths = [1]\ntokens = [1e4]\nschedule = "linear"', "", "schedule='linear'"),
    ("depths = [1]\ntokens = [1e4]", 'schedule = "wsd"\n', "[train] may not set schedule: use schedule in [sweep]"),
    ("depths = [1]\ntokens = [1e4]", "warmup_iters = 3\n", "may not set warmup_iters: use warmup_frac"),
    ("shapes = [{n_layer = 1, n_embd = 32, n_head = 2, reset_optimizer = true}]\ntokens = [1e4]", "",
     "may not set reset_optimizer"),
    ("depths = [1]\ntokens = [1e4]\nhead_dim = 0", "", "head_dim=0 must be a positive integer"),
    ('depths = [1]\ntokens = [1e4]\nwarmup_frac = "a tenth"', "", "warmup_frac='a tenth' must be a number in [0, 1]"),
    ("depths = [1]\ntokens = [1e4]\npreset = 3", "", "preset=3 must be a preset name or a .toml path"),
])
def test_bad_grids_are_refused_in_one_line_with_exit_code_2(tmp_path, capsys, sweep, train, message):
    path = write_grid(tmp_path, sweep, train or "block_size = 32\nbatch_size = 8\n")
    assert main(["run", path, f"--out={tmp_path / 'sweep'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    with pytest.raises(ConfigError):
        load_grid(path)


@pytest.mark.parametrize("argv, message", [
    (["run"], "run takes one grid file"),
    (["run", "nowhere.toml"], "no such file"),
    (["run", "{grid}", "--workers=0"], "workers='0'"),
    (["run", "{grid}", "--shard=3/3"], "shard='3/3'"),
    (["run", "{grid}", "--threads=2"], "unknown or malformed option '--threads=2'"),
    (["collect", "{tmp}"], "is not a sweep directory"),
    (["collect"], "collect takes one sweep directory"),
    (["bogus"], "unknown command 'bogus': use run, collect or fit"),
])
def test_bad_command_lines_are_refused_in_one_line(tmp_path, capsys, argv, message):
    grid = write_grid(tmp_path, "depths = [1]\ntokens = [1e4]")
    assert main([a.format(grid=grid, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_compare_puts_two_runs_of_a_grid_side_by_side():
    from gpt.scaling.collect import compare

    ours = [{"name": "p1", "val_loss": 2.0, "flops_spent": 1.0, "wall_s": 10.0},
            {"name": "p2", "val_loss": 1.5, "flops_spent": 1.0, "wall_s": 10.0}]
    theirs = [{"name": "p1", "val_loss": 2.1, "flops_spent": 2.0, "wall_s": 30.0},
              {"name": "p2", "val_loss": 1.4, "flops_spent": 2.0, "wall_s": 10.0},
              {"name": "p3", "val_loss": 9.0, "flops_spent": 9.0, "wall_s": 90.0}]
    text = compare(ours, theirs)
    assert "p1" in text and "-0.1000" in text and "+0.1000" in text and "p3" not in text
    assert "2 points in both: mean |diff| 0.1000, max 0.1000" in text
    assert "(0.50x)" in text and "20 s vs 40 s (0.50x)" in text
