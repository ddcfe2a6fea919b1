"""The command-line entry points (train.py, sample.py, `python -m gpt.cli prepare|export`, gpt-train,
gpt-sample): parse, validate and run, every user error turned into one line on stderr by gpt/exits.py."""

from __future__ import annotations

import sys

from gpt.config import (Config, ConfigError, apply_layers, check_writable_dir, help_text, parse_args, read_args,
                        validate_data)
from gpt.exits import fail, guarded, quiet_orbax
from gpt.files import json_lines

TRAIN_USAGE = "usage: python train.py [preset] [--key=value ...]"


def run_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(Config(), TRAIN_USAGE))
        return 0
    return guarded(lambda: _train(argv))


def preflight(argv: list[str]) -> Config:
    """Everything that can refuse a training run before anything is allocated or compiled: the config and
    paths (trainer.prepare_run), the mesh and batch split, and the plan's lower bound on memory."""
    from gpt import trainer

    return trainer.check_devices(trainer.prepare_run(argv))  # usage errors surface first, before any device


def _train(argv: list[str]) -> int:
    from gpt import trainer

    cfg = trainer.prepare_run(argv)
    if cfg.train.dry_run and (simulate := _devices_to_simulate(cfg)):
        return _dry_run_on_simulated_devices(argv, simulate)
    trainer.check_devices(cfg)
    if cfg.train.dry_run:
        return _dry_run(cfg)
    trainer.train(cfg, [sys.argv[0], *argv])
    return 0


def _devices_to_simulate(cfg: Config) -> int:
    """For a single-process dry run whose mesh names more devices than this machine has: how many."""
    import math

    import jax

    m = cfg.mesh
    if m.num_processes > 1 or m.distributed:
        return 0
    need = math.prod(s for s in (m.mesh_data, m.mesh_fsdp, m.mesh_tensor) if s > 0)
    return need if need > jax.device_count() else 0


def _dry_run_on_simulated_devices(argv: list[str], n: int) -> int:
    """Plan a mesh larger than the machine on n simulated CPU devices: the same command in a fresh process
    (XLA's device count is fixed when JAX starts)."""
    import os
    import subprocess

    print(f"planning on {n} simulated CPU devices (this machine has fewer)", file=sys.stderr)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()}
    return subprocess.run([sys.executable, "-m", "gpt.cli", "train", *argv], env=env).returncode


def _dry_run(cfg: Config) -> int:
    import json
    from pathlib import Path

    from gpt import plan, sharding

    report = plan.compiled_plan(cfg, sharding.make_mesh(cfg.mesh))
    text = json.dumps(report, indent=1)
    (Path(cfg.train.out_dir) / "plan.json").write_text(text + "\n")
    print(text)
    if report["fits"]:
        return 0
    over = (report["bytes_per_device"]["peak"] - report["device_memory_bytes"]) / plan.GiB
    remedies = "; ".join(report["remedies"]) or "no single remedy tried fits: shard over more devices"
    return fail(f"does not fit: the compiled step peaks {over:.2f} GiB above the device's memory; {remedies}", 3)


SAMPLE_USAGE = "usage: python sample.py --out_dir=DIR [--start=TEXT|FILE:path] [--key=value ...]"


def run_sample(argv: list[str]) -> int:
    from gpt.config import SampleArgs

    if any(a in ("-h", "--help") for a in argv):
        print(help_text(SampleArgs(), SAMPLE_USAGE))
        return 0
    return guarded(lambda: _sample(*sample_preflight(argv)))


def sample_preflight(argv: list[str]):
    """Everything that can refuse a sampling run before anything compiles: the keys, the prompt files and
    the checkpoint. Returns (args, prompts, (model config, params, tokenizer name, source))."""
    from gpt.config import SampleArgs, validate_sample
    from gpt.sampling import load_model
    from gpt.sharding import initialize_distributed

    layers = read_args(argv, allow_preset=False)
    args = apply_layers(SampleArgs(), layers)
    validate_sample(args.sample, frozenset(k for _, values in layers for k in values))
    prompts = _read_prompts(args.sample)
    quiet_orbax()
    initialize_distributed(args.mesh)
    s = args.sample
    return args, prompts, load_model(s.init_from, s.out_dir, s.step, args.mesh)


