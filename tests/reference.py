"""GPT-2's forward pass in float64 numpy, written from the paper over a Hugging Face-layout state dict
(Conv1D weights [in, out], q/k/v packed in c_attn): the independent reference the model is checked against."""

import math

import numpy as np


def numpy_gpt2(sd: dict, idx: np.ndarray, n_head: int) -> np.ndarray:
    """Logits [B, T, vocab] for token ids idx [B, T]; keys with or without the `transformer.` prefix."""
    p = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in sd.items()}

    def layer_norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * p[name + ".weight"] + p[name + ".bias"]

    def gelu(x):  # tanh approximation: GPT-2's gelu_new
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, t = idx.shape
    x = p["wte.weight"][idx] + p["wpe.weight"][np.arange(t)]
    c = x.shape[-1]
    heads = lambda a: a.reshape(b, t, n_head, c // n_head).transpose(0, 2, 1, 3)
    n_layer = len({k.split(".")[1] for k in p if k.startswith("h.")})
    for i in range(n_layer):
        h = f"h.{i}."
        q, k, v = np.split(layer_norm(x, h + "ln_1") @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"], 3, -1)
        att = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(c // n_head)
        att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = ((att / att.sum(-1, keepdims=True)) @ heads(v)).transpose(0, 2, 1, 3).reshape(b, t, c)
        x = x + y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"]
        m = gelu(layer_norm(x, h + "ln_2") @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"])
        x = x + m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"]
    return layer_norm(x, "ln_f") @ p["wte.weight"].T


def numpy_gpt(cfg, params: dict, idx: np.ndarray) -> np.ndarray:
    """Logits [B, T, padded vocab] in float64 for token ids idx [B, T], from OUR parameter tree (the looped layout
    h_0 ... h_{L-1}, kernels shaped as gpt/model.py makes them), for every architecture switch of ModelConfig,
    each written from its paper: LayerNorm (Ba et al.) or RMSNorm (Zhang & Sennrich), eps 1e-5, a scale unless
    norm_scale=False, a bias for LayerNorm when cfg.bias; learned positions or RoPE (Su et al., GPT-NeoX's
    rotate-half pairing (i, i + hd/2), inv_freq = theta^(-2i/hd), on q and k after qk_norm); tanh-GELU, ReLU²
    (So et al.) or SwiGLU (Shazeer: silu(x W_gate) * (x W_up)); qk_norm = RMSNorm of each head's q and k;
    grouped-query attention (Ainslie et al.: query head j reads key/value head j // (heads / kv_heads)); a tied
    or untied head; logits soft-capped c * tanh(l / c). The padding rows of the vocabulary are left as they
    come: compare only [..., :vocab_size]."""
    p = _as_float64(params)
    b, t = idx.shape
    d, n_head, kv_heads = cfg.n_embd, cfg.n_head, cfg.n_kv_head or cfg.n_head
    hd = d // n_head

    def norm(x, q, rms=False):
        if rms or cfg.norm == "rmsnorm":
            y = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
        else:
            y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        if cfg.norm_scale:
            y = y * q["scale"]
        if not rms and cfg.norm == "layernorm" and cfg.bias:
            y = y + q["bias"]
        return y

    def dense(x, q, n_in=1):  # x @ kernel over x's last n_in axes, plus the bias if the model has biases
        y = np.tensordot(x, q["kernel"], axes=n_in)
        return y + q["bias"] if cfg.bias else y

    def gelu(x):  # tanh approximation: GPT-2's gelu_new
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def rope(x):  # x [B, T, heads, hd]: rotate the pairs (i, i + hd/2) by position * theta^(-2i/hd)
        inv_freq = cfg.rope_theta ** -(np.arange(0, hd, 2) / hd)
        angle = np.arange(t)[:, None] * inv_freq[None, :]  # [T, hd/2]
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = p["wte"]["embedding"][idx]
    if cfg.position == "learned":
        x = x + p["wpe"]["embedding"][np.arange(t)]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.n_layer):
        h = p[f"h_{i}"]
        a = h["attn"]
        z = norm(x, h.get("ln_1", {}))
        if "c_attn" in a:
            qkv = dense(z, a["c_attn"])  # [B, T, 3, heads, hd]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = dense(z, a["c_q"])  # [B, T, heads, hd]
            kv = dense(z, a["c_kv"])  # [B, T, 2, kv_heads, hd]
            k, v = kv[:, :, 0], kv[:, :, 1]
        if cfg.qk_norm:
            q, k = norm(q, a.get("q_norm", {}), rms=True), norm(k, a.get("k_norm", {}), rms=True)
        if cfg.position == "rope":
            q, k = rope(q), rope(k)
        y = np.zeros_like(q)
        for j in range(n_head):
            g = j // (n_head // kv_heads)
            att = q[:, :, j] @ k[:, :, g].transpose(0, 2, 1) / math.sqrt(hd)  # [B, T, T]
            att = np.where(causal, att, -np.inf)
            att = np.exp(att - att.max(-1, keepdims=True))
            y[:, :, j] = (att / att.sum(-1, keepdims=True)) @ v[:, :, g]
        x = x + dense(y, a["c_proj"], n_in=2)
        z = norm(x, h.get("ln_2", {}))
        m = h["mlp"]
        if cfg.mlp == "swiglu":
            gate_up = dense(z, m["c_fc"])  # [B, T, 2, hidden]
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
            u = gate / (1 + np.exp(-gate)) * up
        else:
            u = dense(z, m["c_fc"])
            u = gelu(u) if cfg.mlp == "gelu" else np.maximum(u, 0) ** 2
        x = x + dense(u, m["c_proj"])
    x = norm(x, p.get("ln_f", {}))
    logits = x @ (p["wte"]["embedding"].T if cfg.tie_embeddings else p["lm_head"])
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * np.tanh(logits / cfg.logit_softcap)
    return logits


def _as_float64(tree):
    """A nested dict of arrays -> the same dict of float64 numpy arrays."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _as_float64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
