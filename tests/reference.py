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
