"""mkdocs hook: lay out the installed package's names for mkdocstrings' static reader.

The repository keeps the design's layout (`modeling_braindino/`, `pipelines/`, `train/`) and pyproject maps the
folders under one `braindino` namespace; griffe reads folders by name and cannot follow that mapping. This builds a
temporary `braindino/` of symbolic links (the files themselves, nothing copied) and puts it first on `sys.path`.
"""

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("pipelines", "train", "model_cards")  # folders at the root that install as braindino.<name>
_TREES: list[Path] = []


def on_startup(**kwargs):
    _TREES.append(Path(tempfile.mkdtemp(prefix="braindino-api-")))
    tree = _TREES[-1] / "braindino"
    tree.mkdir()
    for entry in (ROOT / "modeling_braindino").iterdir():
        (tree / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        (tree / name).symlink_to(ROOT / name)
    sys.path.insert(0, str(tree.parent))


def on_shutdown(**kwargs):
    for folder in _TREES:
        shutil.rmtree(folder, ignore_errors=True)
