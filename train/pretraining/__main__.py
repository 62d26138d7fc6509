"""`python -m braindino.train.pretraining ...` (and `accelerate launch -m braindino.train.pretraining ...`):
the same as `braindino pretrain ...`."""

import sys

from braindino.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
