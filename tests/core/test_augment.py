"""Joint augmentation keeps scan and mask aligned; intensity changes touch the scan only."""

import pytest
import torch

from napari_tumorseg.core.augment import (
    JointAugment,
    random_affine,
    random_elastic,
    random_flip,
    random_intensity,
    random_lesion_contrast,
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


def _brain_with_tumour(spatial_dims: int):
    """Brain at 0 +- noise, oedema (WT, not TC) at +3 around a core at +5, background 0."""
    g = torch.Generator().manual_seed(4)
    size = 24
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * spatial_dims, indexing="ij"))
    radius = ((grid - size / 2) ** 2).sum(0).sqrt()
    wt, tc = (radius < 7).float(), (radius < 3).float()
    image = torch.randn(2, 4, *([size] * spatial_dims), generator=g) * 0.1
    image = image + 3 * (wt - tc) + 5 * tc
    image[:, :, :2] = 0  # background slab
    image[:, 1] = 0  # a missing sequence
    mask = torch.stack([wt, tc, tc]).expand(2, 3, *wt.shape).clone()
    return image, mask


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lesion_contrast_fades_the_oedema_only(spatial_dims):
    image, mask = _brain_with_tumour(spatial_dims)
    out = random_lesion_contrast(image, mask, torch.Generator().manual_seed(0), p_channel=1.0)
    wt, tc = mask[0, 0] > 0.5, mask[0, 1] > 0.5
    inner_oedema = (mask[0, 0] - mask[0, 1]).bool()
    # The oedema's contrast to the brain falls by a factor in [0.25, 1] (not 1, drawn per
    # channel), through the smoothing: compare deep inside it.
    for channel in (0, 2, 3):
        before, after = image[:, channel][:, inner_oedema], out[:, channel][:, inner_oedema]
        ratio = after.mean() / before.mean()
        assert 0.2 < ratio < 0.999
    # The core, the far brain, the background and the missing sequence are untouched.
    assert torch.equal(out[:, :, tc], image[:, :, tc])
    far = ~wt
    far[:2] = True
    near = torch.nn.functional.max_pool2d if spatial_dims == 2 else torch.nn.functional.max_pool3d
    far &= near(wt[None].float(), 3, stride=1, padding=1)[0] == 0
    assert torch.equal(out[:, :, far], image[:, :, far])
    assert torch.count_nonzero(out[:, 1]) == 0
    assert torch.all(out[:, :, :2] == 0)


def test_lesion_contrast_in_the_pipeline_leaves_the_mask_alone():
    image, mask = _brain_with_tumour(3)
    augment = JointAugment(p_flip=0, p_affine=0, p_intensity=0, p_lesion_contrast=1.0, seed=5)
    out_image, out_mask = augment(image, mask)
    assert torch.equal(out_mask, mask)
    assert not torch.equal(out_image, image)
    off = JointAugment(p_flip=0, p_affine=0, p_intensity=0, seed=5)(image, mask)[0]
    assert torch.equal(off, image)  # off by default: fine-tuning and old configs unchanged
