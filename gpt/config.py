"""Configuration: typed dataclasses, TOML presets, flat `--key=value` overrides, validation.

Every key is unique across sections, so the command line stays flat (`--n_layer=4`, `--mesh_fsdp=8`)
while the code reads `cfg.model.n_layer`. The dataclass defaults *are* the default preset: a small
character-level model on the built-in Shakespeare corpus that trains in minutes on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The presets: configs/ in the clone, installed as the package gpt.configs (pyproject.toml), so a wheel has them.
CONFIGS_DIR = importlib.resources.files("gpt.configs")


class ConfigError(ValueError):
    """A bad key or value; the message is one line meant for the user."""


def opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


# gpt/model.py's REMAT_POLICIES holds what each name (but "none") keeps for the backward pass.
REMAT_CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "minimal")


@dataclass
class ModelConfig:
    n_layer: int = opt(4, "transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(128, "residual stream width")
    block_size: int = opt(128, "context length in tokens")
    vocab_size: int = opt(0, "tokenizer vocabulary; 0 = take it from the tokenizer (padded to 128 in the model)")
    dropout: float = opt(0.0, "dropout rate in [0, 1)")
    bias: bool = opt(True, "biases in linear layers and LayerNorms (GPT-2 has them)")
    dtype: str = opt("auto", "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 or bfloat16; "
                             "parameters stay float32")
    attention: str = opt("auto", "training attention kernel: auto (cuDNN flash attention on NVIDIA GPUs in bf16, "
                                 "XLA otherwise), xla, or cudnn")
    remat: str = opt("none", "recompute block activations in the backward pass: none, full, dots_saveable, "
                             "dots_with_no_batch_dims_saveable, minimal (keep attention output and MLP input)")
    scan_layers: bool = opt(False, "run the blocks as one jax.lax.scan over stacked parameters: compile time "
                                   "independent of depth (checkpoints keep the layout they were written in)")
    loss_chunk: int = opt(0, "compute the LM head and cross-entropy this many positions at a time (a divisor of "
                             "block_size), so the [batch, T, vocab] logits are never held whole; 0 = all at once")
    # The architecture switches beyond GPT-2 (the defaults are GPT-2's): gpt/model.py says what each computes.
    norm: str = opt("layernorm", "layernorm (GPT-2's; its bias follows `bias`) or rmsnorm")
    norm_scale: bool = opt(True, "a learned scale in every norm; False = parameter-free norms (as nanochat)")
    position: str = opt("learned", "learned (GPT-2's position embedding) or rope (rotary, on q and k)")
    rope_theta: float = opt(10000.0, "rope: the base of the rotary frequencies")
    mlp: str = opt("gelu", "gelu (GPT-2's tanh GELU, hidden 4 x n_embd), relu2 (ReLU squared, 4 x n_embd) or swiglu "
                           "(SiLU-gated, hidden 8/3 x n_embd rounded up to a multiple of 64: about gelu's parameters)")
    qk_norm: bool = opt(False, "RMSNorm of each head's queries and keys before attention (and before rope)")
    tie_embeddings: bool = opt(True, "the LM head is the token embedding (GPT-2); False = a separate head matrix")
    logit_softcap: float = opt(0.0, "cap logits smoothly at +-c: c * tanh(logits / c); 0 = off")
    n_kv_head: int = opt(0, "key/value heads (grouped-query attention: a divisor of n_head; the KV cache shrinks by "
                            "n_head / n_kv_head); 0 = n_head")
    zero_init: bool = opt(False, "initialise the output projections (attention's and the MLP's c_proj, and an untied "
                                 "head) to zero instead of GPT-2's scaled normal")

    @property
    def compute_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        import jax

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4 x n_embd, or for swiglu 8/3 x n_embd rounded up to a multiple of 64 (its
        three matrices then hold about as many parameters as the other MLPs' two)."""
        if self.mlp == "swiglu":
            return 64 * -(-8 * self.n_embd // (3 * 64))
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to a multiple of 128 so it shards evenly (nanoGPT's 50304)."""
        return -(-self.vocab_size // 128) * 128


# The ModelConfig keys that define the function a checkpoint's parameters compute: fixed for a checkpoint (the
# others say how it computes: precision, kernels, memory; zero_init only how it starts).
ARCHITECTURE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "norm", "norm_scale",
                     "position", "rope_theta", "mlp", "qk_norm", "tie_embeddings", "logit_softcap", "n_kv_head")


@dataclass
class DataConfig:
    dataset: str = opt("shakespeare", "a built-in corpus name, or files to prepare: a .txt/.jsonl/.json/.parquet file "
                                      "(optionally .gz/.zst), a directory or a glob; SRC+SRC prepares several as one "
                                      "corpus; NAME:W,NAME:W mixes corpora with weights (a TOML table in a preset)")
    tokenizer: str = opt("byte", "byte (vocab 256) or gpt2 (tiktoken, offline)")
    data_dir: str = opt("data", "where prepared corpora (token shards and meta.json) live")
    text_field: str = opt("text", "the field (.jsonl/.json) or column (.parquet) that holds each document's text")
    on_bad_record: str = opt("error", "a record that cannot be read (bad JSON, no text field, unreadable file): "
                                      "error (stop, naming file and line) or skip (count and go on)")
    num_proc: int = opt(0, "tokenizer worker processes when preparing; 0 = one per core (one in all for the byte "
                           "tokenizer, which workers only slow down)")
    shard_mb: float = opt(1000.0, "largest token file written when preparing, in MB; more tokens go to further shards")
    batch_size: int = opt(32, "global sequences per micro-step, over all devices and processes")


@dataclass
class OptimConfig:
    optimizer: str = opt("adamw", "adamw, or muon: Muon's orthogonalised momentum for the blocks' matrices and AdamW "
                                  "for the embeddings, head, norms and biases")
    learning_rate: float = opt(2e-3, "peak learning rate (of AdamW's parameters, with optimizer=muon)")
    muon_learning_rate: float = opt(0.02, "optimizer=muon: peak learning rate of the Muon matrices (same schedule)")
    muon_momentum: float = opt(0.95, "optimizer=muon: Muon's (Nesterov) momentum")
    weight_decay: float = opt(0.1, "decoupled weight decay, applied to matrices and embeddings only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.99, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip gradients to this global norm; 0 disables")
    decay_lr: bool = opt(True, "decay the learning rate after warmup (as schedule says); False holds it")
    schedule: str = opt("cosine", "after warmup: cosine (down to min_lr at lr_decay_iters), linear (straight down to "
                                  "min_lr at lr_decay_iters) or wsd (warmup-stable-decay: hold learning_rate, then "
                                  "linearly down to min_lr over the last cooldown_frac of lr_decay_iters)")
    cooldown_frac: float = opt(0.2, "wsd: the fraction of lr_decay_iters spent decaying, in (0, 1]")
    warmup_iters: int = opt(-1, "linear warmup steps; -1 = 10% of max_iters")
    lr_decay_iters: int = opt(-1, "step where the decay (cosine, linear or wsd) reaches min_lr; -1 = max_iters")
    min_lr: float = opt(-1.0, "final learning rate; -1 = learning_rate / 10")
    gradient_accumulation_steps: int = opt(1, "micro-steps accumulated per optimizer step")


@dataclass
class MeshConfig:
    mesh_data: int = opt(-1, "data-parallel mesh axis size; -1 = the remaining devices")
    mesh_fsdp: int = opt(1, "fully-sharded (ZeRO-3) mesh axis size; -1 = the remaining devices")
    mesh_tensor: int = opt(1, "tensor-parallel mesh axis size; -1 = the remaining devices")
    coordinator_address: str = opt("", "multi-host: host:port of process 0 (with num_processes, process_id)")
    num_processes: int = opt(1, "multi-host: number of processes")
    process_id: int = opt(0, "multi-host: this process's index")
    distributed: bool = opt(False, "multi-host: jax.distributed.initialize() from the cluster's environment (SLURM, TPU pod)")


@dataclass
class TrainConfig:
    out_dir: str = opt("out", "run directory: checkpoints, config.json, metrics.jsonl")
    init_from: str = opt("scratch", "scratch, resume (latest checkpoint in out_dir), RUN_DIR[@STEP] (start from "
                                    "another run's checkpoint: its parameters, optimizer state and step), or a local "
                                    "HF GPT-2 directory")
    reset_optimizer: bool = opt(False, "with init_from=RUN_DIR: take only the parameters; fresh optimizer state "
                                       "from step 0 (a new warmup and schedule)")
    overwrite: bool = opt(False, "allow init_from=scratch into an out_dir that holds checkpoints")
    max_iters: int = opt(800, "optimizer steps to train for")
    eval_interval: int = opt(200, "evaluate every N steps (and at the end)")
    eval_iters: int = opt(20, "validation batches per evaluation")
    eval_only: bool = opt(False, "evaluate the checkpoint in out_dir and exit")
    log_interval: int = opt(10, "log a train row every N steps")
    log_to: str = opt("jsonl", "where rows go besides out_dir/metrics.jsonl (always written): comma-separated "
                               "tensorboard (out_dir/tensorboard), wandb (WANDB_MODE=offline works with no network)")
    checkpoint_interval: int = opt(0, "save every N steps; 0 = eval_interval")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep")
    save_steps: str = opt("", "comma-separated steps to also save and always keep (the branch points of a WSD "
                              "sweep)")
    checkpoint_minutes: float = opt(0.0, "also save when this many minutes passed since the last save; 0 = off")
    skip_nonfinite: bool = opt(False, "skip (and count) batches with a non-finite loss instead of stopping")
    seed: int = opt(1337, "seed for initialisation, data order and dropout")
    peak_flops: float = opt(0.0, "per-device peak FLOP/s for MFU; 0 = known GPU/TPU peak or a measured CPU matmul")
    dry_run: bool = opt(False, "compile the train step without allocating it, print the memory/FLOPs plan as JSON "
                               "(also out_dir/plan.json) and exit: 0 if it fits, 3 if not")
    device_memory_gb: float = opt(0.0, "memory per device in GiB that the plan checks against; 0 = what the "
                                       "device reports (host RAM / devices on a CPU)")


@dataclass
class SampleConfig:
    init_from: str = opt("resume", "resume (a checkpoint in out_dir) or a local HF GPT-2 directory")
    out_dir: str = opt("out", "run directory to sample from")
    step: int = opt(-1, "checkpoint step to load; -1 = the latest")
    start: str = opt("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = opt(3, "samples to draw")
    max_new_tokens: int = opt(-1, "tokens generated per sample; -1 = fill the model's context after the prompt")
    temperature: float = opt(0.8, "softmax temperature; 0 = greedy")
    top_k: int = opt(0, "keep the k most likely tokens; 0 = all")
    top_p: float = opt(1.0, "nucleus: keep the smallest set with this much probability, in (0, 1]")
    min_p: float = opt(0.0, "keep the tokens at least min_p times as likely as the most likely one, in [0, 1]; 0 = off")
    repetition_penalty: float = opt(1.0, "CTRL's penalty on every token already in the text (> 0; 1 = off, 1.2 is usual)")
    no_repeat_ngram_size: int = opt(0, "never repeat an n-gram of this size (prompt included); 0 = off")
    min_new_tokens: int = opt(0, "no end-of-text before this many new tokens")
    num_beams: int = opt(1, "beam search with this many hypotheses per prompt (deterministic: temperature 0); 1 = off")
    length_penalty: float = opt(1.0, "beam search: a hypothesis scores sum(log p) / length ** length_penalty")
    early_stopping: str = opt("false", "beam search: true (stop at num_beams finished), false (stop when no running "
                                       "hypothesis can win, transformers' default) or never (canonical beam search)")
    num_return_sequences: int = opt(1, "beam search: the best hypotheses returned per prompt, at most num_beams")
    seed: int = opt(1337, "sampling seed")
    prompts: str = opt("", "a JSON-lines file of prompts (one JSON string per line), sampled as one batch")
    stop: str = opt("", "end a sample where this string appears (write \\n for a newline)")
    sliding_window: bool = opt(False, "allow prompt + max_new_tokens beyond block_size, re-reading the last half context")
    json: bool = opt(False, "print one JSON object per sample per line on stdout")


@dataclass
class ServeConfig:
    init_from: str = opt("resume", "resume (the latest checkpoint in out_dir) or a local HF GPT-2 directory")
    out_dir: str = opt("out", "run directory whose checkpoint is served")
    step: int = opt(-1, "checkpoint step to serve first; -1 = the latest")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "port to listen on")
    max_batch: int = opt(8, "requests decoded together (the KV cache holds this many whole contexts)")
    max_queue: int = opt(64, "requests waiting for a slot before more are refused (HTTP 429)")
    reload_interval: float = opt(10.0, "seconds between looks for a newer checkpoint in out_dir; 0 = only on "
                                       "POST /v1/reload")
    model_name: str = opt("", "the model's name in the API; empty = gpt-jax (or gpt2 for an HF directory)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over all devices and micro-steps."""
        return self.data.batch_size * self.optim.gradient_accumulation_steps * self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        """Flat {key: value}, the same keys the command line takes."""
        return {k: v for section in _sections(self) for k, v in dataclasses.asdict(section).items()}

    @classmethod
    def from_dict(cls, flat: dict[str, Any]) -> "Config":
        cfg = cls()
        _apply(cfg, flat, source="config")
        return cfg


# nanoGPT keys that mean nothing here, with what to use instead.
_FOREIGN_KEYS = {
    "device": "devices are chosen by JAX; shape them with --mesh_data/--mesh_fsdp/--mesh_tensor",
    "compile": "every step is compiled with jax.jit; there is nothing to switch",
    "backend": "collectives are chosen by JAX; use --mesh_* keys",
    "wandb_log": "use --log_to=wandb (metrics.jsonl is always written)",
    "wandb_project": "set the WANDB_PROJECT environment variable (with --log_to=wandb)",
    "wandb_run_name": "the wandb run is named after out_dir (with --log_to=wandb)",
    "always_save_checkpoint": "use --checkpoint_interval",
}


@dataclass
class ServeArgs:
    serve: ServeConfig = field(default_factory=ServeConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


@dataclass
class SampleArgs:
    sample: SampleConfig = field(default_factory=SampleConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


def _sections(obj: Any) -> list[Any]:
    """A dataclass of section dataclasses (Config, SampleArgs) -> its sections; a lone section -> [itself]."""
    values = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return values if all(dataclasses.is_dataclass(v) for v in values) else [obj]


def _fields(obj: Any) -> dict[str, tuple[Any, dataclasses.Field]]:
    """key -> (section instance, field), across every section of a Config (or one dataclass)."""
    return {f.name: (s, f) for s in _sections(obj) for f in dataclasses.fields(s)}


# String keys that a preset may write as a TOML list (joined with the separator the command line uses) or a
# table ({name = weight}, written NAME:W,NAME:W).
LIST_KEYS = {"dataset": "+", "log_to": ","}
TABLE_KEYS = {"dataset"}


def _parse_value(key: str, raw: Any, kind: type) -> Any:
    """Coerce a command-line string (or a TOML value) to the field's type, or say what is wrong."""
    bad = ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}")
    if kind is str:  # a TOML list or table is a list value, written flat as on the command line
        if isinstance(raw, list) and key in LIST_KEYS and all(isinstance(x, str) for x in raw):
            return LIST_KEYS[key].join(raw)
        if isinstance(raw, dict) and key in TABLE_KEYS and all(isinstance(v, (int, float)) for v in raw.values()):
            return ",".join(f"{k}:{v}" for k, v in raw.items())
        if not isinstance(raw, str):
            raise bad
        return raw
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise bad
    try:  # int or float; "1e3" is a fine int as long as it is whole
        value = float(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or (kind is int and not value.is_integer()):
        raise bad
    return int(value) if kind is int else value


def _apply(obj: Any, values: dict[str, Any], source: str) -> None:
    known = _fields(obj)
    for key, raw in values.items():
        if key in _FOREIGN_KEYS and key not in known:
            raise ConfigError(f"{source}: '{key}' has no meaning here: {_FOREIGN_KEYS[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else " (see --help for the keys)"
            raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        section, f = known[key]
        kind = {"int": int, "float": float, "bool": bool, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        if raw is BARE:  # only here is the key's type known: a bare boolean means True, anything else needs a value
            if kind is not bool:
                raise ConfigError(f"'--{key}' needs a value: it must be written --{key}=VALUE")
            raw = True
        setattr(section, key, _parse_value(key, raw, kind))


def load_preset(name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset is a flat TOML file: a path, or a name in configs/ (`gpt2_124m` -> configs/gpt2_124m.toml).
    `base = "other"` (found the same way) starts it from another preset, whose keys its own override.
    _chain holds the files whose bases led here, to name the culprit of a missing base or a cycle."""
    path = Path(name)
    if not path.is_file():
        path = CONFIGS_DIR / f"{name.removesuffix('.toml')}.toml"
    if not path.is_file():
        available = sorted(p.name.removesuffix(".toml") for p in CONFIGS_DIR.iterdir() if p.name.endswith(".toml"))
        where = f"preset {_chain[-1]}: unknown base" if _chain else "unknown"
        raise ConfigError(f"{where} preset '{name}': use a .toml path or one of {', '.join(available)}")
    if str(path) in _chain:
        raise ConfigError(f"preset {_chain[-1]}: base '{name}' makes a cycle: {' -> '.join([*_chain, str(path)])}")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {path}: {e}") from None
    if "sweep" in values:
        raise ConfigError(f"{path.stem} is a sweep grid: run it with python -m gpt.scaling run {name}")
    if "base" not in values:
        return values
    base = values.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"preset {path}: base={base!r} must be a preset name or a .toml path (a string)")
    return {**load_preset(base, (*_chain, str(path))), **values}


# The value of a bare `--key`: `_apply`, which knows the key's type, makes it True for a boolean or refuses it.
BARE = object()


def read_args(argv: list[str], allow_preset: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """`[preset] --key=value ...` -> [(source, {key: value})], preset first, command line last.
    A bare `--key` has the value BARE."""
    layers: list[tuple[str, dict[str, Any]]] = []
    overrides: dict[str, Any] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            overrides[key] = value if eq else BARE
        elif allow_preset and not overrides and not layers:
            layers.append((f"preset {arg}", load_preset(arg)))
        else:
            raise ConfigError(f"unexpected argument '{arg}': give options as --key=value")
    return layers + [("command line", overrides)]


def parse_args(obj: Any, argv: list[str], allow_preset: bool = True) -> Any:
    """Apply `[preset] --key=value ...` to the dataclass `obj` (a Config or a single section) in place."""
    return apply_layers(obj, read_args(argv, allow_preset))


def help_text(obj: Any, usage: str) -> str:
    lines = [usage, "", "Keys (--key=value), default and meaning:"]
    for key, (section, f) in _fields(obj).items():
        lines.append(f"  --{key:<28} {json.dumps(getattr(section, key)):<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _check_finite(obj: Any) -> None:
    """nan and inf parse as floats but mean nothing as a setting: refuse them for every float key."""
    for key, (section, _) in _fields(obj).items():
        value = getattr(section, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number")


def validate(cfg: Config) -> None:
    """Reject impossible values before anything compiles. Mesh divisibility is checked in sharding.py."""
    _check_finite(cfg)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    positive = {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
                "batch_size": d.batch_size, "max_iters": t.max_iters, "eval_interval": t.eval_interval,
                "eval_iters": t.eval_iters, "log_interval": t.log_interval, "keep_checkpoints": t.keep_checkpoints,
                "gradient_accumulation_steps": o.gradient_accumulation_steps}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: must be a positive integer")
    if m.n_embd % m.n_head:
        raise ConfigError(f"n_embd={m.n_embd} is not divisible by n_head={m.n_head}")
    if m.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"dtype={m.dtype!r}: use auto, float32 or bfloat16")
    if m.attention not in ("auto", "xla", "cudnn"):
        raise ConfigError(f"attention={m.attention!r}: use auto, xla or cudnn")
    if m.remat not in REMAT_CHOICES:
        raise ConfigError(f"remat={m.remat!r}: use {', '.join(REMAT_CHOICES)}")
    choices = {"norm": ("layernorm", "rmsnorm"), "position": ("learned", "rope"), "mlp": ("gelu", "relu2", "swiglu")}
    for key, allowed in choices.items():
        if getattr(m, key) not in allowed:
            raise ConfigError(f"{key}={getattr(m, key)!r}: use {' or '.join(allowed)}")
    if m.n_kv_head < 0 or m.n_head % m.kv_heads:
        raise ConfigError(f"n_kv_head={m.n_kv_head}: must be 0 (= n_head) or a divisor of n_head={m.n_head}")
    if m.position == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError(f"position=rope needs an even head_dim (n_embd / n_head), not {m.n_embd // m.n_head}")
    if m.rope_theta <= 0:
        raise ConfigError(f"rope_theta={m.rope_theta}: must be > 0")
    if m.logit_softcap < 0:
        raise ConfigError(f"logit_softcap={m.logit_softcap}: must be >= 0 (0 = off)")
    if m.loss_chunk < 0 or (m.loss_chunk and m.block_size % m.loss_chunk):
        raise ConfigError(f"loss_chunk={m.loss_chunk}: must be 0 or a divisor of block_size={m.block_size}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"dropout={m.dropout}: must be in [0, 1)")
    validate_data(d)
    if t.init_from not in ("scratch", "resume") and not Path(split_init_from(t.init_from)[0]).is_dir():
        raise ConfigError(f"init_from={t.init_from!r}: use scratch, resume, a run directory (RUN_DIR or RUN_DIR@STEP) "
                          "or a Hugging Face GPT-2 directory")
    save_steps(t)  # refuses a malformed list
    if o.learning_rate <= 0:
        raise ConfigError(f"learning_rate={o.learning_rate}: must be > 0")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"{key}={getattr(o, key)}: must be in [0, 1)")
    for key, value in {"weight_decay": o.weight_decay, "grad_clip": o.grad_clip, "peak_flops": t.peak_flops,
                       "checkpoint_minutes": t.checkpoint_minutes, "device_memory_gb": t.device_memory_gb}.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")
    if o.warmup_iters < -1 or o.lr_decay_iters < -1 or t.checkpoint_interval < 0:
        raise ConfigError("warmup_iters and lr_decay_iters must be >= 0 (or -1 for auto); checkpoint_interval >= 0")
    # Schedules the user cannot have meant: a floor above the peak, a warmup past the decay horizon.
    if o.min_lr > o.learning_rate:
        raise ConfigError(f"min_lr={o.min_lr} is above learning_rate={o.learning_rate}: the schedule would rise")
    decay_end = o.lr_decay_iters if o.lr_decay_iters >= 0 else t.max_iters
    if o.warmup_iters > decay_end:
        raise ConfigError(f"warmup_iters={o.warmup_iters} is beyond the end of the decay (lr_decay_iters="
                          f"{o.lr_decay_iters}, max_iters={t.max_iters}): the warmup would never finish")
    if o.schedule not in ("cosine", "linear", "wsd"):
        raise ConfigError(f"schedule={o.schedule!r}: use cosine, linear or wsd")
    if o.optimizer not in ("adamw", "muon"):
        raise ConfigError(f"optimizer={o.optimizer!r}: use adamw or muon")
    if o.muon_learning_rate <= 0:
        raise ConfigError(f"muon_learning_rate={o.muon_learning_rate}: must be > 0")
    if not 0.0 <= o.muon_momentum < 1.0:
        raise ConfigError(f"muon_momentum={o.muon_momentum}: must be in [0, 1)")
    if not 0.0 < o.cooldown_frac <= 1.0:
        raise ConfigError(f"cooldown_frac={o.cooldown_frac}: must be in (0, 1]")
    warmup = o.warmup_iters if o.warmup_iters >= 0 else auto_warmup(t.max_iters)  # as resolve() will
    if o.schedule == "wsd" and warmup > cooldown_start(o.cooldown_frac, decay_end):
        raise ConfigError(f"warmup_iters={warmup} runs into the wsd cooldown, which starts at step "
                          f"{cooldown_start(o.cooldown_frac, decay_end)}: lower cooldown_frac or warmup_iters")


def validate_data(d: DataConfig) -> None:
    """The DataConfig keys that `prepare` also takes on its own."""
    if d.tokenizer not in ("byte", "gpt2"):
        raise ConfigError(f"tokenizer={d.tokenizer!r}: use byte or gpt2")
    if d.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record={d.on_bad_record!r}: use error or skip")
    if d.num_proc < 0:
        raise ConfigError(f"num_proc={d.num_proc}: must be >= 1, or 0 for one per core")
    if not 0 < d.shard_mb < math.inf:
        raise ConfigError(f"shard_mb={d.shard_mb}: must be a number > 0")


def auto_warmup(max_iters: int) -> int:
    """warmup_iters=-1: 10% of the run."""
    return max_iters // 10


def cooldown_start(cooldown_frac: float, decay_end: int) -> int:
    """The step where a wsd schedule leaves its stable phase: the last cooldown_frac of the steps up to
    decay_end decay. A WSD sweep branches its cooldowns from checkpoints at exactly these steps."""
    return decay_end - round(cooldown_frac * decay_end)


def split_init_from(init_from: str) -> tuple[str, int]:
    """RUN_DIR@STEP -> (RUN_DIR, STEP); RUN_DIR (or any other value) -> (it, -1, meaning the latest)."""
    path, at, step = init_from.rpartition("@")
    if not at or not step.isdigit():
        return init_from, -1
    return path, int(step)


def save_steps(t: TrainConfig) -> set[int]:
    """The steps of save_steps ("100,200") as a set; one line if the list is malformed."""
    items = [x.strip() for x in t.save_steps.split(",") if x.strip()]
    if not all(x.isdigit() for x in items):
        raise ConfigError(f"save_steps={t.save_steps!r}: must be comma-separated non-negative step numbers")
    return {int(x) for x in items}


def resolve(cfg: Config) -> Config:
    """Fill the automatic (-1) values from the others, so the saved config says what actually ran."""
    o, t = cfg.optim, cfg.train
    if o.warmup_iters == -1:
        o.warmup_iters = auto_warmup(t.max_iters)
    if o.lr_decay_iters == -1:
        o.lr_decay_iters = t.max_iters
    if o.min_lr < 0:
        o.min_lr = o.learning_rate / 10
    if t.checkpoint_interval == 0:
        t.checkpoint_interval = t.eval_interval
    return cfg


def load_config(argv: list[str]) -> Config:
    """`[preset] --key=value ...` -> a validated Config with its automatic values resolved."""
    cfg = parse_args(Config(), argv)
    validate(cfg)
    return resolve(cfg)


def validate_sample(s: SampleConfig, asked: frozenset = frozenset()) -> None:
    """asked: the keys given on the command line; with beam search, sampling keys given there are refused
    (left at their defaults they do not apply)."""
    _check_finite(s)
    if s.num_samples < 1:
        raise ConfigError(f"num_samples={s.num_samples}: must be >= 1")
    if s.num_beams < 1:
        raise ConfigError(f"num_beams={s.num_beams}: must be >= 1 (1 = no beam search)")
    if not 1 <= s.num_return_sequences <= s.num_beams:
        raise ConfigError(f"num_return_sequences={s.num_return_sequences}: must be in [1, num_beams={s.num_beams}]")
    if s.early_stopping.lower() not in ("true", "false", "never"):
        raise ConfigError(f"early_stopping={s.early_stopping!r}: use true, false or never")
    if s.num_beams > 1 and s.sliding_window:
        raise ConfigError(f"sliding_window=True with num_beams={s.num_beams}: beam search needs prompt + "
                          "max_new_tokens within block_size")
    if s.num_beams > 1:
        sampling = {"temperature": s.temperature > 0, "top_k": s.top_k > 0, "top_p": s.top_p < 1, "min_p": s.min_p > 0,
                    "num_samples": s.num_samples > 1}
        for key, used in sampling.items():
            if key in asked and used:
                raise ConfigError(f"{key}={getattr(s, key)} with num_beams={s.num_beams}: beam search here is "
                                  "deterministic (no sampling); drop it, or use --num_return_sequences for several")
    if s.repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty={s.repetition_penalty}: must be > 0 (1 = off)")
    if s.no_repeat_ngram_size < 0 or s.min_new_tokens < 0:
        raise ConfigError("no_repeat_ngram_size and min_new_tokens must be >= 0 (0 = off)")
    if not 0.0 <= s.min_p <= 1.0:
        raise ConfigError(f"min_p={s.min_p}: must be in [0, 1] (0 = off)")
    if s.max_new_tokens < 1 and s.max_new_tokens != -1:
        raise ConfigError(f"max_new_tokens={s.max_new_tokens}: must be >= 1, or -1 to fill the context")
    if s.temperature < 0:
        raise ConfigError(f"temperature={s.temperature}: must be >= 0 (0 = greedy)")
    if s.top_k < 0:
        raise ConfigError(f"top_k={s.top_k}: must be >= 0 (0 = no top-k filter)")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"top_p={s.top_p}: must be in (0, 1]")
    check_model_source(s.init_from)
    if s.start == "" and not s.prompts:
        raise ConfigError("start='': the prompt is empty; give at least one character")


def validate_serve(s: ServeConfig) -> None:
    _check_finite(s)
    if not 0 < s.port < 65536:
        raise ConfigError(f"port={s.port}: must be in 1..65535")
    if s.max_batch < 1 or s.max_queue < 1:
        raise ConfigError(f"max_batch={s.max_batch}, max_queue={s.max_queue}: both must be >= 1")
    if s.reload_interval < 0:
        raise ConfigError(f"reload_interval={s.reload_interval}: must be >= 0 (0 = only on request)")
    check_model_source(s.init_from)


def check_model_source(init_from: str) -> None:
    """What sample.py and the server load: resume (a checkpoint in out_dir) or a Hugging Face directory."""
    if init_from != "resume" and not Path(init_from).is_dir():
        raise ConfigError(f"init_from={init_from!r}: use resume or a Hugging Face GPT-2 directory")


def check_writable_dir(key: str, path: str) -> None:
    """Create the directory the key names if needed; one line if that fails or it cannot be written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path!r}: cannot create that directory ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path!r}: that directory is not writable")


def apply_layers(obj: Any, layers: list[tuple[str, dict[str, Any]]]) -> Any:
    """Apply layers from read_args (preset first, command line last) to the dataclass obj in place."""
    for source, values in layers:
        _apply(obj, values, source)
    return obj
