"""Probability maps to BraTS label maps, with a model card's post-processing rules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .postprocess import relabel_small_enhancing, remove_minor_tumours, remove_small_islands


def region_thresholds(threshold: float | Sequence[float] = 0.5) -> tuple[float, float, float]:
    """The WT, TC, ET thresholds of ``threshold``: one value for all regions or one per region."""
    values = np.broadcast_to(np.asarray(threshold, dtype=float), (3,))
    return tuple(float(v) for v in values)


def probabilities_to_labels(
    probabilities: np.ndarray, threshold: float | Sequence[float] = 0.5
) -> np.ndarray:
    """BraTS label map of region probabilities (contract 2.2).

    Regions are painted in the order WT, TC, ET, each over the previous one (nnU-Net's
    region-based convention): WT -> 2, TC -> 1, ET -> 4. The label map's regions are therefore
    nested, ET ⊆ TC ⊆ WT: a voxel above the threshold for ET counts as tumour core and whole
    tumour too, whatever their own probabilities.

    Parameters
    ----------
    probabilities : numpy.ndarray
        (3, Z, Y, X) WT, TC, ET probabilities in [0, 1].
    threshold : float or (float, float, float)
        A region holds the voxels whose probability is above it; one value for all regions or
        one per region (WT, TC, ET).

    Returns
    -------
    numpy.ndarray
        uint8 (Z, Y, X) with values 0, 1, 2, 4.
    """
    if probabilities.ndim < 2 or probabilities.shape[0] != 3:
        raise ValueError(f"need (3, ...) WT/TC/ET probabilities, got shape {probabilities.shape}")
    wt, tc, et = region_thresholds(threshold)
    labels = np.where(probabilities[0] > wt, np.uint8(2), np.uint8(0))
    labels[probabilities[1] > tc] = 1
    labels[probabilities[2] > et] = 4
    return labels


def card_labels(
    probabilities: np.ndarray,
    rules: dict | None,
    voxel_ml: float,
    threshold: float | Sequence[float] | None = None,
) -> np.ndarray:
    """BraTS labels from region probabilities with a model card's ``postprocess`` rules.

    Rules (all optional; chosen per model on its validation exams with
    ``scripts/tune_postprocess.py``): ``thresholds`` (one or per region, default 0.5),
    ``et_min_ml`` (less enhancing tumour than this becomes core,
    `postprocess.relabel_small_enhancing`), ``island_ml`` (tumour pieces smaller than this
    are removed, `postprocess.remove_small_islands`) and, last, ``minor_share`` (tumour pieces
    smaller than this share of the largest are removed, `postprocess.remove_minor_tumours`;
    chosen by cross-validation, ``scripts/cross_validate.py postprocess``). ``threshold`` overrides
    the card's.
    """
    rules = rules or {}
    if threshold is None:
        threshold = rules.get("thresholds", 0.5)
    labels = probabilities_to_labels(probabilities, threshold)
    if rules.get("et_min_ml"):
        labels = relabel_small_enhancing(labels, float(rules["et_min_ml"]), voxel_ml)
    if rules.get("island_ml"):
        labels = remove_small_islands(labels, float(rules["island_ml"]), voxel_ml)
    if rules.get("minor_share"):
        labels = remove_minor_tumours(labels, float(rules["minor_share"]))
    return labels
