"""Brain extraction (skull stripping) for scans that still have skull, face or a noisy background.

The heads are trained on skull-stripped scans with a zero background (`check_skull_stripped` says when an input is
not). We do not write our own extractor: `deepbet` (MIT) does it, a network trained on T1 scans of many cohorts whose
weights ship inside its wheel, so it runs offline (`pip install "braindino[brain-extraction]"`; docs/inputs.md has
the choice and what was measured). The mask is computed and applied on the scan's own grid and affine.
"""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np

from .volume_io import BrainDinoInputError, BrainVolume, VolumeSource, load_volume

INSTALL_HINT = 'brain extraction needs deepbet: pip install "braindino[brain-extraction]"'


@functools.lru_cache(maxsize=2)
def _deepbet(use_gpu: bool):
    try:
        from deepbet import BrainExtraction  # optional dependency: the brain-extraction extra
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return BrainExtraction(no_gpu=not use_gpu)


def extract_brain(source: VolumeSource, use_gpu: bool = False) -> tuple[BrainVolume, nib.Nifti1Image]:
    """The scan with everything outside the brain set to 0, on its own grid, and the brain mask (uint8 NIfTI with
    the scan's affine). `source` is anything `load_volume` reads; `use_gpu` runs deepbet on CUDA (or MPS)."""
    volume = load_volume(source)
    image = nib.Nifti1Image(volume.data, volume.affine)
    try:
        _, mask_image, _ = _deepbet(use_gpu).run(image)
    except (AssertionError, ValueError) as error:  # deepbet asserts when it finds no head to bound
        raise BrainDinoInputError(volume.name, f"brain extraction found no brain (deepbet: {error})") from None
    mask = np.asanyarray(mask_image.dataobj).astype(bool)
    if not mask.any():
        raise BrainDinoInputError(volume.name, "brain extraction found no brain (deepbet returned an empty mask)")
    return apply_brain_mask(volume, mask), nib.Nifti1Image(mask.astype(np.uint8), volume.affine)


def apply_brain_mask(volume: BrainVolume, mask: np.ndarray) -> BrainVolume:
    """The volume with the voxels outside `mask` (same grid) set to 0: another contrast of the same subject, stripped
    with the mask of its T1."""
    if mask.shape != volume.data.shape:
        raise BrainDinoInputError(volume.name, f"brain mask of shape {mask.shape} is not on this scan's grid "
                                               f"{volume.data.shape}; contrasts must be co-registered")
    return BrainVolume(data=np.where(mask, volume.data, np.float32(0)), affine=volume.affine, name=volume.name,
                       non_finite_voxels=volume.non_finite_voxels)
