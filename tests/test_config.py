"""The config's resolution and validation, pinned at their boundaries: each key's smallest accepted and
largest refused value, the parser's type rules, the automatic values, and the preset and argument order.
(The mutation run, tests/mutation.py, showed which of these nothing else pinned.)"""

import math

import pytest

from gpt.config import (ConfigError, ModelConfig, SampleConfig, _parse_value, load_config, load_preset,
                        read_args, validate_sample)

# key: (values accepted, values refused), each value tried alone over the defaults.
TRAIN_BOUNDS = {
    **{key: (["1"], ["0"]) for key in ("n_layer", "block_size", "batch_size", "max_iters", "eval_interval",
                                        "eval_iters", "log_interval", "keep_checkpoints",
                                        "gradient_accumulation_steps")},
    "n_head": (["1", "128"], ["0", "3"]),  # 128 / 3 is not whole
    "dropout": (["0", "0.99"], ["-0.01", "1", "1.5"]),
    "learning_rate": (["1e-9"], ["0", "-1e-3"]),
    "beta1": (["0", "0.999"], ["-0.1", "1", "1.5"]),
    "beta2": (["0", "0.999"], ["-0.1", "1", "1.5"]),
    **{key: (["0", "3.5"], ["-0.001"]) for key in ("weight_decay", "grad_clip", "peak_flops", "checkpoint_minutes",
                                                   "device_memory_gb")},
    "warmup_iters": (["-1", "0"], ["-2"]),
    "lr_decay_iters": (["-1", "100"], ["-2"]),
    "checkpoint_interval": (["0", "1"], ["-1"]),
    "min_lr": (["0", "0.002"], ["0.00201"]),  # the default learning_rate is 0.002: a flat floor is allowed
    "dtype": (["auto", "float32", "bfloat16"], ["float16", ""]),
    "attention": (["auto", "xla", "cudnn"], ["flash"]),
    "tokenizer": (["byte", "gpt2"], ["bpe"]),
    "loss_chunk": (["0", "64", "128"], ["-1", "48", "256"]),  # a divisor of block_size (128)
    "on_bad_record": (["error", "skip"], ["ignore"]),
    "num_proc": (["0", "1"], ["-1"]),
    "shard_mb": (["0.001"], ["0", "-1"]),
}
SAMPLE_BOUNDS = {
    "num_samples": ([1], [0]),
    "max_new_tokens": ([-1, 1, 100], [0, -2]),
    "temperature": ([0.0, 0.01], [-0.01]),
    "top_k": ([0, 1], [-1]),
    "top_p": ([1.0, 0.01], [0.0, -0.5, 1.01]),
    "init_from": (["resume", "."], ["/nonexistent-dir", "zzz-nonexistent"]),  # names before and after "resume"
    "num_beams": ([1, 4], [0, -1]),
    "repetition_penalty": ([0.01, 1.0, 2.0], [0.0, -1.0]),
    "no_repeat_ngram_size": ([0, 3], [-1]),
    "min_new_tokens": ([0, 5], [-1]),
    "min_p": ([0.0, 1.0], [-0.1, 1.1]),
    "early_stopping": (["true", "False", "never"], ["sometimes"]),
}


@pytest.mark.parametrize("key", TRAIN_BOUNDS)
def test_train_keys_at_their_boundaries(key):
    accepted, refused = TRAIN_BOUNDS[key]
    for value in accepted:
        load_config([f"--{key}={value}"])
    for value in refused:
        with pytest.raises(ConfigError, match=key):
            load_config([f"--{key}={value}"])


@pytest.mark.parametrize("key", SAMPLE_BOUNDS)
def test_sample_keys_at_their_boundaries(key):
    accepted, refused = SAMPLE_BOUNDS[key]
    for value in accepted:
        validate_sample(SampleConfig(**{key: value}))
    for value in refused:
        with pytest.raises(ConfigError, match=key):
            validate_sample(SampleConfig(**{key: value}))


def test_an_empty_prompt_is_refused_unless_prompts_come_from_a_file():
    with pytest.raises(ConfigError, match="start=''"):
        validate_sample(SampleConfig(start=""))
    validate_sample(SampleConfig(start="", prompts="p.jsonl"))


def test_n_embd_must_split_evenly_over_heads():
    load_config(["--n_embd=96", "--n_head=32"])  # 96 & 32 != 0 but 96 % 32 == 0: fine
    with pytest.raises(ConfigError, match="n_embd=128 is not divisible by n_head=3"):
        load_config(["--n_embd=128", "--n_head=3"])  # 128 & 3 == 0 but 128 % 3 != 0


@pytest.mark.parametrize("raw, kind, expected", [
    ("3", int, 3), ("1e3", int, 1000), ("-2", int, -2), (7, int, 7), ("2.5", float, 2.5), ("1e-3", float, 1e-3),
    (4, float, 4.0), ("true", bool, True), ("Yes", bool, True), ("1", bool, True), (" false ", bool, False),
    ("no", bool, False), ("0", bool, False), (True, bool, True), (False, bool, False), ("x", str, "x"),
])
def test_values_parse_to_the_field_type(raw, kind, expected):
    value = _parse_value("k", raw, kind)
    assert value == expected and type(value) is kind


@pytest.mark.parametrize("raw, kind", [
    ("1.5", int), ("abc", int), ("", float), ([1], float), (None, int), (True, int), (False, float),
    ("maybe", bool), ("2", bool), (3, str),
])
def test_values_of_the_wrong_type_are_refused(raw, kind):
    with pytest.raises(ConfigError, match=f"is not a valid {kind.__name__}"):
        _parse_value("k", raw, kind)


