"""A labelled **synthetic** brain-MRI corpus built on real anatomy that ships offline.

Every subject starts from nilearn's MNI152 tissue maps (grey matter, white matter, CSF = brain − GM − WM;
a real population-average brain) and gets:
- a random smooth deformation (individual anatomy);
- an age in [20, 90) years that drives atrophy: the ventricles widen (a radial expansion around them)
  and cortical grey matter thins (partial conversion to CSF);
- optionally a disease label with a distinct pattern: focal grey-matter loss in both medial temporal lobes;
- optionally a tumour: necrotic core, enhancing rim and oedema with irregular borders, and a label mask in
  the BraTS 2023 convention (1 = necrotic core, 2 = oedema, 3 = enhancing tumour);
- blood vessels that take up gadolinium in every subject: cortical veins and dural sinuses along the brain's
  surface (patchy) and the choroid plexus in the posterior lateral ventricles. Without them a tumour-free subject's
  T1 and T1ce were one distribution and no classifier could tell the two sequences apart; with them T1ce is told
  from T1 the way a radiologist tells it, by its bright vessels;
- four contrasts (T1, T1ce, T2, FLAIR) from per-tissue intensities, a multiplicative bias field and Rician
  noise, skull-stripped like the paper's inputs;
- a varied voxel size (in-plane 1.8–2.4 mm, slices 2–4 mm), axis flips (RAS/LAS/RPS/LPS) and a slightly
  oblique affine.

It is the embedded default data for the quickstart, the tests and the benchmarks. It is synthetic: the
labels are true by construction, and no result on it says anything about real patients.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn import datasets
from scipy import ndimage

from braindino.train.data.cores import available_cores

CONTRASTS = ("t1", "t1ce", "t2", "flair")
BRATS_LABELS = {"necrotic_core": 1, "edema": 2, "enhancing_tumor": 3}
# Relative intensity of each tissue class per contrast:      CSF   GM    WM    necrosis oedema enhancing
TISSUE_INTENSITY = {
    "t1": np.array([0.25, 0.55, 0.80, 0.20, 0.45, 0.55]),
    "t1ce": np.array([0.25, 0.55, 0.80, 0.20, 0.45, 1.10]),
    "t2": np.array([1.00, 0.60, 0.40, 0.90, 0.85, 0.60]),
    "flair": np.array([0.10, 0.60, 0.45, 0.30, 1.00, 0.70]),
}
# Vessels: slow flow, dark before contrast, bright after gadolinium; flow voids on T2 and FLAIR.
VESSEL_INTENSITY = {"t1": 0.35, "t1ce": 1.25, "t2": 0.20, "flair": 0.15}
# MNI coordinates (mm) of the structures the labels act on.
VENTRICLE_CENTRE_MM = np.array([0.0, -10.0, 15.0])
MEDIAL_TEMPORAL_CENTRES_MM = (np.array([-28.0, -22.0, -14.0]), np.array([28.0, -22.0, -14.0]))
AGE_RANGE = (20.0, 90.0)
LABEL_COLUMNS = ("subject", "age", "disease", "has_tumor", "tumor_volume_ml", "voxel_size_mm", "orientation",
                 *CONTRASTS, "seg", "survival_days", "death_observed")


@dataclass
class Anatomy:
    """MNI152 tissue fractions on the template grid (voxel → mm affine)."""

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    affine: np.ndarray


@lru_cache(maxsize=2)
def load_anatomy(resolution: int = 2) -> Anatomy:
    """nilearn's bundled MNI152 GM/WM maps and brain mask (no download)."""
    brain_image = datasets.load_mni152_brain_mask(resolution=resolution)
    brain = brain_image.get_fdata().astype(np.float32)
    gm = np.clip(datasets.load_mni152_gm_template(resolution=resolution).get_fdata(), 0, 1).astype(np.float32) * brain
    wm = np.clip(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), 0, 1).astype(np.float32) * brain
    csf = np.clip(brain - gm - wm, 0, 1)
    return Anatomy(csf=csf, gm=gm, wm=wm, brain=brain, affine=brain_image.affine)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control_points: int, amplitude: float) -> np.ndarray:
    """A smooth random field: Gaussian values on a coarse grid, up-sampled (trilinear) to `shape`."""
    coarse = rng.normal(0.0, amplitude, size=(control_points,) * len(shape))
    return ndimage.zoom(coarse, [size / control_points for size in shape], order=1, mode="nearest")[
        tuple(slice(0, size) for size in shape)
    ].astype(np.float32)


