"""Corpus preparation speed and memory: MB/s of text tokenized with 1..N worker processes, and the peak RSS.

    python bench/prepare.py [--mb=64] [--tokenizers=gpt2,byte] [--num_proc=1,2] [--big_gb=0]

The text is the built-in corpus (English plays: what a BPE tokenizer meets in practice), its 38 plays written
again and again as JSON-lines documents until the corpus holds --mb MB. Each configuration prepares it in a fresh
process; the figures are the text's UTF-8 megabytes over the whole preparation's seconds (reading, parsing,
tokenizing, writing), and the peak RSS of the main process (VmHWM) and of the largest worker (ru_maxrss).
--big_gb=G also prepares a G GB zstd-compressed corpus with the byte tokenizer (the fastest, so that size is
reached in minutes) to show that memory does not grow with the corpus. One JSON object per line.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpt.sources import BUILTIN_CORPORA  # noqa: E402

MEASURE = ("import resource, sys; from gpt.cli import run_prepare; rc = run_prepare(sys.argv[1:]); "
           "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')); "
           "print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def option(argv, key, default):
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{key}=")), default)


def write_corpus(path: Path, megabytes: float, compress: bool = False) -> int:
    """The built-in plays as JSON lines, repeated to `megabytes` MB of text; returns the documents written."""
    plays = [json.dumps({"text": text}) + "\n" for _, text in BUILTIN_CORPORA["shakespeare"][0]()]
    play_bytes = sum(len(json.loads(p)["text"].encode()) for p in plays)
    rounds = max(1, round(megabytes * 1e6 / play_bytes))
    if compress:
        import zstandard

        fh = zstandard.open(path, "w", cctx=zstandard.ZstdCompressor(level=1))
    else:
        fh = open(path, "w")
    with fh:
        for _ in range(rounds):
            fh.writelines(plays)
    return rounds * len(plays)


def measure(corpus: Path, data_dir: Path, tokenizer: str, num_proc: int) -> dict:
    shutil.rmtree(data_dir, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", MEASURE, f"--dataset={corpus}", f"--tokenizer={tokenizer}",
                        f"--num_proc={num_proc}", f"--data_dir={data_dir}"], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    directory, rss = r.stdout.strip().splitlines()[-2:]
    main_kb, worker_kb = map(int, rss.split())
    meta = json.loads((Path(directory) / "meta.json").read_text())
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"bench": "prepare", "tokenizer": tokenizer, "num_proc": num_proc, "text_mb": meta["text_bytes"] / 1e6,
            "documents": meta["documents"], "tokens": meta["train_tokens"] + meta["val_tokens"],
            "seconds": meta["seconds"], "mb_per_s": round(meta["text_bytes"] / 1e6 / meta["seconds"], 2),
            "peak_rss_main_mb": round(main_kb / 1e3, 1), "peak_rss_worker_mb": round(worker_kb / 1e3, 1),
            "corpus": corpus.name}


def main(argv: list[str]) -> None:
    megabytes = float(option(argv, "mb", 64))
    tokenizers = [t for t in option(argv, "tokenizers", "gpt2,byte").split(",") if t]
    workers = [int(n) for n in option(argv, "num_proc", "1,2").split(",")]
    big_gb = float(option(argv, "big_gb", 0))
    with tempfile.TemporaryDirectory(dir=REPO / "sweeps" if (REPO / "sweeps").is_dir() else None) as tmp:
        corpus = Path(tmp) / "plays.jsonl"
        write_corpus(corpus, megabytes)
        for tokenizer in tokenizers:
            for num_proc in workers:
                print(json.dumps(measure(corpus, Path(tmp) / "data", tokenizer, num_proc)), flush=True)
        if big_gb:
            corpus.unlink()
            big = Path(tmp) / "big.jsonl.zst"
            write_corpus(big, big_gb * 1e3, compress=True)
            print(json.dumps(measure(big, Path(tmp) / "data", "byte", max(workers))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
