"""Joint augmentation keeps scan and mask aligned; intensity changes touch the scan only."""

import pytest
import torch

from napari_tumorseg.core.augment import (
    JointAugment,
    random_affine,
    random_elastic,
    random_flip,
    random_intensity,
    random_rot90,
)

GEOMETRIC = [random_flip, random_rot90, random_affine, random_elastic]


def _scan_encoding_its_mask(spatial_dims: int, seed: int = 0):
    """A batch whose scan channel 0 equals its mask: blocks of labels 0/1 on a grid."""
    g = torch.Generator().manual_seed(seed)
    size = (16,) * spatial_dims
    coarse = (torch.rand(2, 1, *([4] * spatial_dims), generator=g) > 0.5).float()
    mode = "nearest"
    mask = torch.nn.functional.interpolate(coarse, size=size, mode=mode)
    noise = torch.rand(2, 3, *size, generator=g)
    return torch.cat([mask, noise], dim=1), mask


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("transform", GEOMETRIC, ids=lambda f: f.__name__)
def test_geometric_transforms_keep_scan_and_mask_aligned(spatial_dims, transform):
    image, mask = _scan_encoding_its_mask(spatial_dims)
    g = torch.Generator().manual_seed(1)
    out_image, out_mask = transform(image, mask, g)
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    # Where the scan's encoded mask is clearly 0 or 1 (away from interpolated edges), the
    # transformed mask says the same.
    encoded = out_image[:, :1]
    sure = (encoded < 0.05) | (encoded > 0.95)
    assert sure.float().mean() > 0.5
    assert torch.equal((encoded[sure] > 0.5).float(), out_mask[sure])
    if transform is not random_flip:
        return
    assert not torch.equal(out_mask, mask) or not torch.equal(out_image, image)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_intensity_changes_the_scan_not_the_background(spatial_dims):
    image, mask = _scan_encoding_its_mask(spatial_dims)
    image[:, :, :2] = 0  # background slab
    g = torch.Generator().manual_seed(2)
    out = random_intensity(image, g)
    assert not torch.allclose(out, image)
    assert torch.all(out[:, :, :2] == 0)


def test_a_missing_sequence_stays_zero():
    """Inference fills a missing sequence with exact zeros: training must see the same."""
    torch.manual_seed(0)
    image = torch.randn(2, 4, 16, 16, 16)
    image[:, 1] = 0  # t1ce dropped
    out = random_intensity(image, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(out[:, 1]) == 0
    assert not torch.allclose(out[:, 0], image[:, 0])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_joint_augment_pipeline(spatial_dims):
    image, mask = _scan_encoding_its_mask(spatial_dims)
    augment = JointAugment(
        p_flip=0.5, p_rot90=1.0, p_affine=1.0, p_elastic=1.0, p_intensity=0.0, seed=3
    )
    out_image, out_mask = augment(image, mask)
    encoded = out_image[:, :1]
    sure = (encoded < 0.05) | (encoded > 0.95)
    assert torch.equal((encoded[sure] > 0.5).float(), out_mask[sure])
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
