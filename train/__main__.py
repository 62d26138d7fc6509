"""`python -m braindino.train COMMAND ...` (and `accelerate launch -m braindino.train extract-features ...`, which
splits the volumes across the processes): the same as `braindino COMMAND ...`."""

import sys

from braindino.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
