"""Against the reference implementation: Hugging Face transformers' GPT-2 (PyTorch) on the same machine.

    pip install torch transformers        # not dependencies of this project; only this script needs them
    python bench/vs_transformers.py [--new_tokens=128] [--prompt_len=64]

Builds a randomly initialised GPT-2 small with transformers, saves it with save_pretrained (safetensors),
loads that directory with gpt.hf, and prints one JSON object: the largest logit difference between the two
implementations, and decode tokens/s of transformers' generate() and of our Generator at batch 1 and 8
(both sampling at temperature 1, no top-k/top-p, end-of-text ignored so both produce every token).
"""

import argparse
import json
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=64)
    a = ap.parse_args()
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    directory = tempfile.mkdtemp()
    hf.save_pretrained(directory)

    import jax

    from gpt.hf import from_hf
    from gpt.model import GPT
    from gpt.logits import Rules
    from gpt.sampling import Generator

    cfg, params = from_hf(directory)
    params = jax.device_put(params)
    idx = np.random.default_rng(0).integers(0, 50257, (2, 256))
    with torch.no_grad():
        ref = hf(torch.tensor(idx)).logits.numpy()
    ours = np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, idx)[0])[..., :50257]
    result = {"bench": "vs_transformers", "transformers": transformers.__version__, "torch": torch.__version__,
              "jax": jax.__version__, "device": jax.devices()[0].device_kind, "torch_threads": torch.get_num_threads(),
              "max_abs_logit_diff": float(np.abs(ours - ref).max()), "logit_scale": float(np.abs(ref).max())}
    gen = Generator(cfg, params)  # no end-of-text: every row makes new_tokens tokens, as with HF below
    for batch in (1, 8):
        prompts = np.random.default_rng(batch).integers(0, 50257, (batch, a.prompt_len))
        run_ours = lambda n: gen.generate(prompts.tolist(), n, Rules(1.0), seed=0)
        run_hf = lambda n: hf.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                                       max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0, top_p=1.0,
                                       pad_token_id=50256)
        for name, run in (("ours", run_ours), ("transformers", run_hf)):
            run(1), run(a.new_tokens)  # warm-up (compilation for ours: both lengths)
            t0 = time.perf_counter()
            run(1)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                run(a.new_tokens)
            total = time.perf_counter() - t0
            result[f"{name}_batch{batch}"] = {"first_token_latency_ms": 1e3 * first,
                                              "decode_tokens_per_s": batch * (a.new_tokens - 1) / (total - first)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
