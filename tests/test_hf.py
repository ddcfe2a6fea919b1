"""GPT-2 weights in the Hugging Face layout: loading matches an independent numpy forward, export round-trips,
and bad files give one-line errors."""

import json
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from gpt.config import ConfigError
from gpt.hf import from_hf, save_hf, to_hf
from gpt.model import GPT
from tests.reference import numpy_gpt2


def hf_weights(n_layer, n_head, n_embd, n_positions=1024, vocab=50257, seed=0, prefix="transformer.", tied_head=False):
    """Random weights of GPT-2's shapes, in HF's layout."""
    rng = np.random.default_rng(seed)
    w = lambda *shape, std=0.02: (rng.standard_normal(shape, np.float32) * std).astype(np.float32)
    sd = {"wte.weight": w(vocab, n_embd), "wpe.weight": w(n_positions, n_embd, std=0.01),
          "ln_f.weight": 1 + w(n_embd, std=0.1), "ln_f.bias": w(n_embd)}
    for i in range(n_layer):
        h, c = f"h.{i}.", n_embd
        sd.update({h + "ln_1.weight": 1 + w(c, std=0.1), h + "ln_1.bias": w(c), h + "ln_2.weight": 1 + w(c, std=0.1),
                   h + "ln_2.bias": w(c), h + "attn.c_attn.weight": w(c, 3 * c), h + "attn.c_attn.bias": w(3 * c),
                   h + "attn.c_proj.weight": w(c, c), h + "attn.c_proj.bias": w(c), h + "mlp.c_fc.weight": w(c, 4 * c),
                   h + "mlp.c_fc.bias": w(4 * c), h + "mlp.c_proj.weight": w(4 * c, c), h + "mlp.c_proj.bias": w(c),
                   h + "attn.bias": np.tril(np.ones((1, 1, n_positions, n_positions), np.float32))})  # an old buffer
    sd = {prefix + k: v for k, v in sd.items()}
    if tied_head:
        sd["lm_head.weight"] = sd[prefix + "wte.weight"]
    return sd


def write_hf_dir(path, sd, n_layer, n_head, n_embd, n_positions=1024, vocab=50257):
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
              "n_positions": n_positions, "vocab_size": vocab, "activation_function": "gelu_new"}
    (path / "config.json").write_text(json.dumps(config))
    save_file(sd, path / "model.safetensors")
    return path


def logits_of(cfg, params, idx):
    return np.asarray(GPT(cfg).apply({"params": params}, idx)[0])[..., : cfg.vocab_size]


@pytest.mark.slow
def test_gpt2_124m_shapes_load_and_match_numpy(tmp_path):
    sd = hf_weights(12, 12, 768)
    cfg, params = from_hf(write_hf_dir(tmp_path / "gpt2", sd, 12, 12, 768))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    n = sum(x.size for x in jax.tree.leaves(params)) - (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    assert n == 124_439_808  # GPT-2 small's parameter count
    idx = np.array([[15496, 995, 11, 314, 1101, 257, 3303, 2746], [464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    np.testing.assert_allclose(logits_of(cfg, params, idx), numpy_gpt2(sd, idx, 12), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("prefix, tied_head", [("transformer.", True), ("", False)])
def test_small_gpt2_layouts_load_and_match_numpy(tmp_path, prefix, tied_head):
    sd = hf_weights(2, 4, 64, n_positions=64, vocab=300, prefix=prefix, tied_head=tied_head)
    cfg, params = from_hf(write_hf_dir(tmp_path / "m", sd, 2, 4, 64, 64, 300))
    idx = np.random.default_rng(1).integers(0, 300, (2, 40))
    np.testing.assert_allclose(logits_of(cfg, params, idx), numpy_gpt2(sd, idx, 4), rtol=1e-4, atol=1e-4)


def test_export_then_import_gives_identical_parameters(tmp_path):
    sd = hf_weights(2, 4, 64, n_positions=64, vocab=300)
    cfg, params = from_hf(write_hf_dir(tmp_path / "a", sd, 2, 4, 64, 64, 300))
    params["wte"]["embedding"][300:] = 1.0  # padding rows are not part of the HF layout: export drops them
    cfg2, back = from_hf(save_hf(cfg, params, tmp_path / "b"))
    assert cfg2 == cfg
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
        rows = slice(0, 300) if "wte" in jax.tree_util.keystr(path) else slice(None)
        np.testing.assert_array_equal(a[rows], b[rows], err_msg=jax.tree_util.keystr(path))
    exported = to_hf(cfg, params)
    assert all(np.array_equal(exported[k], v) for k, v in sd.items() if not k.endswith(".attn.bias"))


def test_bad_weight_files_give_clear_errors(tmp_path, monkeypatch):
    sd = hf_weights(2, 4, 64, n_positions=64, vocab=300)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"][:, :100]
    with pytest.raises(ConfigError, match=r"'h.1.mlp.c_fc.weight' has shape \[64, 100\], expected \[64, 256\]"):
        from_hf(write_hf_dir(tmp_path / "bad", sd, 2, 4, 64, 64, 300))
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    with pytest.raises(ConfigError, match="needs torch to read; without torch, convert it"):
        from_hf(tmp_path / "bin")
    sd = hf_weights(2, 4, 64, n_positions=64, vocab=300, tied_head=True)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(ConfigError, match="only a tied LM head"):
        from_hf(write_hf_dir(tmp_path / "untied", sd, 2, 4, 64, 64, 300))


@pytest.mark.slow
def test_cli_samples_finetunes_and_exports_hf_directories(cli, data_dir, tmp_path):
    hf_dir = write_hf_dir(tmp_path / "hf", hf_weights(2, 4, 64, n_positions=128), 2, 4, 64, 128)
    r = cli("sample.py", f"--init_from={hf_dir}", "--start=Hello world", "--max_new_tokens=5", "--temperature=0",
            "--num_samples=1", "--json=True")
    assert r.returncode == 0, r.stderr
    sample = json.loads(r.stdout)
    assert sample["prompt_tokens"] == [15496, 995] and len(sample["tokens"]) <= 5 and "GPT-2 weights" in r.stderr
    out = tmp_path / "ft"
    r = cli("train.py", f"--init_from={hf_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--batch_size=4",
            "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--learning_rate=1e-4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised from the GPT-2 weights" in r.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["n_embd"] == 64 and saved["block_size"] == 128 and saved["tokenizer"] == "gpt2"
    r = cli("train.py", f"--init_from={hf_dir}", f"--out_dir={tmp_path / 'x'}", "--n_layer=3")
    assert r.returncode == 2 and "is a model with n_layer=2" in r.stderr
    import subprocess

    r = subprocess.run([sys.executable, "-m", "gpt.cli", "export", f"--out_dir={out}", f"--to={tmp_path / 'exp'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg, params = from_hf(tmp_path / "exp")
    assert cfg.n_layer == 2 and cfg.vocab_size == 50257
