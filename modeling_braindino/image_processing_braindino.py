"""BrainDinoImageProcessor: MRI volume → normalised axial slices for the model, and back.

Forward: canonical RAS orientation → axial slices (non-empty range, optionally resampled to a fixed
count) → robust intensity normalisation (percentile clip and z-score over non-zero voxels, the
paper's recipe) → in-plane resize to square pixels that fit the model size → centre pad → the grey
slice repeated to the model's channels. `SliceGeometry` records each step, so a per-slice mask maps
back onto the input's own grid and affine (`to_input_grid`), and a label volume maps forward
(`to_model_grid`) for training.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .volume_io import (
    DEFAULT_MAX_VOXELS,
    BrainDinoInputError,
    SkullCheck,
    VolumeSource,
    check_skull_stripped,
    load_volume,
)

RAS_ORIENTATION = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass
class SliceGeometry:
    """How one volume became model slices; all that is needed to go back. JSON-serialisable via `to_dict`.

    Model slice `k` is RAS axial slice `slice_indices[k]`, shown with anterior up and the subject's left
    on the left (`np.rot90` of the RAS `[x, y]` plane), resized to `resized_shape` and placed at
    `pad_offset` inside the `(height, width)` canvas.
    """

    source: str
    input_shape: tuple[int, int, int]
    input_affine: list[list[float]]
    slice_indices: list[int]
    resized_shape: tuple[int, int]
    pad_offset: tuple[int, int]
    canvas_shape: tuple[int, int]
    non_finite_voxels: int = 0  # NaN/Inf voxels of the input, read as background
    foreground_ml: float | None = None  # `SkullCheck` measures of the input (of the contrasts' union for several)
    border_signal: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SliceGeometry":
        tuples = ("input_shape", "resized_shape", "pad_offset", "canvas_shape")
        return cls(**{key: tuple(value) if key in tuples else value for key, value in values.items()})

    @property
    def skull_check(self) -> SkullCheck | None:
        """Whether the input looked skull-stripped with a zero background (None for a geometry saved without it)."""
        if self.foreground_ml is None or self.border_signal is None:
            return None
        return SkullCheck(foreground_ml=self.foreground_ml, border_signal=self.border_signal)

    @property
    def to_ras(self) -> np.ndarray:
        """nibabel orientation transform from the input array axes to RAS."""
        return nib.orientations.io_orientation(np.asarray(self.input_affine))

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        axes = self.to_ras[:, 0].astype(int)
        ras_shape = [0, 0, 0]
        for input_axis, ras_axis in enumerate(axes):
            ras_shape[ras_axis] = self.input_shape[input_axis]
        return tuple(ras_shape)

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, cols) of an axial slice before resizing: (A→P extent, L→R extent) in voxels."""
        x_size, y_size, _ = self.ras_shape
        return (y_size, x_size)


def _resize(slices: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize `(S, C, h, w)` slices; labels use nearest-exact so up-sampling inverts exactly."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    if mode == "nearest":
        return F.interpolate(slices, size=size, mode="nearest-exact")
    downsampling = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=downsampling)


