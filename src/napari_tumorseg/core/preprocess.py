"""Model input preparation shared by inference, training and fine-tuning.

One implementation of each step, so that what a model sees at inference is exactly what it saw
in training: brain mask -> crop to the brain's bounding box -> resample to the model spacing ->
per-channel z-score over brain voxels -> missing sequences filled with zeros (the brain mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import TumorSegError

#: Missing-sequence policy of the bundled models: the channel is all zeros after normalisation,
#: which is the mean brain intensity; training drops sequences the same way.
MISSING_POLICY = "zeros after z-score (the brain mean); trained with random sequence dropout"
NORMALIZATION = "per-channel z-score over brain voxels (mean 0, std 1), background set to 0"


#: A skull-stripped exam is zero around the brain: on the faces of its grid, fewer non-zero
#: voxels than this share (measured: BraTS and BraTS-toolkit exams 0-0.5 % even cropped to the
#: brain; raw clinical scans 83-93 %, whose zero padding fooled a whole-volume share).
SKULL_STRIPPED_BELOW = 0.5

#: What `inference.segment` warns about an exam that is not skull-stripped.
SKULL_ON_WARNING = (
    "the scans are not skull-stripped (no zero background around the brain): the bundled "
    "models were trained on skull-stripped brains and mark tumour outside the brain too "
    "(orbits, sinuses, scalp); skull-strip the exam first (e.g. HD-BET or SynthStrip) for a "
    "map to rely on"
)


def brain_mask(channels: np.ndarray, present=None) -> np.ndarray:
    """Boolean brain (or head) mask of a (C, Z, Y, X) exam, from the channels in ``present``
    (indices; default all).

    Skull-stripped exams (BraTS) have exact zeros around the brain (`SKULL_STRIPPED_BELOW`):
    the mask is "any channel non-zero". Raw exams have noise everywhere: the mask is an Otsu
    threshold of the mean channel, with holes filled and only the largest component kept.
    Channel by channel, so that no copy of the whole exam is made.
    """
    return _brain_mask(channels, present)[0]


def is_skull_stripped(channels, present=None) -> bool:
    """Whether an exam -- a (C, Z, Y, X) array, or a list of scans on one grid -- is zero
    around the brain: fewer non-zero voxels on the six faces than `SKULL_STRIPPED_BELOW`.
    Reads the faces only: cheap enough to run whenever the scans picked change."""
    present = range(len(channels)) if present is None else list(present)
    faces = [np.s_[0], np.s_[-1], np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0], np.s_[:, :, -1]]
    nonzero = total = 0
    for face in faces:
        hit = np.zeros(channels[0][face].shape, bool)
        for c in present:
            hit |= channels[c][face] != 0
        nonzero += int(hit.sum())
        total += hit.size
    return nonzero / total < SKULL_STRIPPED_BELOW


def _brain_mask(channels: np.ndarray, present=None) -> tuple[np.ndarray, bool]:
    """`brain_mask` and whether the exam is skull-stripped."""
    present = range(channels.shape[0]) if present is None else list(present)
    if is_skull_stripped(channels, present):
        nonzero = np.zeros(channels.shape[1:], bool)
        for c in present:
            nonzero |= channels[c] != 0
        return nonzero, True
    mean = np.zeros(channels.shape[1:], np.float32)
    for c in present:  # each share first: a sum could leave float32's range
        mean += channels[c] / np.float32(len(present))
    threshold = otsu_threshold(mean)
    mask = ndimage.binary_opening(mean > threshold, iterations=1)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == sizes.argmax()
    return ndimage.binary_fill_holes(mask), False


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an array's values."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(hist)
    weight2 = weight1[-1] - weight1
    mean1 = np.cumsum(hist * centres) / np.maximum(weight1, 1)
    total = (hist * centres).sum()
    mean2 = (total - np.cumsum(hist * centres)) / np.maximum(weight2, 1)
    between = weight1 * weight2 * (mean1 - mean2) ** 2
    return float(centres[np.argmax(between)])


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, grown by ``margin`` voxels (clipped)."""
    if not mask.any():
        raise TumorSegError("the exam holds no brain voxels (all sequences are empty)")
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def zscore(channels: np.ndarray, mask: np.ndarray, present=None) -> np.ndarray:
    """Per-channel z-score over ``mask`` voxels; float32 (C, Z, Y, X), 0 outside the mask.

    Channels not in ``present`` (indices) are set to zeros: the missing-sequence policy.
    """
    out = np.zeros(channels.shape, dtype=np.float32)
    present = range(channels.shape[0]) if present is None else present
    for c in present:
        # float64: the sums of a scan whose values reach float32's range (a corrupt scaling
        # slope) would overflow, and the whole channel turn NaN.
        values = channels[c][mask].astype(np.float64)
        if values.size == 0:
            continue
        mean, std = float(values.mean()), float(values.std())
        out[c][mask] = (values - mean) / max(std, 1e-6)
    return out


