"""GPT-2 weights to and from the Hugging Face layout (a local directory only: no hub download).

HF's GPT-2 stores Conv1D weights as [in, out], packs q, k, v along c_attn's output, uses the tanh GELU
("gelu_new") and LayerNorm eps 1e-5, and ties the LM head to `wte` (absent from the file, or equal to it).
Keys may carry a `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model). Our parameters differ only in
shape bookkeeping: q/k/v and heads are separate axes, and the vocabulary is padded to a multiple of 128.

    python -m gpt.cli export --out_dir=RUN [--step=N] --to=DIR     # a checkpoint as an HF directory
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt.config import ConfigError, ModelConfig
from gpt.model import stack_layers, unstack_layers

# Buffers some GPT-2 files carry that are not parameters (the causal mask).
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _read_state_dict(directory: Path) -> dict[str, np.ndarray]:
    if (directory / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise ConfigError(f"{directory}/pytorch_model.bin needs torch to read; without torch, convert it once "
                              "where torch is installed: python -c \"import torch, safetensors.torch as s; "
                              "s.save_file(torch.load('pytorch_model.bin'), 'model.safetensors')\"") from None
        return {k: v.float().numpy() for k, v in torch.load(directory / "pytorch_model.bin", map_location="cpu").items()}
    raise ConfigError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")


def hf_model_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"init_from={directory}: no config.json there (expected a Hugging Face GPT-2 directory)")
    hf = json.loads(path.read_text())
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{path}: activation_function={act!r}; only GPT-2's tanh GELU (gelu_new) is supported")
    return ModelConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                       bias=True, dropout=0.0)


def from_hf(directory: str | Path, scan_layers: bool = False) -> tuple[ModelConfig, dict]:
    """(model config, parameters as nested arrays) from a local HF GPT-2 directory, in the per-layer layout
    or, with scan_layers, the stacked one."""
    directory = Path(directory)
    cfg = hf_model_config(directory)
    sd = {k.removeprefix("transformer."): v for k, v in _read_state_dict(directory).items()
          if not k.endswith(_BUFFERS)}
    c, n, hd, v = cfg.n_embd, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.vocab_size

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise ConfigError(f"{directory}: weight '{key}' is missing")
        value = np.asarray(sd.pop(key), np.float32)
        if value.shape != shape:
            raise ConfigError(f"{directory}: '{key}' has shape {list(value.shape)}, expected {list(shape)} "
                              f"for n_layer={cfg.n_layer}, n_head={n}, n_embd={c}")
        return value

    wte = take("wte.weight", (v, c))
    params = {"wte": {"embedding": np.pad(wte, ((0, cfg.padded_vocab_size - v), (0, 0)))},
              "wpe": {"embedding": take("wpe.weight", (cfg.block_size, c))},
              "ln_f": {"scale": take("ln_f.weight", (c,)), "bias": take("ln_f.bias", (c,))}}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": {"scale": take(p + "ln_1.weight", (c,)), "bias": take(p + "ln_1.bias", (c,))},
            "ln_2": {"scale": take(p + "ln_2.weight", (c,)), "bias": take(p + "ln_2.bias", (c,))},
            "attn": {"c_attn": {"kernel": take(p + "attn.c_attn.weight", (c, 3 * c)).reshape(c, 3, n, hd),
                                "bias": take(p + "attn.c_attn.bias", (3 * c,)).reshape(3, n, hd)},
                     "c_proj": {"kernel": take(p + "attn.c_proj.weight", (c, c)).reshape(n, hd, c),
                                "bias": take(p + "attn.c_proj.bias", (c,))}},
            "mlp": {"c_fc": {"kernel": take(p + "mlp.c_fc.weight", (c, 4 * c)), "bias": take(p + "mlp.c_fc.bias", (4 * c,))},
                    "c_proj": {"kernel": take(p + "mlp.c_proj.weight", (4 * c, c)),
                               "bias": take(p + "mlp.c_proj.bias", (c,))}}}
    head = sd.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, wte):
        raise ConfigError(f"{directory}: lm_head.weight differs from wte.weight; only a tied LM head is supported")
    if sd:
        raise ConfigError(f"{directory}: unexpected weights {sorted(sd)[:5]}")
    if scan_layers:
        cfg.scan_layers, params = True, stack_layers(params, cfg.n_layer)
    return cfg, params


def to_hf(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """Our parameters as an HF GPT2LMHeadModel state dict ([in, out] Conv1D weights, packed q/k/v)."""
    p = unstack_layers(params, cfg.n_layer) if cfg.scan_layers else params
    c, v = cfg.n_embd, cfg.vocab_size
    a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    sd = {"wte.weight": a(p["wte"]["embedding"])[:v], "wpe.weight": a(p["wpe"]["embedding"]),
          "ln_f.weight": a(p["ln_f"]["scale"]), "ln_f.bias": a(p["ln_f"]["bias"])}
    for i in range(cfg.n_layer):
        b, h = p[f"h_{i}"], f"h.{i}."
        sd.update({
            h + "ln_1.weight": a(b["ln_1"]["scale"]), h + "ln_1.bias": a(b["ln_1"]["bias"]),
            h + "ln_2.weight": a(b["ln_2"]["scale"]), h + "ln_2.bias": a(b["ln_2"]["bias"]),
            h + "attn.c_attn.weight": a(b["attn"]["c_attn"]["kernel"]).reshape(c, 3 * c),
            h + "attn.c_attn.bias": a(b["attn"]["c_attn"]["bias"]).reshape(3 * c),
            h + "attn.c_proj.weight": a(b["attn"]["c_proj"]["kernel"]).reshape(c, c),
            h + "attn.c_proj.bias": a(b["attn"]["c_proj"]["bias"]),
            h + "mlp.c_fc.weight": a(b["mlp"]["c_fc"]["kernel"]), h + "mlp.c_fc.bias": a(b["mlp"]["c_fc"]["bias"]),
            h + "mlp.c_proj.weight": a(b["mlp"]["c_proj"]["kernel"]), h + "mlp.c_proj.bias": a(b["mlp"]["c_proj"]["bias"]),
        })
    return {f"transformer.{k}": x for k, x in sd.items()}


def non_gpt2_keys(cfg: ModelConfig) -> list[str]:
    """`key=value` for each architecture key where cfg differs from GPT-2 (HF's GPT2LMHeadModel layout)."""
    gpt2 = ModelConfig()
    return [f"{k}={getattr(cfg, k)}" for k in ("bias", "norm", "norm_scale", "position", "mlp", "qk_norm",
                                               "tie_embeddings", "logit_softcap")
            if getattr(cfg, k) != getattr(gpt2, k)] + ([f"n_kv_head={cfg.n_kv_head}"] if cfg.kv_heads != cfg.n_head else [])


def save_hf(cfg: ModelConfig, params, directory: str | Path) -> Path:
    """Write config.json and model.safetensors that transformers' GPT2LMHeadModel.from_pretrained reads."""
    from safetensors.numpy import save_file

    foreign = non_gpt2_keys(cfg)
    if foreign:
        raise ConfigError(f"HF GPT-2 export needs GPT-2's layout, and this model has {', '.join(foreign)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
              "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "layer_norm_epsilon": 1e-5,
              "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(to_hf(cfg, params), directory / "model.safetensors", metadata={"format": "pt"})
    return directory
