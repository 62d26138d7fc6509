"""`python -m braindino.train.pretraining ...` (and `accelerate launch -m braindino.train.pretraining ...`):
the same as `braindino pretrain ...`."""

import argparse
import logging
import sys

from braindino import BrainDinoInputError
from braindino.train.pretraining.command import add_pretrain_arguments, run_pretrain

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m braindino.train.pretraining", description="the same as braindino pretrain")
    add_pretrain_arguments(parser)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(run_pretrain(arguments))
    except (OSError, BrainDinoInputError) as error:  # a missing corpus or recipe file: one line, as `braindino` prints it
        sys.exit(f"braindino pretrain: error: {error}")
