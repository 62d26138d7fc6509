"""The built wheel holds every module, config and card template of the repository's package folders, under `braindino`
(an editable install finds sub-packages the wheel would miss, so only a real build checks this)."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLED_NAMES = {"modeling_braindino": "braindino", "pipelines": "braindino/pipelines", "train": "braindino/train",
                   "model_cards": "braindino/model_cards"}


def test_wheel_ships_every_module_and_config(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("braindino-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, installed in INSTALLED_NAMES.items()
        for pattern in ("*.py", "*.json", "*.md")
        for path in (REPO / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    assert expected - shipped == set()
    assert not any(name.startswith(("train/", "pipelines/")) for name in shipped)  # no generic top-level names