def test_unknown_keys_suggest_the_closest_one():
    with pytest.raises(ConfigError, match="unknown key 'learnin_rate' \\(did you mean 'learning_rate'\\?\\)"):
        load_config(["--learnin_rate=1"])
    with pytest.raises(ConfigError, match="unknown key 'zzz' \\(see --help"):
        load_config(["--zzz=1"])


@pytest.mark.parametrize("vocab", [1, 127, 128, 129, 256, 50257, 50304])
def test_padded_vocab_is_the_next_multiple_of_128(vocab):
    assert ModelConfig(vocab_size=vocab).padded_vocab_size == math.ceil(vocab / 128) * 128


def test_tokens_per_step_is_batch_times_accumulation_times_context():
    cfg = load_config(["--batch_size=3", "--gradient_accumulation_steps=5", "--block_size=7"])
    assert cfg.tokens_per_step == 3 * 5 * 7


def test_automatic_values_are_whole_steps():
    cfg = load_config(["--max_iters=805", "--eval_interval=35"])
    assert cfg.optim.warmup_iters == 80 and type(cfg.optim.warmup_iters) is int
    assert cfg.optim.lr_decay_iters == 805 and cfg.train.checkpoint_interval == 35


def test_a_preset_comes_first_and_only_once():
    assert read_args(["shakespeare_char"])[0][0] == "preset shakespeare_char"  # presets allowed by default
    with pytest.raises(ConfigError, match="unexpected argument 'shakespeare_char'"):
        read_args(["--n_layer=2", "shakespeare_char"])
    with pytest.raises(ConfigError, match="unexpected argument 'gpt2_124m'"):
        read_args(["shakespeare_char", "gpt2_124m"])
    with pytest.raises(ConfigError, match="unexpected argument 'shakespeare_char'"):
        read_args(["shakespeare_char"], allow_preset=False)


@pytest.mark.parametrize("warmup, decay, refused", [(5, 0, True), (0, 0, False), (150, 100, True), (100, 100, False)])
def test_the_warmup_must_end_by_the_decay_horizon(warmup, decay, refused):
    args = [f"--warmup_iters={warmup}", f"--lr_decay_iters={decay}", "--max_iters=800"]
    if refused:
        with pytest.raises(ConfigError, match=f"warmup_iters={warmup} is beyond the end of the decay"):
            load_config(args)
    else:
        load_config(args)


def test_a_base_cycle_names_the_file_that_closes_it(tmp_path):
    for name, base in (("a", "b"), ("b", "c"), ("c", "a")):
        (tmp_path / f"{name}.toml").write_text(f'base = "{tmp_path / base}.toml"\n')
    with pytest.raises(ConfigError, match=f"preset {tmp_path / 'c.toml'}: base '.*a.toml' makes a cycle"):
        load_preset(str(tmp_path / "a.toml"))


def test_a_preset_that_is_not_toml_is_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("n_layer = = 3\n")
    with pytest.raises(ConfigError, match=f"preset {tmp_path / 'bad.toml'}: "):
        load_preset(str(tmp_path / "bad.toml"))


def test_a_missing_base_deep_in_a_chain_names_the_file_that_asked_for_it(tmp_path):
    (tmp_path / "a.toml").write_text(f'base = "{tmp_path / "b.toml"}"\n')
    (tmp_path / "b.toml").write_text(f'base = "{tmp_path / "c.toml"}"\n')
    (tmp_path / "c.toml").write_text('base = "nowhere"\n')
    with pytest.raises(ConfigError, match=f"preset {tmp_path / 'c.toml'}: unknown base preset 'nowhere'"):
        load_preset(str(tmp_path / "a.toml"))


def test_the_defaults_validate():
    assert load_config([]).to_dict()["n_layer"] == ModelConfig().n_layer


def test_a_preset_writes_a_mixture_as_a_table_and_lists_as_arrays(tmp_path):
    (tmp_path / "mix.toml").write_text('log_to = ["jsonl", "tensorboard"]\n'
                                       '[dataset]\n"data/web" = 0.7\ncode = 0.3\n')
    cfg = load_config([str(tmp_path / "mix.toml")])
    assert cfg.data.dataset == "data/web:0.7,code:0.3"  # what --dataset would say
    assert cfg.train.log_to == "jsonl,tensorboard"
    (tmp_path / "sources.toml").write_text('dataset = ["a.jsonl", "b/*.parquet"]\n')
    assert load_config([str(tmp_path / "sources.toml")]).data.dataset == "a.jsonl+b/*.parquet"
    (tmp_path / "bad.toml").write_text('n_layer = [1, 2]\n')
    with pytest.raises(ConfigError, match="n_layer=.* is not a valid int"):
        load_config([str(tmp_path / "bad.toml")])
    (tmp_path / "bad2.toml").write_text('[dataset]\nweb = "a lot"\n')
    with pytest.raises(ConfigError, match="dataset=.* is not a valid str"):
        load_config([str(tmp_path / "bad2.toml")])


def test_beam_search_refuses_the_sampling_keys_it_was_given():
    """With num_beams > 1 sampling keys left at their defaults do not apply; given on the command line they are
    refused in one line (beam search here is deterministic)."""
    validate_sample(SampleConfig(num_beams=4))  # temperature 0.8 and num_samples 3 are only defaults here
    with pytest.raises(ConfigError, match="temperature=0.8 with num_beams=4"):
        validate_sample(SampleConfig(num_beams=4), frozenset({"temperature"}))
    validate_sample(SampleConfig(num_beams=4, temperature=0.0), frozenset({"temperature"}))
    with pytest.raises(ConfigError, match="num_return_sequences=5: must be in"):
        validate_sample(SampleConfig(num_beams=4, num_return_sequences=5))