class BrainDinoImageProcessor(BaseImageProcessor):
    r"""
    Turns MRI volumes into normalised axial slices for [`BrainDinoModel`] and maps per-slice
    predictions back onto each input's own voxel grid.

    Args:
        size (`int`, defaults to 224): side of the square slice canvas (a multiple of the patch size).
        num_channels (`int`, defaults to 3): the grey slice is repeated to this many channels.
        num_slices (`int`, *optional*): resample the non-empty slice range to this many slices (the
            paper uses 128 for subject-level tasks); `None` keeps every non-empty slice (segmentation).
        clip_percentiles (`tuple`, defaults to (0.5, 99.5)): intensity clip range, as percentiles of
            the non-zero voxels.
        drop_empty_slices (`bool`, defaults to `True`): keep only the range of slices with any non-zero voxel.
        max_voxels (`int`): volumes whose header claims more voxels are refused before reading.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 224,
        num_channels: int = 3,
        num_slices: int | None = None,
        clip_percentiles: tuple[float, float] = (0.5, 99.5),
        drop_empty_slices: bool = True,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size
        self.num_channels = num_channels
        self.num_slices = num_slices
        self.clip_percentiles = tuple(clip_percentiles)
        self.drop_empty_slices = drop_empty_slices
        self.max_voxels = max_voxels

    # ------------------------------------------------------------------ forward

    def intensity_statistics(self, data: np.ndarray) -> tuple[np.float32, np.float32, np.float32, np.float32]:
        """(low, high, mean, std) of the non-zero voxels: the percentile clip range, then the clipped values' moments."""
        values = data[data != 0]
        low, high = np.percentile(values, self.clip_percentiles)
        values = np.clip(values, low, high)
        std = values.std()
        return low, high, values.mean(), (std if std > 0 else np.float32(1.0))

    def normalize_intensity(self, data: np.ndarray, statistics: tuple | None = None) -> np.ndarray:
        """Clip to percentiles of the non-zero voxels, z-score over them, keep the background at 0. `statistics`
        (of the whole volume, `intensity_statistics`) lets a part of the volume be normalised exactly alike."""
        low, high, mean, std = statistics if statistics is not None else self.intensity_statistics(data)
        foreground = data != 0
        normalized = np.zeros_like(data, dtype=np.float32)
        normalized[foreground] = (np.clip(data[foreground], low, high) - mean) / std
        return normalized

    def _slice_indices(self, ras_data: np.ndarray) -> list[int]:
        num_axial = ras_data.shape[2]
        if self.drop_empty_slices:
            nonempty = np.flatnonzero(ras_data.any(axis=(0, 1)))
            first, last = int(nonempty[0]), int(nonempty[-1])
        else:
            first, last = 0, num_axial - 1
        if self.num_slices is None:
            return list(range(first, last + 1))
        return [int(index) for index in np.rint(np.linspace(first, last, self.num_slices))]

    def _plan(self, name: str, ras_data: np.ndarray, ras_zooms: np.ndarray, input_shape, input_affine) -> SliceGeometry:
        """Decide slices, resized shape and padding for one RAS volume."""
        rows, cols = ras_data.shape[1], ras_data.shape[0]
        row_mm, col_mm = rows * ras_zooms[1], cols * ras_zooms[0]
        pixel_mm = max(row_mm / self.size, col_mm / self.size)  # square pixels; the longer side fills the canvas
        resized = (
            min(self.size, max(1, int(round(row_mm / pixel_mm)))),
            min(self.size, max(1, int(round(col_mm / pixel_mm)))),
        )
        offset = ((self.size - resized[0]) // 2, (self.size - resized[1]) // 2)
        skull_check = check_skull_stripped(ras_data, ras_zooms)
        return SliceGeometry(
            source=name,
            input_shape=tuple(int(size) for size in input_shape),
            input_affine=np.asarray(input_affine).tolist(),
            slice_indices=self._slice_indices(ras_data),
            resized_shape=resized,
            pad_offset=offset,
            canvas_shape=(self.size, self.size),
            foreground_ml=skull_check.foreground_ml,
            border_signal=skull_check.border_signal,
        )

    def _ras_to_canvas(self, ras_data: np.ndarray, geometry: SliceGeometry, mode: str) -> torch.Tensor:
        """RAS volume → `(S, h, w)` canvas slices with the geometry's slices, resize and padding."""
        return self._axial_to_canvas(ras_data[:, :, geometry.slice_indices], geometry, mode)

    @staticmethod
    def _axial_to_canvas(axial_stack: np.ndarray, geometry: SliceGeometry, mode: str) -> torch.Tensor:
        """The geometry's RAS axial slices `(x, y, S)` → `(S, H, W)` canvas: rotated, all resized in one call, padded."""
        axial = np.ascontiguousarray(np.rot90(axial_stack, axes=(0, 1)).transpose(2, 0, 1))
        slices = torch.from_numpy(axial).unsqueeze(1)  # [S, 1, rows, cols]
        slices = _resize(slices, geometry.resized_shape, mode)  # [S, 1, h, w]
        top, left = geometry.pad_offset
        height, width = geometry.canvas_shape
        bottom, right = height - top - slices.shape[-2], width - left - slices.shape[-1]
        return F.pad(slices, (left, right, top, bottom))[:, 0]  # [S, H, W]

    def _normalized_canvas(self, ras_data: np.ndarray, geometry: SliceGeometry) -> torch.Tensor:
        """Intensity-normalised canvas slices; statistics over the whole volume, arithmetic on the used slices only."""
        statistics = self.intensity_statistics(ras_data)
        used = self.normalize_intensity(ras_data[:, :, geometry.slice_indices], statistics)
        return self._axial_to_canvas(used, geometry, mode="bilinear")

    def _load_ras(self, source: VolumeSource, affine: np.ndarray | None, name: str | None):
        """Load and validate one volume; return it with its data and voxel sizes in RAS axis order."""
        volume = load_volume(source, affine=affine, name=name, max_voxels=self.max_voxels)
        to_ras = nib.orientations.io_orientation(volume.affine)
        ras_zooms = np.empty(3)
        ras_zooms[to_ras[:, 0].astype(int)] = volume.zooms
        return volume, nib.orientations.apply_orientation(volume.data, to_ras), ras_zooms

    def preprocess_volume(
        self, source: VolumeSource, affine: np.ndarray | None = None, name: str | None = None
    ) -> tuple[torch.Tensor, SliceGeometry]:
        """One volume → `pixel_values` `(S, C, H, W)` and its `SliceGeometry`."""
        slices, geometry = self.preprocess_volume_slices(source, affine=affine, name=name)
        return slices.unsqueeze(1).expand(-1, self.num_channels, -1, -1).contiguous(), geometry  # [S, C, H, W]

    def preprocess_volume_slices(
        self, source: VolumeSource, affine: np.ndarray | None = None, name: str | None = None
    ) -> tuple[torch.Tensor, SliceGeometry]:
        """One volume → its grey slices `(S, H, W)` (one channel: what a data loader should hand over; the model's
        `encode_slices` repeats it to the channels on its device) and its `SliceGeometry`."""
        volume, ras_data, ras_zooms = self._load_ras(source, affine, name)
        geometry = self._plan(volume.name, ras_data, ras_zooms, volume.data.shape, volume.affine)
        geometry.non_finite_voxels = volume.non_finite_voxels
        return self._normalized_canvas(ras_data, geometry), geometry

    def native_slices(self, source: VolumeSource, affine: np.ndarray | None = None) -> tuple[np.ndarray, SliceGeometry]:
        """For display: the intensity-normalised axial slices of the non-empty range at the input's own resolution
        `(S, rows, cols)` (no resize, no padding), oriented like model slices, and the geometry (`num_slices` ignored,
        so slice `k` here is model slice `k` of a segmentation pipeline)."""
        volume, ras_data, ras_zooms = self._load_ras(source, affine, None)
        every_slice = copy.copy(self)
        every_slice.num_slices = None
        geometry = every_slice._plan(volume.name, ras_data, ras_zooms, volume.data.shape, volume.affine)
        return self.to_native_slices(self.normalize_intensity(ras_data), geometry, oriented=True), geometry

    @staticmethod
    def to_native_slices(volume: np.ndarray, geometry: SliceGeometry, oriented: bool = False) -> np.ndarray:
        """A volume on the input's grid (e.g. a mask from `mask_to_nifti`) → its geometry's axial slices at native
        resolution `(S, rows, cols)`, as `native_slices` shows them (`oriented`: `volume` is already in RAS order)."""
        ras = volume if oriented else nib.orientations.apply_orientation(np.asarray(volume), geometry.to_ras)
        return np.ascontiguousarray(np.rot90(ras[:, :, geometry.slice_indices], axes=(0, 1)).transpose(2, 0, 1))

    @staticmethod
    def resolve_contrasts(inputs, contrasts: list[str] | None) -> list:
        """The sources a head reads, in its `contrasts` order: a dict `{"t1": ..., "flair": ...}` must name exactly
        those contrasts (keys are case-insensitive); a single volume serves a single-contrast head."""
        if isinstance(inputs, dict):
            given = {str(key).lower(): value for key, value in inputs.items()}
            name = ", ".join(str(value) if isinstance(value, (str, os.PathLike)) else str(key) for key, value in inputs.items())
            if not contrasts or len(contrasts) == 1:
                if len(given) != 1 or (contrasts and contrasts[0].lower() not in given):
                    wanted = f"one {contrasts[0]} volume" if contrasts else "one volume"
                    raise BrainDinoInputError(name, f"got contrasts {', '.join(given)}; this model reads {wanted}")
                return list(given.values())
            wanted = [contrast.lower() for contrast in contrasts]
            missing = [contrast for contrast in wanted if contrast not in given]
            unexpected = [contrast for contrast in given if contrast not in wanted]
            if missing or unexpected:
                problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                    [f"unexpected {', '.join(unexpected)}"] if unexpected else [])
                raise BrainDinoInputError(name, f"wrong contrasts ({'; '.join(problems)}); this model reads {', '.join(wanted)}")
            return [given[contrast] for contrast in wanted]
        if contrasts and len(contrasts) > 1:
            name = str(inputs) if isinstance(inputs, (str, os.PathLike)) else type(inputs).__name__
            raise BrainDinoInputError(name, f"this model reads {len(contrasts)} contrasts ({', '.join(contrasts)}); "
                                      "pass a dict such as {" + ", ".join(f"'{c}': ..." for c in contrasts) + "}")
        return [inputs]

    def preprocess_contrasts(
        self, sources: dict[str, VolumeSource], affine: np.ndarray | None = None
    ) -> tuple[torch.Tensor, SliceGeometry]:
        """Co-registered contrasts of one subject (`{"t1": ..., "flair": ...}`, one voxel grid) → `(S, M, H, W)`,
        each contrast normalised on its own, all on the same slices (the union of their non-empty ranges),
        in the dict's order; one `SliceGeometry` (of the first contrast) maps predictions back."""
        loaded = [self._load_ras(source, affine, None) for source in sources.values()]
        reference = loaded[0][0]
        for volume, _, _ in loaded[1:]:
            if volume.data.shape != reference.data.shape or not np.allclose(volume.affine, reference.affine, atol=1e-3):
                raise BrainDinoInputError(
                    volume.name, f"not on the voxel grid of {reference.name} (shape {volume.data.shape} vs "
                    f"{reference.data.shape}, or a different affine); contrasts must be co-registered"
                )
        union = np.max([np.abs(ras_data) for _, ras_data, _ in loaded], axis=0)
        geometry = self._plan(reference.name, union, loaded[0][2], reference.data.shape, reference.affine)
        geometry.non_finite_voxels = sum(volume.non_finite_voxels for volume, _, _ in loaded)
        contrasts = [self._normalized_canvas(ras_data, geometry) for _, ras_data, _ in loaded]
        return torch.stack(contrasts, dim=1), geometry  # [S, M, H, W]

    def __call__(
        self,
        volumes: VolumeSource | list[VolumeSource],
        affine: np.ndarray | None = None,
        return_geometry: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Volumes → `BatchFeature` with `pixel_values` `(B, S, C, H, W)` (and `geometry` on request).

        Volumes of a batch must yield the same number of slices: set `num_slices`, or call per volume.
        """
        if not isinstance(volumes, (list, tuple)):
            volumes = [volumes]
        processed = [self.preprocess_volume(volume, affine=affine) for volume in volumes]
        slice_counts = {pixel_values.shape[0] for pixel_values, _ in processed}
        if len(slice_counts) > 1:
            names = ", ".join(geometry.source for _, geometry in processed)
            raise BrainDinoInputError(
                names, f"volumes give different slice counts {sorted(slice_counts)}; set num_slices to batch them"
            )
        data = {"pixel_values": torch.stack([pixel_values for pixel_values, _ in processed])}
        if return_geometry:
            data["geometry"] = [geometry for _, geometry in processed]
        return BatchFeature(data=data)

    def to_model_grid(self, label_volume: np.ndarray, geometry: SliceGeometry) -> torch.Tensor:
        """A label volume on the input's grid → `(S, H, W)` labels aligned with the model slices."""
        label_volume = np.asarray(label_volume)
        if tuple(label_volume.shape[:3]) != tuple(geometry.input_shape):
            raise BrainDinoInputError(
                geometry.source, f"label shape {label_volume.shape} differs from the image shape {geometry.input_shape}"
            )
        ras_labels = nib.orientations.apply_orientation(label_volume.astype(np.float32), geometry.to_ras)
        return self._ras_to_canvas(ras_labels, geometry, mode="nearest").round().to(torch.int64)

    # ------------------------------------------------------------------ inverse

    def to_input_grid(
        self, slice_maps: torch.Tensor | np.ndarray, geometry: SliceGeometry, mode: str = "nearest"
    ) -> np.ndarray:
        """`(S, H, W)` per-slice maps → a volume on the input's own voxel grid (slices not used are 0).

        `mode="nearest"` for label masks (exact inverse of `to_model_grid` wherever the forward resize
        did not down-sample), `"bilinear"` for probabilities or features.
        """
        slice_maps = torch.as_tensor(np.asarray(slice_maps) if not torch.is_tensor(slice_maps) else slice_maps)
        expected = (len(geometry.slice_indices), *geometry.canvas_shape)
        if tuple(slice_maps.shape) != expected:
            raise BrainDinoInputError(geometry.source, f"slice maps of shape {tuple(slice_maps.shape)}, expected {expected}")
        if len(set(geometry.slice_indices)) != len(geometry.slice_indices):
            raise BrainDinoInputError(geometry.source, "slices were resampled (num_slices); process with num_slices=None to map back")
        top, left = geometry.pad_offset
        rows, cols = geometry.resized_shape
        cropped = slice_maps[:, top : top + rows, left : left + cols].unsqueeze(1).float()  # [S, 1, h, w]
        restored = _resize(cropped, geometry.slice_shape, mode)[:, 0].numpy()  # [S, rows, cols]
        ras = np.zeros(geometry.ras_shape, dtype=restored.dtype)
        ras[:, :, geometry.slice_indices] = np.rot90(restored.transpose(1, 2, 0), k=-1, axes=(0, 1))
        from_ras = nib.orientations.ornt_transform(RAS_ORIENTATION, geometry.to_ras)
        return np.ascontiguousarray(nib.orientations.apply_orientation(ras, from_ras))

    def mask_to_nifti(self, slice_masks: torch.Tensor | np.ndarray, geometry: SliceGeometry) -> nib.Nifti1Image:
        """Per-slice label masks → a NIfTI label image on the input's grid and affine."""
        labels = self.to_input_grid(slice_masks, geometry, mode="nearest")
        dtype = np.uint8 if labels.max(initial=0) < 256 and labels.min(initial=0) >= 0 else np.int16
        image = nib.Nifti1Image(np.rint(labels).astype(dtype), np.asarray(geometry.input_affine))
        image.header.set_xyzt_units("mm")
        return image
