"""The server under load: N concurrent streaming clients for a fixed time against `python -m gpt.serve`.

    python bench/serve.py [--model=tiny|gpt2_124m] [--clients=1,8,32] [--seconds=30] [--max_tokens=64]
                          [--max_batch=8] [--warmup=10]

tiny: the default preset's model (4 x 128, bytes) after one training step (a checkpoint, served with --out_dir);
gpt2_124m: GPT-2 small's shape with random weights (speed does not depend on them) as a Hugging Face directory
(--init_from, the gpt2 tokenizer). Each client sends one streamed completion after another (a prompt of 32 token
ids, max_tokens new tokens, temperature 0.8, its own seed each time) and times the first text it receives and
the whole answer. Each client count runs --warmup seconds untimed first (the decode shapes it wants compile in
the server's background meanwhile), then --seconds timed. Prints one JSON object per client count: requests/s,
generated tokens/s, p50/p99 first-token and total latency, any request that failed (none should), and the
server's start-up compile seconds.
"""

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def model_source(name: str, directory: str) -> str:
    """The serve flag that names the benchmarked model, written into directory."""
    if name == "tiny":
        subprocess.run([sys.executable, str(REPO / "train.py"), "--max_iters=1", "--eval_iters=1", "--eval_interval=1",
                        f"--out_dir={directory}"], cwd=REPO, check=True, capture_output=True)
        return f"--out_dir={directory}"
    import flax.linen as nn
    import jax

    from bench.decode import MODELS
    from gpt.hf import save_hf
    from gpt.model import init_params

    cfg = MODELS["gpt2_124m"]
    save_hf(cfg, jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(jax.random.key(0)), directory)
    return f"--init_from={directory}"


def client(url: str, body: dict, until: float, rng, results: list, errors: list) -> None:
    import httpx

    with httpx.Client(timeout=300) as http:
        while time.perf_counter() < until:
            t0, first, tokens = time.perf_counter(), None, 0
            try:
                with http.stream("POST", url, json={**body, "seed": int(rng.integers(2**31))}) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if first is None and any(c["text"] for c in event["choices"]):
                            first = time.perf_counter() - t0
                        tokens = event.get("usage", {}).get("completion_tokens", tokens)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.1)  # no tight loop of failures
                continue
            results.append((first, time.perf_counter() - t0, tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "gpt2_124m"], default="tiny")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=10, help="seconds of the same load, untimed, before each")
    a = ap.parse_args()
    directory = tempfile.mkdtemp()
    source = model_source(a.model, directory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(directory) / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "gpt.serve", source, f"--port={port}",
                               f"--max_batch={a.max_batch}", "--max_queue=1024"], cwd=REPO, stderr=log, stdout=log)
    try:
        import httpx

        deadline = time.time() + 600
        while True:  # up once /health answers
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"the server exited or never answered: {(Path(directory) / 'server.log').read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        compiled = re.search(r"compiled the prefill .* in ([\d.]+)s", (Path(directory) / "server.log").read_text())
        prompt = np.random.default_rng(0).integers(32, 127, 32).tolist()  # ids of printable characters in both vocabularies
        body = {"prompt": prompt, "max_tokens": a.max_tokens, "stream_options": {"include_usage": True},
                "temperature": 0.8, "stream": True}
        def load(n: int, seconds: float) -> tuple[list, list, float]:
            """n clients for `seconds`: (results, errors, wall seconds until the last answer)."""
            results, errors = [], []
            until = time.perf_counter() + seconds
            threads = [threading.Thread(target=client, args=(f"http://127.0.0.1:{port}/v1/completions", body, until,
                                                             np.random.default_rng(i), results, errors))
                       for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return results, errors, time.perf_counter() - t0

        for n in map(int, a.clients.split(",")):
            load(n, a.warmup)  # the decode shapes this load wants compile (in the background) before it is timed
            results, errors, wall = load(n, a.seconds)
            first = np.array([r[0] for r in results if r[0] is not None] or [np.nan])
            total = np.array([r[1] for r in results] or [np.nan])
            print(json.dumps({"bench": "serve", "model": a.model, "clients": n, "max_batch": a.max_batch,
                              "seconds": round(wall, 1), "compile_s": float(compiled[1]) if compiled else None, "requests": len(results), "failed": len(errors),
                              "requests_per_s": len(results) / wall,
                              "tokens_per_s": sum(r[2] for r in results) / wall,
                              "first_token_ms_p50": 1e3 * float(np.percentile(first, 50)),
                              "first_token_ms_p99": 1e3 * float(np.percentile(first, 99)),
                              "total_ms_p50": 1e3 * float(np.percentile(total, 50)),
                              "total_ms_p99": 1e3 * float(np.percentile(total, 99)),
                              "errors": errors[:3]}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
