"""The skull check (`braindino.check_skull_stripped`) on the scans that ship in packages and on synthetic ones, and
deepbet's brain extraction of the head: the table in docs/inputs.md.

    python benchmarks/skull_check.py            # add --no-extraction to skip deepbet (about 20 s on 2 CPU cores)

Scans: pydeface's `mean_reg2mean` (an average head with skull and face, `pip install pydeface`), nilearn's MNI152
T1 template (skull-stripped) at 1 and 2 mm, three SYNTHETIC subjects' T1 and FLAIR, and the same SYNTHETIC T1s with
Rician noise of 2 % of the white-matter level outside and inside the brain (a raw magnitude image's background).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np

from braindino import check_skull_stripped, load_volume
from braindino.brain_extraction import extract_brain
from braindino.example_data import write_mni152_t1
from braindino.train.data.synthetic import write_synthetic_corpus


def scans(folder: Path) -> dict:
    pydeface = Path(importlib.util.find_spec("pydeface").submodule_search_locations[0]) / "data" / "mean_reg2mean.nii.gz"
    found = {"pydeface mean head (skull, face)": load_volume(pydeface)}
    for resolution in (1, 2):
        found[f"MNI152 T1 brain, {resolution} mm"] = load_volume(write_mni152_t1(folder / f"mni{resolution}", resolution))
    write_synthetic_corpus(folder / "synthetic", subjects=3, seed=0, workers=1)
    rng = np.random.default_rng(0)
    for path in sorted((folder / "synthetic").glob("*/*_t1.nii.gz")) + sorted((folder / "synthetic").glob("*/*_flair.nii.gz")):
        found[f"SYNTHETIC {path.name}"] = load_volume(path)
    for path in sorted((folder / "synthetic").glob("*/*_t1.nii.gz")):
        volume = load_volume(path)
        sigma = 0.02 * np.percentile(volume.data[volume.data > 0], 90)
        noisy = np.abs(volume.data + rng.normal(0, sigma, volume.data.shape) + 1j * rng.normal(0, sigma, volume.data.shape))
        found[f"SYNTHETIC {path.name} + 2 % Rician noise"] = load_volume(noisy.astype(np.float32), affine=volume.affine)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-extraction", action="store_true", help="skip deepbet on the head")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        found = scans(Path(folder))
        if not args.no_extraction:
            start = time.perf_counter()
            brain, _ = extract_brain(found["pydeface mean head (skull, face)"])
            found[f"pydeface head, deepbet brain ({time.perf_counter() - start:.0f} s with model load)"] = brain
        print("| scan | shape | foreground (ml) | edge with signal | skull-stripped | check (ms) |")
        print("|---|---|---:|---:|---|---:|")
        for name, volume in found.items():
            start = time.perf_counter()
            check = check_skull_stripped(volume.data, volume.zooms)
            milliseconds = 1000 * (time.perf_counter() - start)
            print(f"| {name} | {volume.data.shape} | {check.foreground_ml:,.1f} | {check.border_signal:.3f} | "
                  f"{'yes' if check.skull_stripped else '**no**'} | {milliseconds:.0f} |")


if __name__ == "__main__":
    main()
