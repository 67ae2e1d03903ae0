"""Clean-up of BraTS label maps and where the model is unsure.

All functions take and return (Z, Y, X) arrays and never modify their input.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .io import REGIONS

_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)  # 6-connected voxels


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labelled, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled, sizes


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest connected tumour (all non-zero labels together)."""
    labelled, sizes = _components(labels > 0)
    if sizes.max(initial=0) == 0:
        return labels.copy()
    return np.where(labelled == sizes.argmax(), labels, 0).astype(labels.dtype)


def remove_minor_tumours(labels: np.ndarray, share: float) -> np.ndarray:
    """Remove connected tumour pieces smaller than ``share`` x the largest one's volume.

    ``share`` = 1 keeps the largest tumour alone (`keep_largest_component`); a smaller share
    also keeps a multifocal tumour's other large foci, and removes stray islands whatever the
    tumour's size.
    """
    labelled, sizes = _components(labels > 0)
    keep = sizes >= share * sizes.max(initial=0)
    keep[0] = False
    return np.where(keep[labelled], labels, 0).astype(labels.dtype)


def minor_tumours_note(before: np.ndarray, after: np.ndarray, share: float, voxel_ml: float):
    """What `remove_minor_tumours` (with ``share``) took from ``before`` to make ``after``, as
    a note for the user -- a second focus of a multifocal tumour may be among the pieces --;
    an empty tuple when it took nothing."""
    removed = (before > 0) & (after == 0)
    if not removed.any():
        return ()
    _, sizes = _components(removed)
    pieces = int((sizes > 0).sum())
    rule = (
        "kept the largest tumour"
        if share >= 1
        else f"removed pieces under {share:.0%} of the largest tumour"
    )
    return (
        f"{rule} (the model card's rule): {pieces} other piece{'s' if pieces != 1 else ''}, "
        f"{removed.sum() * voxel_ml:.1f} mL, left out of the map; the WT probability layer "
        f"still shows {'it' if pieces == 1 else 'them'}",
    )


def remove_small_islands(labels: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Remove connected tumour pieces smaller than ``min_ml`` millilitres."""
    labelled, sizes = _components(labels > 0)
    keep = sizes * voxel_ml >= min_ml
    keep[0] = False
    return np.where(keep[labelled], labels, 0).astype(labels.dtype)


def relabel_small_enhancing(labels: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """Relabel all enhancing tumour (4) as core (1) when there is less than ``min_ml`` of it.

    The BraTS post-processing of Isensee et al. (2018): a few enhancing voxels are more often a
    false positive on a non-enhancing (e.g. lower-grade) tumour than a real enhancing rim, and
    an empty ET on a tumour without enhancement scores Dice 1 instead of 0.
    """
    enhancing = labels == 4
    if enhancing.sum() * voxel_ml >= min_ml:
        return labels.copy()
    out = labels.copy()
    out[enhancing] = 1
    return out


def fill_holes(labels: np.ndarray, fill_value: int = 1) -> np.ndarray:
    """Fill background holes enclosed by tumour (slice by slice, axially, and in 3D).

    A pocket enclosed by the tumour core (labels 1 and 4) becomes ``fill_value`` (1, necrotic /
    non-enhancing core, by default), the label a radiologist would give it; one enclosed by
    oedema becomes oedema (2): the BraTS regions nest, and a pocket in the oedema (a sulcus, a
    ventricle horn) must not turn into tumour core. Background counts as connected through
    faces, edges and corners, so a pocket open through a diagonal gap is not a hole.
    """
    out = labels.copy()
    for region, value in ((np.isin(labels, REGIONS["TC"]), fill_value), (labels > 0, 2)):
        out[_holes(region) & (out == 0)] = value
    return out


def _holes(mask: np.ndarray) -> np.ndarray:
    background_3d = np.ones((3, 3, 3), bool)
    filled = ndimage.binary_fill_holes(mask, structure=background_3d)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        filled[z] |= ndimage.binary_fill_holes(mask[z], structure=np.ones((3, 3), bool))
    return filled & ~mask


def entropy_map(probabilities: np.ndarray) -> np.ndarray:
    """Mean binary entropy (bits, 0..1) of the region probabilities (K, Z, Y, X) -> (Z, Y, X).

    0 where the model is sure (p near 0 or 1), 1 where it hesitates (p = 0.5).
    """
    p = np.clip(probabilities.astype(np.float32, copy=False), 1e-6, 1 - 1e-6)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return h.mean(axis=0)


def uncertain_slices(uncertainty: np.ndarray, min_voxels: int = 20) -> np.ndarray:
    """Axial slice indices ordered from the most to the least uncertain.

    A slice's score is the summed uncertainty of its voxels above 0.5 bits; slices with fewer
    than ``min_voxels`` such voxels are left out.
    """
    unsure = uncertainty > 0.5
    counts = unsure.reshape(unsure.shape[0], -1).sum(axis=1)
    scores = np.where(unsure, uncertainty, 0).reshape(unsure.shape[0], -1).sum(axis=1)
    order = np.argsort(-scores, kind="stable")
    return order[counts[order] >= min_voxels]