def _gaussian_bump(grid_mm: np.ndarray, centre_mm: np.ndarray, sigma_mm: float) -> np.ndarray:
    return np.exp(-((grid_mm - centre_mm) ** 2).sum(-1) / (2 * sigma_mm**2)).astype(np.float32)


def _sample(volume: np.ndarray, coordinates: np.ndarray, order: int) -> np.ndarray:
    return ndimage.map_coordinates(volume, coordinates, order=order, mode="constant", cval=0.0)


def _grid_mm(affine: np.ndarray, index_grid: np.ndarray) -> np.ndarray:
    """Voxel indices `[3, X, Y, Z]` → their positions in mm `[X, Y, Z, 3]`."""
    return nib.affines.apply_affine(affine, np.moveaxis(index_grid, 0, -1)).astype(np.float32)


def _tissue_fractions(anatomy: Anatomy, rng: np.random.Generator, age: float, disease: bool):
    """Deformed, aged (and diseased) tissue fractions on the template grid: csf, gm, wm, brain."""
    shape = anatomy.brain.shape
    voxel_mm = float(np.abs(anatomy.affine[0, 0]))
    index_grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32) for size in shape], indexing="ij"))  # [3, X, Y, Z]
    grid_mm = _grid_mm(anatomy.affine, index_grid)
    atrophy = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])

    # Individual anatomy: a smooth random displacement of about 3 mm.
    displacement = np.stack([smooth_field(rng, shape, 5, 3.0 / voxel_mm) for _ in range(3)])  # [3, X, Y, Z] voxels
    # Ventricles widen with age: sampling pulled towards their centre magnifies the region around it.
    ventricle_index = nib.affines.apply_affine(np.linalg.inv(anatomy.affine), VENTRICLE_CENTRE_MM)
    pull = 0.35 * atrophy * _gaussian_bump(grid_mm, VENTRICLE_CENTRE_MM, 22.0)
    displacement -= pull[None] * (index_grid - ventricle_index[:, None, None, None])
    coordinates = index_grid + displacement
    csf, gm, wm, brain = (_sample(tissue, coordinates, order=1) for tissue in (anatomy.csf, anatomy.gm, anatomy.wm, anatomy.brain))

    # Cortex thins with age: up to 35 % of grey matter becomes CSF.
    lost = gm * (0.35 * atrophy)
    if disease:  # distinct pattern: focal medial temporal grey-matter loss, both sides
        warped_mm = nib.affines.apply_affine(anatomy.affine, np.moveaxis(coordinates, 0, -1))
        focal = sum(_gaussian_bump(warped_mm, centre, 9.0) for centre in MEDIAL_TEMPORAL_CENTRES_MM)
        lost = lost + (gm - lost) * np.clip(0.8 * focal, 0, 0.8)
    return csf + lost, gm - lost, wm, brain


