"""The command-line entry points behind train.py and sample.py: parse, validate, run, and turn every
user error into one line on stderr (exit 2 for usage errors) instead of a traceback."""

from __future__ import annotations

import sys

from gpt.config import Config, ConfigError, help_text, parse_args

TRAIN_USAGE = "usage: python train.py [preset] [--key=value ...]"


def _quiet_orbax() -> None:
    import absl.logging  # orbax logs routine notices at WARNING through absl

    absl.logging.set_verbosity(absl.logging.ERROR)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(Config(), TRAIN_USAGE))
        return 0
    try:
        cfg = parse_args(Config(), argv)
        from gpt import sharding, trainer  # imports JAX: only once the arguments are known to be good

        sharding.initialize_distributed(cfg.mesh)
        cfg = trainer.prepare_run(cfg, argv)
        trainer.train(cfg, argv)
    except ConfigError as e:
        return _fail(str(e), 2)
    except FloatingPointError as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return _fail("interrupted twice: stopped without saving; resume from the last checkpoint", 130)
    return 0


SAMPLE_USAGE = "usage: python sample.py --out_dir=DIR [--start=TEXT|FILE:path] [--key=value ...]"


def run_sample(argv: list[str]) -> int:
    from gpt.config import SampleArgs, validate_sample

    if any(a in ("-h", "--help") for a in argv):
        print(help_text(SampleArgs(), SAMPLE_USAGE))
        return 0
    try:
        args = parse_args(SampleArgs(), argv, allow_preset=False)
        s = args.sample
        validate_sample(s)
        prompt = s.start
        if prompt.startswith("FILE:"):
            try:
                prompt = open(prompt[5:], encoding="utf-8").read()
            except OSError as e:
                raise ConfigError(f"start={s.start!r}: cannot read the prompt file ({e.strerror})") from None
            if not prompt:
                raise ConfigError(f"start={s.start!r}: the prompt file is empty")
        return _sample(args, prompt)
    except ConfigError as e:
        return _fail(str(e), 2)


def _sample(args, prompt: str) -> int:
    import json
    import time

    from gpt.sampling import Generator, Rules, load_model
    from gpt.tokenizer import get_tokenizer

    _quiet_orbax()
    s = args.sample
    model_cfg, params, tokenizer, source = load_model(s.init_from, s.out_dir, s.step, args.mesh)
    tok = get_tokenizer(tokenizer)
    print(f"sampling from {source} ({tok.name} tokenizer)", file=sys.stderr)
    prompt_ids = tok.encode(prompt)
    generator = Generator(model_cfg, params, tok.eot_token)
    rules = Rules(s.temperature, s.top_k, s.top_p)
    t0 = time.perf_counter()
    max_new = s.max_new_tokens if s.max_new_tokens > 0 else max(model_cfg.block_size - len(prompt_ids), 1)
    outputs = generator.generate([prompt_ids] * s.num_samples, max_new, rules, s.seed)
    elapsed = time.perf_counter() - t0
    n_new = sum(len(o) for o in outputs)
    for ids in outputs:
        text = tok.decode(ids)
        if s.json:
            print(json.dumps({"prompt": prompt, "prompt_tokens": prompt_ids, "tokens": ids, "text": text,
                              "tokens_per_s": n_new / elapsed}), flush=True)
        else:
            print(prompt + text, "\n" + "-" * 40, flush=True)
    print(f"{n_new} tokens in {elapsed:.2f}s ({n_new / elapsed:,.0f} tokens/s, compilation included)", file=sys.stderr)
    return 0
