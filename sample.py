"""Sample from a checkpoint.  python sample.py --out_dir=DIR --start="text"   (--help lists every key)"""

import sys

from gpt.cli import run_sample

if __name__ == "__main__":
    sys.exit(run_sample(sys.argv[1:]))
