"""Where a model comes from: a local folder or a Hub id, checked before transformers reads it.

transformers reads any string that is not an existing folder as a Hub repo id, so a mistyped local path is reported
as a malformed id ("Repo id must use alphanumeric chars ..."). Every loader of this package checks its argument here
first and names the missing folder instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def check_model_source(source: str) -> None:
    """Raise `FileNotFoundError` naming `source` when it reads as a local path (starts with `/`, `.` or `~`, or has
    more than one `/`; a Hub id reads `user/name`) that does not exist."""
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if looks_local and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{source}: no such folder (a Hub model id reads user/name)")


def model_location(value: str) -> str:
    """A command-line model argument (an `argparse` type): a folder or a Hub id (`user/name`), optionally `dinov3:` /
    `dinov2:` / `random:` prefixed, refused while the arguments are read when it names a local folder that does not
    exist."""
    kind, _, rest = value.partition(":")
    source = rest.partition(":")[0] if kind == "random" else rest if kind in ("dinov3", "dinov2") else value
    try:
        check_model_source(source)
    except FileNotFoundError as error:  # the same message, naming the argument as given (its prefix too)
        raise argparse.ArgumentTypeError(f"{value}: {str(error).removeprefix(f'{source}: ')}") from None
    return value
