"""Where a command's errors become one line on stderr and an exit code (2 for usage errors, 3 for a model
that does not fit, 1 for a run that stopped, 130 for Ctrl-C), instead of a traceback. Every command uses
it: train.py and sample.py through gpt/cli.py, and `python -m gpt.eval`, `gpt.plot` and `gpt.scaling`.
Library code only raises; nothing below the commands prints an error or picks an exit code."""

from __future__ import annotations

import sys

from gpt.config import ConfigError


def quiet_orbax() -> None:
    import absl.logging  # orbax logs routine notices at WARNING through absl

    absl.logging.set_verbosity(absl.logging.ERROR)


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one line for a log or an error: its type and the first line of its message (cut to
    limit characters), or the type alone when there is no message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines and lines[0] else type(error).__name__


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _loaded(module: str, name: str) -> type | tuple:
    """An error class of a module if it was imported, else () (which isinstance never matches): a module never
    imported cannot have raised, and importing it here would load JAX into every command, `prepare` included."""
    return getattr(sys.modules.get(module), name, ())


def guarded(body) -> int:
    """body()'s exit code, or the one-line error and exit code of what stopped it."""
    try:
        return body()
    except ConfigError as e:
        return fail(str(e), 2)
    except KeyboardInterrupt:  # before training started (while preparing data or compiling)
        return fail("interrupted before training started", 130)
    except Exception as e:
        if isinstance(e, _loaded("gpt.plan", "DoesNotFit")):
            return fail(str(e), 3)
        stopped = (FloatingPointError, _loaded("gpt.checkpoint", "SaveError"), _loaded("gpt.prepare", "PrepareError"))
        if isinstance(e, stopped):  # stopped; what was saved before is intact
            return fail(str(e), 1)
        raise
