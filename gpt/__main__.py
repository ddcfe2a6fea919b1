"""`python -m gpt {train,sample,prepare,export} [--key=value ...]`: the CLI of gpt/cli.py."""

import sys

from gpt.cli import main

sys.exit(main(sys.argv[1:]))
