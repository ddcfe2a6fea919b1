"""The command-line entry points behind train.py and sample.py: parse, validate, run, and turn every
user error into one line on stderr (exit 2 for usage errors) instead of a traceback."""

from __future__ import annotations

import sys

from gpt.config import Config, ConfigError, help_text, parse_args

TRAIN_USAGE = "usage: python train.py [preset] [--key=value ...]"


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(Config(), TRAIN_USAGE))
        return 0
    try:
        cfg = parse_args(Config(), argv)
        from gpt import trainer  # imports JAX: only once the arguments are known to be good

        cfg = trainer.prepare_run(cfg, argv)
        trainer.train(cfg, argv)
    except ConfigError as e:
        return _fail(str(e), 2)
    except FloatingPointError as e:
        return _fail(str(e), 1)
    return 0