def _tumour(rng: np.random.Generator, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """BraTS-convention label map of one tumour seeded in white matter, with irregular borders."""
    shape = brain.shape
    candidates = np.argwhere(wm > 0.8)
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32) for size in shape], indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - centre, axis=-1) * (1.0 + smooth_field(rng, shape, 6, 0.25))
    core, rim, edema = (radius := rng.uniform(2.0, 4.5)), radius + rng.uniform(1.0, 2.5), radius + rng.uniform(4.0, 9.0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[distance < edema] = BRATS_LABELS["edema"]
    labels[distance < rim] = BRATS_LABELS["enhancing_tumor"]
    labels[distance < core] = BRATS_LABELS["necrotic_core"]
    labels[brain < 0.5] = 0
    return labels


def _vessels(rng: np.random.Generator, csf: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Fraction of blood vessels: a patchy one-voxel shell at the brain's surface (cortical veins, dural sinuses) and
    half of the CSF deep in the posterior lateral ventricles (choroid plexus)."""
    mask = brain > 0.5
    surface = mask & ~ndimage.binary_erosion(mask)
    veins = surface * np.clip(0.6 + smooth_field(rng, brain.shape, 8, 0.5), 0.0, 1.0)
    depth_mm = ndimage.distance_transform_edt(mask) * float(np.abs(affine[0, 0]))
    y_mm = _grid_mm(affine, np.indices(brain.shape, dtype=np.float32))[..., 1]
    choroid = 0.5 * csf * (depth_mm > 12.0) * (y_mm < -15.0)
    return np.clip(veins + choroid, 0.0, 1.0).astype(np.float32)


def _contrasts(rng, vessel_rng, csf, gm, wm, vessels, brain, labels) -> dict[str, np.ndarray]:
    tumour_onehot = np.stack([labels == BRATS_LABELS[name] for name in ("necrotic_core", "edema", "enhancing_tumor")]).astype(np.float32)
    healthy = 1.0 - tumour_onehot.sum(0)
    vessels = vessels * healthy
    fractions = np.concatenate([np.stack([csf, gm, wm]) * (healthy - vessels), tumour_onehot, vessels[None]])  # [7, X, Y, Z]
    images = {}
    for contrast in CONTRASTS:
        intensity = TISSUE_INTENSITY[contrast] * rng.uniform(0.9, 1.1, size=6)  # scanner and subject variation
        intensity = np.append(intensity, VESSEL_INTENSITY[contrast] * vessel_rng.uniform(0.9, 1.1))
        image = np.tensordot(intensity, fractions, axes=1)
        image *= np.exp(smooth_field(rng, image.shape, 4, 0.12))  # bias field
        sigma = rng.uniform(0.01, 0.035)
        image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)  # Rician
        images[contrast] = (image * (brain > 0.5)).astype(np.float32) * 1000.0
    return images


def _output_grid(rng: np.random.Generator, anatomy: Anatomy) -> tuple[np.ndarray, tuple[int, int, int], str, tuple]:
    """A new voxel grid over the brain: varied voxel size, x/y flips, a few degrees of obliquity."""
    voxel = (round(rng.uniform(1.8, 2.4), 2), round(rng.uniform(1.8, 2.4), 2), round(rng.uniform(2.0, 4.0), 2))
    flips = (rng.random() < 0.5, rng.random() < 0.5)
    angle = np.deg2rad(rng.uniform(-5, 5))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    axes = rotation @ np.diag([(-1 if flips[0] else 1) * voxel[0], (-1 if flips[1] else 1) * voxel[1], voxel[2]])
    brain_mm = nib.affines.apply_affine(anatomy.affine, np.argwhere(anatomy.brain > 0.5))
    low, high = brain_mm.min(0) - 6, brain_mm.max(0) + 6
    centre = (low + high) / 2
    shape = tuple(int(np.ceil((high - low)[axis] / voxel[axis])) + 1 for axis in range(3))
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = centre - axes @ ((np.array(shape) - 1) / 2)
    return affine, shape, "".join(nib.aff2axcodes(affine)), voxel


def synthesize_subject(index: int, seed: int, out_dir: str, tumor_fraction: float, disease_fraction: float,
                       resolution: int = 2) -> dict:
    """Make and write one synthetic subject; return its labels row. Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    anatomy = load_anatomy(resolution)
    subject = f"synthetic-{index:04d}"
    age = float(rng.uniform(*AGE_RANGE))
    disease = bool(rng.random() < disease_fraction)
    has_tumor = bool(rng.random() < tumor_fraction)
    csf, gm, wm, brain = _tissue_fractions(anatomy, rng, age, disease)
    labels = _tumour(rng, wm, brain) if has_tumor else np.zeros(brain.shape, dtype=np.uint8)
    vessel_rng = np.random.default_rng([seed, index, 1])  # its own stream: every other draw as before vessels existed
    vessels = _vessels(vessel_rng, csf, brain, anatomy.affine)
    images = _contrasts(rng, vessel_rng, csf, gm, wm, vessels, brain, labels)

    affine, shape, orientation, voxel = _output_grid(rng, anatomy)
    world = nib.affines.apply_affine(affine, np.moveaxis(np.indices(shape, dtype=np.float32), 0, -1))
    coordinates = np.moveaxis(nib.affines.apply_affine(np.linalg.inv(anatomy.affine), world), -1, 0)  # [3, *shape]
    subject_dir = Path(out_dir) / subject
    subject_dir.mkdir(parents=True, exist_ok=True)
    row = {"subject": subject, "age": round(age, 2), "disease": int(disease), "has_tumor": int(has_tumor),
           "voxel_size_mm": "x".join(str(size) for size in voxel), "orientation": orientation}
    for contrast, image in images.items():
        resampled = np.clip(_sample(image, coordinates, order=1), 0, None).astype(np.float32)
        path = subject_dir / f"{subject}_{contrast}.nii.gz"
        nib.save(nib.Nifti1Image(resampled, affine), path)
        row[contrast] = str(path.relative_to(out_dir))
    seg = _sample(labels.astype(np.float32), coordinates, order=0).astype(np.uint8)
    row["tumor_volume_ml"] = round(float((seg > 0).sum() * np.prod(voxel) / 1000.0), 3)
    if has_tumor:
        path = subject_dir / f"{subject}_seg.nii.gz"
        nib.save(nib.Nifti1Image(seg, affine), path)
        row["seg"] = str(path.relative_to(out_dir))
    else:
        row["seg"] = ""
    row.update(_survival(rng, age, row["tumor_volume_ml"]) if has_tumor else {"survival_days": "", "death_observed": ""})
    return row


def _survival(rng: np.random.Generator, age: float, tumor_volume_ml: float) -> dict:
    """Synthetic overall survival of a tumour subject: an exponential time whose hazard rises with age and
    tumour volume (a proportional-hazards truth), censored by a uniform follow-up of up to 4 years."""
    hazard_per_day = (1 / 450) * np.exp(0.03 * (age - 55) + 0.02 * (tumor_volume_ml - 30))
    event_day, follow_up_day = rng.exponential(1 / hazard_per_day), rng.uniform(180, 1460)
    return {"survival_days": int(round(max(1.0, min(event_day, follow_up_day)))), "death_observed": int(event_day <= follow_up_day)}


def write_synthetic_corpus(out_dir: str | Path, subjects: int, seed: int = 0, tumor_fraction: float = 0.5,
                           disease_fraction: float = 0.5, workers: int | None = None, resolution: int = 2,
                           first_index: int = 0) -> Path:
    """Write `subjects` synthetic subjects (BraTS-style folders) and `labels.csv`; return the CSV path.

    Subjects are numbered from `first_index`, so a held-out set written with the same seed and a later
    `first_index` holds different subjects with different names. `workers` processes (None: `available_cores()`).
    """
    workers = available_cores() if workers is None else workers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = range(first_index, first_index + subjects)
    arguments = [(index, seed, str(out_dir), tumor_fraction, disease_fraction, resolution) for index in indices]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:  # fork can deadlock
            rows = list(pool.map(synthesize_subject, *zip(*arguments)))
    else:
        rows = [synthesize_subject(*argument) for argument in arguments]
    labels_path = out_dir / "labels.csv"
    with open(labels_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / "sequences.csv", "w", newline="") as handle:  # one row per volume: MRI sequence labels
        writer = csv.writer(handle)
        writer.writerow(["subject", "contrast", "image"])
        writer.writerows([row["subject"], contrast, row[contrast]] for row in rows for contrast in CONTRASTS)
    (out_dir / "dataset_description.json").write_text(json.dumps({
        "Name": "BrainDINO synthetic corpus (SYNTHETIC DATA, not real subjects)",
        "synthetic": True,
        "GeneratedBy": [{"Name": "braindino synth", "seed": seed, "subjects": subjects, "first_index": first_index,
                         "tumor_fraction": tumor_fraction, "disease_fraction": disease_fraction}],
        "Anatomy": "nilearn MNI152 tissue templates, randomly deformed",
        "SegmentationLabels": BRATS_LABELS,
    }, indent=2))
    return labels_path


def declares_synthetic(folder: str | Path) -> bool:
    """Whether a folder's `dataset_description.json` says its data is synthetic (`braindino synth` writes it)."""
    description = Path(folder) / "dataset_description.json"
    return description.exists() and bool(json.loads(description.read_text()).get("synthetic"))
