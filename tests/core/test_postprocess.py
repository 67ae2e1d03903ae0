"""Label-map clean-up and uncertainty."""

import numpy as np
import pytest

from napari_tumorseg.core.postprocess import (
    entropy_map,
    fill_holes,
    keep_largest_component,
    relabel_small_enhancing,
    remove_small_islands,
    uncertain_slices,
)


def _two_blobs():
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[5:15, 5:15, 5:15] = 2  # 1000 voxels
    labels[8:12, 8:12, 8:12] = 4
    labels[2:4, 22:25, 22:25] = 1  # 18 voxels
    return labels


def test_keep_largest_component():
    labels = _two_blobs()
    out = keep_largest_component(labels)
    assert out[3, 23, 23] == 0 and out[10, 10, 10] == 4 and out[6, 6, 6] == 2
    assert labels[3, 23, 23] == 1  # input untouched


@pytest.mark.parametrize(("min_ml", "kept_small"), [(0.01, True), (0.02, False)])
def test_remove_small_islands_by_volume(min_ml, kept_small):
    out = remove_small_islands(_two_blobs(), min_ml=min_ml, voxel_ml=0.001)
    assert bool(out[3, 23, 23] == 1) is kept_small
    assert out[10, 10, 10] == 4


@pytest.mark.parametrize(("min_ml", "relabelled"), [(0.0, False), (0.064, False), (0.065, True)])
def test_relabel_small_enhancing(min_ml, relabelled):
    labels = _two_blobs()  # 64 enhancing voxels of 1 uL: 0.064 mL
    out = relabel_small_enhancing(labels, min_ml, voxel_ml=0.001)
    assert out is not labels and (labels == 4).sum() == 64  # input untouched
    if relabelled:
        assert not (out == 4).any()
        np.testing.assert_array_equal(out[labels == 4], 1)
        np.testing.assert_array_equal(out[labels != 4], labels[labels != 4])
    else:
        np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("enhancing", [4, 3])  # 3: painted in napari, enhancing tumour too
def test_fill_holes_in_the_core(enhancing):
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[2:7, 2:7, 2:7] = enhancing
    labels[4, 4, 4] = 0
    labels[4, 4, 5] = 0
    out = fill_holes(labels)
    assert out[4, 4, 4] == 1 and out[4, 4, 5] == 1 and out[0, 0, 0] == 0
    assert (out[labels > 0] == labels[labels > 0]).all()


def test_a_pocket_in_the_oedema_stays_out_of_the_core():
    """A sulcus or ventricle horn enclosed by oedema in one slice is not tumour core."""
    labels = np.zeros((5, 9, 9), np.uint8)
    labels[2, 2:7, 2:7] = 2
    labels[2, 5, 5] = 0  # enclosed by oedema only
    labels[2, 2, 2] = 0  # the square's corner, and behind it ...
    labels[2, 3, 3] = 0  # ... a pocket open to the outside only through a diagonal gap
    out = fill_holes(labels)
    assert out[2, 5, 5] == 2 and out[2, 3, 3] == 0 and out[2, 2, 2] == 0
    assert (out[labels > 0] == labels[labels > 0]).all()


def test_entropy_and_uncertain_slices():
    prob = np.zeros((3, 6, 10, 10), np.float32)
    prob[:, 4, :5, :5] = 0.5  # slice 4: 25 unsure voxels
    prob[:, 1, :3, :3] = 0.45  # slice 1: 9 unsure voxels
    prob[:, 2] = 1.0  # sure
    h = entropy_map(prob)
    assert h[4, 0, 0] == pytest.approx(1.0, abs=1e-4) and h[2].max() < 1e-3
    assert list(uncertain_slices(h, min_voxels=5)) == [4, 1]
