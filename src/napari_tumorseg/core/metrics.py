"""Volumes and overlap metrics of BraTS label maps."""

from __future__ import annotations

import numpy as np

from .io import BRATS_LABELS, REGIONS


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT, TC and ET masks of a BraTS label map (Z, Y, X)."""
    return {region: np.isin(labels, values) for region, values in REGIONS.items()}


def tumour_volumes_ml(labels: np.ndarray, voxel_volume_ml: float) -> dict[str, float]:
    """Volume in mL of each BraTS label (NCR/NET, ED, ET) and region (TC, WT).

    One ``bincount`` pass over the map: cheap enough to run on every edit of a full-size exam.
    """
    counts = (
        np.bincount(labels.ravel(), minlength=5)
        if labels.dtype == np.uint8
        else (np.bincount(np.clip(labels.ravel(), 0, 255).astype(np.uint8), minlength=5))
    )
    per_label = {short: float(counts[value]) for value, (short, _, _) in BRATS_LABELS.items()}
    volumes = {short: n * voxel_volume_ml for short, n in per_label.items()}
    volumes["TC"] = (counts[1] + counts[4]) * voxel_volume_ml
    volumes["WT"] = (counts[1] + counts[2] + counts[4]) * voxel_volume_ml
    return {k: float(v) for k, v in volumes.items()}


def tumour_slice_range(labels: np.ndarray) -> tuple[int, int] | None:
    """First and last axial slice (Z index) holding tumour, or None when there is none."""
    slices = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    return None if slices.size == 0 else (int(slices[0]), int(slices[-1]))