def _read_prompts(s) -> list[str]:
    def read(path: str, key: str) -> str:
        try:
            return open(path, encoding="utf-8").read()
        except OSError as e:
            raise ConfigError(f"{key}={path!r}: cannot read the file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{key}={path!r}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None

    if s.prompts:
        prompts = []
        for number, prompt in json_lines(read(s.prompts, "prompts"), f"prompts={s.prompts!r}"):
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError(f"prompts={s.prompts!r}: line {number} is not a non-empty JSON string")
            prompts.append(prompt)
        if not prompts:
            raise ConfigError(f"prompts={s.prompts!r}: expected one non-empty JSON string per line")
        return prompts
    prompt = read(s.start[5:], "start") if s.start.startswith("FILE:") else s.start
    if not prompt:
        raise ConfigError(f"start={s.start!r}: the prompt is empty")
    try:  # text from the command line can hold bytes that are not UTF-8 (as surrogates)
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"start={s.start!r}: not UTF-8 text (character {e.start})") from None
    return [prompt]


def _stops(s) -> list[str]:
    """The stop string asked for (\\n and \\t written as escapes), as a list: empty when none is."""
    return [s.stop.replace("\\n", "\n").replace("\\t", "\t")] if s.stop else []


def _sample(args, prompts: list[str], loaded) -> int:
    import json
    import time

    from gpt.logits import Rules
    from gpt.sampling import Generator, before_stop, stop_rule
    from gpt.tokenizer import get_tokenizer

    s = args.sample
    model_cfg, params, tokenizer, source, _ = loaded
    tok = get_tokenizer(tokenizer)
    print(f"sampling from {source} ({tok.name} tokenizer)", file=sys.stderr)
    rules = Rules(s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.no_repeat_ngram_size,
                  s.min_new_tokens)
    prompt_ids = [tok.encode(p) for p in prompts]
    max_new = s.max_new_tokens if s.max_new_tokens > 0 else max(model_cfg.block_size - max(map(len, prompt_ids)), 1)
    if s.num_beams > 1:
        return _beam_sample(s, prompts, prompt_ids, max_new, model_cfg, params, tok, rules)
    ids = [p for p in prompt_ids for _ in range(s.num_samples)]
    texts = [p for p in prompts for _ in range(s.num_samples)]
    stops = _stops(s)
    visible = lambda new_ids: before_stop(tok.decode(new_ids), stops)

    stream = len(ids) == 1 and not s.json
    shown = [0]

    def on_chunk(rows):  # print the text as it grows; hold back a character still being spelled out
        text = visible(rows[0])
        stable = len(text.rstrip("\ufffd"))
        print(text[shown[0]:stable], end="", flush=True)
        shown[0] = stable

    if stream:
        print(texts[0], end="", flush=True)
    t0 = time.perf_counter()
    outputs = Generator(model_cfg, params, tok.eot_token).generate(
        ids, max_new, rules, s.seed, stop=stop_rule(stops, tok.decode),
        on_chunk=on_chunk if stream else None, sliding_window=s.sliding_window)
    elapsed = time.perf_counter() - t0
    n_new = sum(len(o) for o in outputs)
    for prompt, prompt_ids, new_ids in zip(texts, ids, outputs):
        text = visible(new_ids)
        if s.json:
            print(json.dumps({"prompt": prompt, "prompt_tokens": prompt_ids, "tokens": new_ids, "text": text,
                              "tokens_per_s": n_new / elapsed}), flush=True)
        elif stream:
            print(text[shown[0]:], "\n" + "-" * 40, flush=True)
        else:
            print(prompt + text, "\n" + "-" * 40, flush=True)
    print(f"{n_new} tokens in {elapsed:.2f}s ({n_new / elapsed:,.0f} tokens/s, compilation included)", file=sys.stderr)
    return 0


