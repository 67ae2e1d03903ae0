"""Volumes, Dice and HD95 of BraTS label maps."""

import numpy as np
import pytest
import torch

from napari_tumorseg.core.io import read_volume
from napari_tumorseg.core.metrics import evaluate_labels, region_scores, tumour_volumes_ml

from ..conftest import BRATS

SEG = BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"


def test_volumes_are_voxel_counts_times_voxel_volume():
    labels = read_volume(SEG)
    volumes = tumour_volumes_ml(labels.array, labels.voxel_volume_ml)
    counts = {v: int((labels.array == v).sum()) for v in (1, 2, 4)}
    assert volumes["NCR/NET"] == pytest.approx(counts[1] / 1000)
    assert volumes["ED"] == pytest.approx(counts[2] / 1000)
    assert volumes["ET"] == pytest.approx(counts[4] / 1000)
    assert volumes["WT"] == pytest.approx(sum(counts.values()) / 1000)
    assert volumes["TC"] == pytest.approx((counts[1] + counts[4]) / 1000)


def test_against_itself_is_perfect():
    labels = read_volume(SEG).array
    for scores in evaluate_labels(labels, labels, (1.0, 1.0, 1.0)).values():
        assert scores == {"dice": 1.0, "hd95_mm": 0.0}


@pytest.mark.parametrize("shift", [2, 5])
def test_shifted_copy_matches_monai_hd95(shift):
    from monai.metrics import compute_hausdorff_distance

    labels = read_volume(SEG).array
    moved = np.roll(labels, shift, axis=2)
    spacing = (1.0, 1.0, 1.0)
    ours = region_scores(moved > 0, labels > 0, spacing)
    theirs = compute_hausdorff_distance(
        torch.from_numpy(moved > 0)[None, None].float(),
        torch.from_numpy(labels > 0)[None, None].float(),
        percentile=95,
        directed=False,
        spacing=spacing,
    ).item()
    assert ours["hd95_mm"] == pytest.approx(theirs, abs=1e-3)
    assert 0 < ours["hd95_mm"] <= shift + 1e-6
    inter = ((moved > 0) & (labels > 0)).sum()
    assert ours["dice"] == pytest.approx(2 * inter / ((moved > 0).sum() + (labels > 0).sum()))


def test_anisotropic_spacing_scales_distances():
    a = np.zeros((30, 30, 30), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.zeros_like(a)
    b[18:20, 5:15, 5:15] = True  # a slab 4 slices beyond a's last slice
    iso = region_scores(b, a, (1.0, 1.0, 1.0))["hd95_mm"]
    assert region_scores(b, a, (2.0, 1.0, 1.0))["hd95_mm"] == pytest.approx(2 * iso)
    assert iso > 4


def test_empty_masks():
    empty = np.zeros((5, 5, 5), bool)
    full = empty.copy()
    full[2, 2, 2] = True
    assert region_scores(empty, empty, (1, 1, 1)) == {"dice": 1.0, "hd95_mm": 0.0}
    assert region_scores(full, empty, (1, 1, 1))["dice"] == 0.0
