"""Decoding speed: prefill tokens/s, first-token latency, decode tokens/s per batch size. Prints JSON.

    python bench/decode.py [--model=tiny|gpt2_124m] [--prompt_len=64] [--new_tokens=128] [--repeats=3] [--batches=1,8]
                           [--beams=4] [--transformers]

--beams=K also times beam search of one prompt (K hypotheses decoded together, min_new_tokens = new_tokens so
every run makes the same number of steps), as tokens of the returned sequence per second; --transformers
times transformers' generate(num_beams=K, do_sample=False) on the same weights beside it (needs torch and
transformers: pip install -e ".[parity]").

Weights are random (speed does not depend on their values); the shapes are the named model's.

The bandwidth bound: a decode step reads every parameter and the whole KV cache once, so at batch B it cannot
beat B x (memory bandwidth) / (parameter bytes + cache bytes) tokens/s; the bandwidth is measured here, as the
best of 5 reductions over a 1 GiB float32 array (every core reading).
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import numpy as np

from gpt.config import ModelConfig
from gpt.model import init_params
from gpt.logits import Rules
from gpt.sampling import Generator, bucket

MODELS = {
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=256),
    "gpt2_124m": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def memory_bandwidth() -> float:
    """Bytes/s the devices read: the best of 5 jitted sums over a 1 GiB float32 array."""
    x = jax.numpy.ones((1 << 28,), jax.numpy.float32)
    total = jax.jit(lambda a: a.sum())
    return x.nbytes / best_time(lambda: total(x), 5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2_124m")
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--beams", type=int, default=0, help="also time beam search with this many beams")
    ap.add_argument("--transformers", action="store_true", help="and transformers' beam search beside it")
    a = ap.parse_args()
    cfg = ModelConfig(**{**MODELS[a.model].__dict__, "dtype": a.dtype})
    params = jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(jax.random.key(0))
    gen = Generator(cfg, params)
    rules = Rules(temperature=0.8, top_k=0, top_p=1.0)
    result = {"bench": "decode", "model": a.model, "dtype": a.dtype, "device": jax.devices()[0].device_kind,
              "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    bandwidth = memory_bandwidth()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    result.update(memory_bandwidth_bytes_per_s=bandwidth, param_bytes=param_bytes)
    rng = np.random.default_rng(0)
    for batch in map(int, a.batches.split(",")):
        prompts = rng.integers(0, cfg.vocab_size, (batch, a.prompt_len)).tolist()
        length = bucket(a.prompt_len)
        tokens = np.zeros((batch, length), np.int32)
        tokens[:, length - a.prompt_len:] = prompts
        pad = np.full((batch,), length - a.prompt_len, np.int32)
        prefill = lambda: gen._prefill(params, tokens, pad, cache_len=length + a.new_tokens)
        generate = lambda: gen.generate(prompts, a.new_tokens, rules, seed=0)
        generate()  # compile both
        t_prefill = best_time(prefill, a.repeats)
        t_first = best_time(lambda: gen.generate(prompts, 1, rules, seed=0), a.repeats)
        t_total = best_time(generate, a.repeats)
        decode = batch * (a.new_tokens - 1) / (t_total - t_first)
        cache_bytes = 2 * cfg.n_layer * batch * (length + a.new_tokens) * cfg.n_embd * np.dtype(a.dtype).itemsize
        bound = batch * bandwidth / (param_bytes + cache_bytes)
        result[f"batch{batch}"] = {
            "prefill_tokens_per_s": batch * a.prompt_len / t_prefill,
            "first_token_latency_ms": 1e3 * t_first,
            "decode_tokens_per_s": decode,
            "bandwidth_bound_tokens_per_s": bound, "fraction_of_bound": decode / bound,
        }
    if a.beams:
        result[f"beam{a.beams}"] = beam_search_speed(cfg, params, a)
    print(json.dumps(result))


def beam_search_speed(cfg: ModelConfig, params, a) -> dict:
    """Seconds and returned-sequence tokens/s of beam search over one prompt (ours; transformers' if asked)."""
    from gpt.sampling import Beams

    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, a.prompt_len).tolist()
    rules = Rules(temperature=0.0, min_new_tokens=a.new_tokens)  # no end-of-text: every run takes new_tokens steps
    gen = Generator(cfg, params, eot_token=cfg.vocab_size - 1)
    run = lambda: gen.beam_search([prompt], a.new_tokens, rules, Beams(a.beams))
    run()  # compile
    seconds = best_time(run, a.repeats)
    out = {"ours_seconds": seconds, "ours_tokens_per_s": a.new_tokens / seconds}
    if a.transformers:
        import tempfile

        import torch
        import transformers

        from gpt.hf import save_hf

        directory = tempfile.mkdtemp()
        save_hf(cfg, params, directory)  # the same weights, as a Hugging Face directory
        hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        ids = torch.tensor([prompt])
        run_hf = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                     min_new_tokens=a.new_tokens, num_beams=a.beams, do_sample=False,
                                     pad_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
        with torch.no_grad():
            run_hf()
            hf_seconds = best_time(run_hf, a.repeats)
        out.update(transformers_seconds=hf_seconds, transformers_tokens_per_s=a.new_tokens / hf_seconds,
                   speedup=hf_seconds / seconds, transformers=transformers.__version__, torch=torch.__version__,
                   torch_threads=torch.get_num_threads())
    return out


if __name__ == "__main__":
    main()
