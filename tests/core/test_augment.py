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
    """Brain at a level of its own per sequence (+1, -, +2, -0.5) with little noise, oedema 3
    above it around a core at +6, a background slab, and t1ce missing. Returns the batch, its
    (WT, TC, ET) mask and the brain level per channel."""
    g = torch.Generator().manual_seed(4)
    size = 24
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * spatial_dims, indexing="ij"))
    radius = ((grid - size / 2) ** 2).sum(0).sqrt()
    wt, tc = (radius < 8).float(), (radius < 3).float()
    level = torch.tensor([1.0, 0.0, 2.0, -0.5]).view(1, 4, *([1] * spatial_dims))
    image = level + torch.randn(2, 4, *([size] * spatial_dims), generator=g) * 0.01
    image = image + 3 * (wt - tc) + 6 * tc
    image[:, :, :2] = 0  # background slab
    image[:, 1] = 0  # a missing sequence
    mask = torch.stack([wt, tc, tc]).expand(2, 3, *wt.shape).clone()
    return image, mask, level


def _brain_mean(image, mask, sample, channel):
    brain = (image[sample] != 0).any(dim=0) & (mask[sample, 0] < 0.5)
    return image[sample, channel][brain].mean()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lesion_contrast_fades_the_oedema_only(spatial_dims):
    image, mask, _ = _brain_with_tumour(spatial_dims)
    out = random_lesion_contrast(image, mask, torch.Generator().manual_seed(0), p_channel=1.0)
    wt, tc = mask[0, 0] > 0.5, mask[0, 1] > 0.5
    oedema = wt & ~tc
    factors = []
    for sample in range(2):
        for channel in (0, 2, 3):
            # Every oedema voxel (full weight, up to its edges) keeps the same share of its
            # contrast to the mean of the brain around the tumour, drawn in [0.25, 1].
            reference = _brain_mean(image, mask, sample, channel)
            before = image[sample, channel][oedema] - reference
            after = out[sample, channel][oedema] - reference
            ratio = after / before
            assert torch.allclose(ratio, ratio.mean(), atol=1e-4)
            assert 0.25 - 1e-4 <= ratio.mean() <= 1
            factors.append(float(ratio.mean()))
    assert len({round(f, 3) for f in factors}) == len(factors)  # drawn per sample and channel
    assert min(factors) < 0.99
    # The core, the brain beyond one voxel from the oedema, the background and the missing
    # sequence are untouched; the voxel rim just outside the oedema is faded less.
    assert torch.equal(out[:, :, tc], image[:, :, tc])
    near = torch.nn.functional.max_pool2d if spatial_dims == 2 else torch.nn.functional.max_pool3d
    rim = near(wt[None].float(), 3, stride=1, padding=1)[0].bool() & ~wt
    far = ~wt & ~rim
    assert torch.equal(out[:, :, far], image[:, :, far])
    assert torch.count_nonzero(out[:, 1]) == 0
    assert torch.all(out[:, :, :2] == 0)
    for channel in (0, 2, 3):
        reference = _brain_mean(image, mask, 0, channel)
        share_rim = (out[0, channel][rim] - reference) / (image[0, channel][rim] - reference)
        assert factors[(0, 2, 3).index(channel)] - 1e-4 < float(share_rim.mean()) < 1


def test_lesion_contrast_off_cases():
    image, mask, _ = _brain_with_tumour(3)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_lesion_contrast(image, mask, g, p_channel=0.0), image)
    no_tumour = torch.zeros_like(mask)
    assert torch.equal(random_lesion_contrast(image, no_tumour, g, p_channel=1.0), image)
    # A patch that is all tumour has no brain to fade towards: left alone.
    all_oedema = mask.clone()
    all_oedema[:, 0] = 1
    assert torch.equal(random_lesion_contrast(image, all_oedema, g, p_channel=1.0), image)


def test_lesion_contrast_in_low_precision_and_with_a_weight_channel():
    image, mask, _ = _brain_with_tumour(3)
    weighted = torch.cat([mask.to(torch.uint8), torch.rand(2, 1, *mask.shape[2:])], dim=1)
    ref = random_lesion_contrast(image, mask, torch.Generator().manual_seed(1), p_channel=1.0)
    out = random_lesion_contrast(image, weighted, torch.Generator().manual_seed(1), p_channel=1)
    assert torch.equal(out, ref)  # uint8 mask, extra weight channel ignored
    half = random_lesion_contrast(
        image.bfloat16(), mask, torch.Generator().manual_seed(1), p_channel=1.0
    )
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    assert torch.allclose(half.float(), ref, atol=0.1)


def test_lesion_contrast_in_the_pipeline_leaves_the_mask_alone():
    image, mask, _ = _brain_with_tumour(3)
    weighted = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    augment = JointAugment(p_flip=0, p_affine=0, p_intensity=0, p_lesion_contrast=1.0, seed=5)
    out_image, out_mask = augment(image, weighted)
    assert torch.equal(out_mask, weighted)
    assert not torch.equal(out_image, image)
    off = JointAugment(p_flip=0, p_affine=0, p_intensity=0, seed=5)(image, weighted)[0]
    assert torch.equal(off, image)  # off by default: fine-tuning and old configs unchanged


def test_lesion_contrast_factors_span_low_to_one():
    """Over many samples the kept share of the contrast spreads over [0.25, 1] (mean 0.625)."""
    image, mask, _ = _brain_with_tumour(2)
    image, mask = image[:1].expand(200, -1, -1, -1), mask[:1].expand(200, -1, -1, -1)
    out = random_lesion_contrast(image, mask, torch.Generator().manual_seed(2), p_channel=1.0)
    oedema = (mask[0, 0] > 0.5) & (mask[0, 1] < 0.5)
    reference = _brain_mean(image, mask, 0, 0)
    shares = (out[:, 0][:, oedema] - reference).mean(1) / (image[0, 0][oedema] - reference).mean()
    assert shares.min() >= 0.25 - 1e-4 and shares.max() <= 1
    assert abs(float(shares.mean()) - 0.625) < 0.05
    assert float(shares.min()) < 0.35 and float(shares.max()) > 0.9


def test_every_transform_keeps_to_the_images_device():
    """The generator draws on the CPU; a GPU batch must get its random numbers moved to it.
    The 'meta' device stands in for CUDA here: mixing it with CPU tensors fails as CUDA does."""
    image, mask, _ = _brain_with_tumour(3)
    augment = JointAugment(
        p_flip=1.0, p_rot90=1.0, p_affine=1.0, p_elastic=1.0, p_lesion_contrast=1.0,
        p_intensity=1.0, intensity={"noise": 0.1, "bias": 0.3}, seed=0,
    )  # fmt: skip
    out_image, out_mask = augment(image.to("meta"), mask.to("meta"))
    assert out_image.device.type == "meta" and out_image.shape == image.shape
    assert out_mask.device.type == "meta" and out_mask.shape == mask.shape
