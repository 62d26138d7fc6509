"""Write `docs/cli.md`, the command-line reference, from `braindino`'s own argparse parser.

    python docs/cli_reference.py          # rewrite docs/cli.md
    python docs/cli_reference.py --check  # exit 1 if docs/cli.md is stale (tests/test_docs.py does this)

Rendered from the parser's actions (names, defaults, choices, help), not from argparse's help text, whose layout
changes with the terminal width and the Python version.
"""

import argparse
import sys
from pathlib import Path

from braindino.train.cli import build_parser

PAGE = Path(__file__).with_name("cli.md")
HEADER = """# Command-line reference

Generated from the parser by `python docs/cli_reference.py`; a test fails when this page and the parser disagree.
Every command is also `python -m braindino.train COMMAND ...` (and runs under `accelerate launch`);
`python -m braindino.train.pretraining ...` is `braindino pretrain ...`.
"""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("+", "*") else "")
    name = ", ".join(f"`{option}`" for option in action.option_strings)
    if action.nargs == 0:
        return name
    value = action.metavar or action.dest.upper()
    return f"{name} {value}" + (" ..." if action.nargs in ("+", "*") else "")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
    return f"`{default}`"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices:
        text = f"{text} (one of: {', '.join(map(str, action.choices))})".strip()
    return _cell(text)


def command_section(name: str, parser: argparse.ArgumentParser, summary: str) -> str:
    rows = [f"| {_argument(action)} | {_default(action)} | {_help(action)} |"
            for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    table = "\n".join(["| argument | default | what |", "| --- | --- | --- |", *rows])
    return f"## `braindino {name}`\n\n{_cell(summary)}\n\n{table}\n"


def render() -> str:
    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in subparsers._choices_actions}
    sections = [command_section(name, sub, summaries.get(name, "")) for name, sub in subparsers.choices.items()]
    return HEADER + "\n" + "\n".join(sections)


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if PAGE.exists() and PAGE.read_text() == render() else 1)
    PAGE.write_text(render())