def _beam_sample(s, prompts: list[str], ids: list[list[int]], max_new: int, model_cfg, params, tok, rules) -> int:
    """sample.py with num_beams > 1: each prompt's best num_return_sequences hypotheses and their scores."""
    import json
    import time

    from gpt.sampling import Beams, Generator, before_stop, stop_rule

    stops = _stops(s)
    t0 = time.perf_counter()
    beams = Beams(s.num_beams, s.length_penalty, s.early_stopping.lower(), s.num_return_sequences)
    results = Generator(model_cfg, params, tok.eot_token).beam_search(ids, max_new, rules, beams,
                                                                      stop_rule(stops, tok.decode))
    elapsed = time.perf_counter() - t0
    for prompt, prompt_ids, hypotheses in zip(prompts, ids, results):
        for rank, (new_ids, score) in enumerate(hypotheses):
            text = before_stop(tok.decode(new_ids), stops)  # as sampling shows it
            if s.json:
                print(json.dumps({"prompt": prompt, "prompt_tokens": prompt_ids, "beam": rank, "tokens": new_ids,
                                  "text": text, "score": score}), flush=True)
            else:
                print(f"[beam {rank}, score {score:.4f}]\n{prompt + text}\n" + "-" * 40, flush=True)
    print(f"beam search ({s.num_beams} beams) of {len(ids)} prompts in {elapsed:.2f}s (compilation included)",
          file=sys.stderr)
    return 0


PREPARE_USAGE = ("usage: python -m gpt.cli prepare [--dataset=NAME|PATH|GLOB[+...][:W,...]] [--tokenizer=byte|gpt2] "
                 "[--data_dir=DIR] [--text_field=text] [--on_bad_record=error|skip] [--num_proc=N] [--shard_mb=MB]")


def run_prepare(argv: list[str]) -> int:
    from gpt.config import DataConfig

    if any(a in ("-h", "--help") for a in argv):
        print(help_text(DataConfig(), PREPARE_USAGE))
        return 0
    def prepare() -> int:
        from gpt.prepare import prepare_all

        data = parse_args(DataConfig(), argv, allow_preset=False)
        validate_data(data)
        for _, directory in prepare_all(data):
            print(directory)
        return 0

    return guarded(prepare)


EXPORT_USAGE = "usage: python -m gpt.cli export --out_dir=RUN [--step=N] --to=DIR"


def run_export(argv: list[str]) -> int:
    """A checkpoint's parameters as a Hugging Face GPT-2 directory (config.json + model.safetensors)."""
    if any(a in ("-h", "--help") for a in argv):
        print(EXPORT_USAGE)
        return 0
    opts = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    unknown = set(opts) - {"out_dir", "step", "to"}
    if unknown or "out_dir" not in opts or "to" not in opts or len(opts) != len(argv):
        return fail(f"bad arguments {argv}: {EXPORT_USAGE}", 2)
    try:
        from gpt.checkpoint import load_params
        from gpt.config import MeshConfig
        from gpt.hf import save_hf

        quiet_orbax()
        try:
            step = int(opts.get("step", -1))
        except ValueError:
            raise ConfigError(f"step={opts['step']!r} is not a valid int") from None
        check_writable_dir("to", opts["to"])
        cfg, params, _, restored = load_params(opts["out_dir"], step, MeshConfig())
        print(f"wrote step {restored} of {opts['out_dir']} to {save_hf(cfg, params, opts['to'])}")
    except ConfigError as e:
        return fail(str(e), 2)
    return 0


COMMANDS = {"train": run_train, "sample": run_sample, "prepare": run_prepare, "export": run_export}


def main(argv: list[str]) -> int:
    """`python -m gpt.cli COMMAND [--key=value ...]`."""
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m gpt.cli {{{','.join(COMMANDS)}}} [--key=value ...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


def train_main() -> None:
    """The `gpt-train` console command."""
    sys.exit(run_train(sys.argv[1:]))


def sample_main() -> None:
    """The `gpt-sample` console command."""
    sys.exit(run_sample(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
