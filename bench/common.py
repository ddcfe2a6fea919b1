"""What the benchmarks share: their command line, `[preset] [--key=value ...]` plus one flag of their own."""

from gpt.config import load_config
from gpt.tokenizer import get_tokenizer


def config_and_flag(argv: list[str], flag: str, default):
    """(the run's config, --flag=VALUE as the type of default, or default); the vocabulary from the tokenizer."""
    value = next((type(default)(a.split("=", 1)[1]) for a in argv if a.startswith(f"--{flag}=")), default)
    cfg = load_config([a for a in argv if not a.startswith(f"--{flag}=")])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = get_tokenizer(cfg.data.tokenizer).vocab_size
    return cfg, value
