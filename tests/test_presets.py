"""The presets in configs/: they load and validate, inherit through `base`, and the GPT-2 ones keep nanoGPT's
tokens per step in a micro-batch that fits one 80 GB GPU. And bare boolean flags on the command line."""

import sys
from pathlib import Path

import pytest

from gpt.config import CONFIGS_DIR, Config, ConfigError, SampleArgs, load_config, load_preset, parse_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILES = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.toml"))
# configs/ also holds sweep grids (a [sweep] table: gpt/scaling/grid.py reads them), which are no presets.
GRIDS = [p for p in CONFIG_FILES if "sweep" in tomllib.loads(p.read_text(encoding="utf-8"))]
PRESETS = [p for p in CONFIG_FILES if p not in GRIDS]
GPT2 = ["gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m"]


def own_keys(name: str) -> dict:
    """The keys a preset file states itself, `base` included."""
    return tomllib.loads((CONFIGS_DIR / f"{name}.toml").read_text(encoding="utf-8"))


def test_the_installed_presets_are_the_ones_in_configs():
    assert sorted(p.name for p in CONFIGS_DIR.iterdir() if p.name.endswith(".toml")) == [p.name for p in CONFIG_FILES]


@pytest.mark.parametrize("name", [p.stem for p in PRESETS])
def test_every_preset_loads_and_validates(name):
    cfg = load_config([name])
    assert cfg.to_dict().items() >= load_preset(name).items()  # every key it states, as it states it


@pytest.mark.parametrize("name", [p.stem for p in GRIDS])
def test_a_sweep_grid_given_as_a_preset_is_refused_with_what_to_run(name):
    assert GRIDS  # configs/scaling_shakespeare.toml at least
    with pytest.raises(ConfigError, match=f"{name} is a sweep grid: run it with python -m gpt.scaling run"):
        load_config([name])


@pytest.mark.parametrize("name", ["gpt2_350m", "gpt2_774m", "gpt2_1558m"])
def test_an_inheriting_preset_is_its_base_but_for_the_keys_it_states(name):
    own = own_keys(name)
    base = own.pop("base")
    assert base == "gpt2_124m"
    assert load_preset(name) == {**load_preset(base), **own}
    derived, parent = load_config([name]).to_dict(), load_config([base]).to_dict()
    assert {k for k in derived if derived[k] != parent[k]} <= set(own)


def test_a_base_cycle_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "a.toml").write_text(f'base = "{tmp_path / "b.toml"}"\nn_layer = 2\n')
    (tmp_path / "b.toml").write_text(f'base = "{tmp_path / "a.toml"}"\n')
    with pytest.raises(ConfigError) as e:
        load_config([str(tmp_path / "a.toml")])
    message = str(e.value)
    assert f"preset {tmp_path / 'b.toml'}: base" in message and "cycle" in message and "\n" not in message


def test_a_missing_base_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "child.toml").write_text('base = "gpt2_12m"\n')
    with pytest.raises(ConfigError) as e:
        load_config([str(tmp_path / "child.toml")])
    message = str(e.value)
    assert message.startswith(f"preset {tmp_path / 'child.toml'}: unknown base preset 'gpt2_12m'")
    assert "gpt2_124m" in message and "\n" not in message  # and it lists the presets there are


@pytest.mark.parametrize("name", GPT2)
def test_gpt2_presets_keep_nanogpt_tokens_per_step(name):
    cfg = load_config([name])
    assert cfg.data.batch_size * cfg.optim.gradient_accumulation_steps * cfg.model.block_size == 491_520


@pytest.mark.parametrize("name", GPT2)
def test_gpt2_micro_batch_fits_one_80gb_gpu(name):
    """The arithmetic of the presets' comments: activations of a pre-LN block without remat (Korthikanti et al.
    2022), float32 logits and their gradient, and 16 bytes per parameter (float32 weights, grads, Adam), under
    48 GB: JAX preallocates 75% of the 80 GB and XLA's temporaries need the rest."""
    cfg = load_config([name])
    m, b = cfg.model, cfg.data.batch_size
    T, C, V = m.block_size, m.n_embd, 50304
    params = V * C + T * C + m.n_layer * (12 * C * C + 13 * C) + 2 * C
    activations = m.n_layer * (34 * b * T * C + 5 * b * m.n_head * T * T)
    assert activations + 2 * b * T * V * 4 + 16 * params < 48e9


def test_bare_boolean_flags_mean_true():
    assert parse_args(SampleArgs(), ["--json"], allow_preset=False).sample.json is True
    assert parse_args(SampleArgs(), ["--json=False"], allow_preset=False).sample.json is False
    assert parse_args(Config(), ["--overwrite", "--n_layer=2"]).train.overwrite is True


@pytest.mark.parametrize("argv, message", [
    (["--n_layer"], "'--n_layer' needs a value: it must be written --n_layer=VALUE"),
    (["--learning_rate"], "'--learning_rate' needs a value"),
    (["--overwrit"], "unknown key 'overwrit' (did you mean 'overwrite'?)"),
])
def test_bare_flags_that_are_not_booleans_are_refused(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(Config(), argv)
    assert message in str(e.value) and "\n" not in str(e.value)
