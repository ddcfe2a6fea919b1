"""Pretrain a GPT.  python train.py [preset] [--key=value ...]   (python train.py --help lists every key)"""

import sys

from gpt.cli import run_train

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
