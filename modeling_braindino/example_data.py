"""Real anatomy that ships offline: the MNI152 T1 template bundled in `nilearn`.

The labelled SYNTHETIC corpus built on this anatomy comes from `braindino synth` (the training extra); this module
only writes the template itself (needs `nilearn`: the `train` and `space` extras), the one real volume available offline.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib


def write_mni152_t1(out_dir: str | Path, resolution: int = 1) -> Path:
    """Write nilearn's MNI152 T1 template (a real, averaged brain; 1 or 2 mm) as `.nii.gz`; return its path."""
    from nilearn.datasets import load_mni152_template

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"mni152_t1_{resolution}mm.nii.gz"
    if not path.exists():
        template = load_mni152_template(resolution=resolution)
        nib.save(nib.Nifti1Image(template.get_fdata().astype("float32"), template.affine), path)
    return path