def resample_array(
    array: np.ndarray, shape: tuple[int, ...], mode: str = "trilinear"
) -> np.ndarray:
    """Resample a (C, *S) float array to spatial ``shape`` (align_corners=False, like a grid of
    voxel centres spanning the same extent)."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if mode in ("trilinear", "bilinear"):
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        out = F.interpolate(tensor, size=tuple(shape), mode=mode, align_corners=False)
    else:
        out = F.interpolate(tensor, size=tuple(shape), mode="nearest-exact")
    return out[0].numpy()


def target_shape(shape, spacing, target_spacing) -> tuple[int, ...]:
    """Voxel shape covering the same extent as ``shape`` x ``spacing`` at ``target_spacing``."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


@dataclass
class Prepared:
    """A model-ready exam and how to map results back.

    Attributes
    ----------
    image : numpy.ndarray
        float32 (C, z, y, x): cropped, resampled to the model spacing, normalised.
    mask : numpy.ndarray
        bool (z, y, x) brain mask on the same grid as ``image``.
    box : tuple of slice
        The crop in the input grid (Z, Y, X).
    input_shape : tuple of int
        The full input grid's (Z, Y, X).
    skull_stripped : bool
        Whether the exam is zero around the brain, as the bundled models were trained on.
    input_mask : numpy.ndarray or None
        bool, the brain mask in the crop ``box`` at the input resolution.
    """

    image: np.ndarray
    mask: np.ndarray
    box: tuple[slice, ...]
    input_shape: tuple[int, ...]
    skull_stripped: bool = True
    input_mask: np.ndarray | None = None

    def to_input_grid(self, maps: np.ndarray, fill: float = 0.0, mask: bool = False) -> np.ndarray:
        """Put (K, z, y, x) maps on the model grid back onto the full input grid (K, Z, Y, X).

        ``mask``: 0 outside the brain on the input grid too (interpolation from the coarser
        model grid spreads values over the brain's edge)."""
        crop_shape = tuple(s.stop - s.start for s in self.box)
        maps = resample_array(maps, crop_shape)
        if mask and self.input_mask is not None:
            maps = maps * self.input_mask
        shape = (maps.shape[0], *self.input_shape)
        # np.zeros takes its pages from the OS already zeroed: no 100 MB fill for a 1 mm exam.
        out = np.zeros(shape, np.float32) if fill == 0 else np.full(shape, fill, np.float32)
        # torch's strided copy, on torch's threads: numpy's assignment into the box of a
        # (3, 155, 240, 240) map took 0.16-0.23 s on 2 cores, this 0.02 s.
        box = tuple(slice(int(s.start), int(s.stop)) for s in self.box)
        torch.from_numpy(out)[(slice(None), *box)].copy_(torch.as_tensor(maps))
        return out


def prepare(
    channels: np.ndarray, spacing, model_spacing=None, present=None, margin: int = 2
) -> Prepared:
    """Brain mask, crop, resample to ``model_spacing`` (mm, Z Y X) and z-score an exam.

    Parameters
    ----------
    channels : numpy.ndarray
        (C, Z, Y, X) exam in the channel order t1, t1ce, t2, flair (missing channels all zero).
    spacing : sequence of float
        Voxel size in mm (Z, Y, X).
    model_spacing : sequence of float, optional
        Voxel size the model expects; None keeps the input spacing.
    present : sequence of int, optional
        Indices of the channels that hold a sequence; the others are zeros.
    """
    mask, stripped = _brain_mask(channels, present)
    box = bounding_box(mask, margin)
    cropped = channels[(slice(None), *box)]
    mask = input_mask = mask[box]
    image = zscore(cropped, mask, present)
    if model_spacing is not None and not np.allclose(spacing, model_spacing, atol=1e-3):
        shape = target_shape(mask.shape, spacing, model_spacing)
        image = resample_array(image, shape)
        mask = resample_array(mask[None].astype(np.float32), shape, mode="nearest")[0] > 0.5
    return Prepared(
        image=image,
        mask=mask,
        box=box,
        input_shape=tuple(channels.shape[1:]),
        skull_stripped=stripped,
        input_mask=input_mask,
    )
