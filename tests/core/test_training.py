"""The training loop, the patch sampler and the exam cache."""

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_tumorseg.core.io import read_exam
from napari_tumorseg.core.training import (
    CachedExam,
    PatchSampler,
    cache_exam,
    crop_padded,
    region_targets,
    train_steps,
)
from napari_tumorseg.core.unet import UNet

from ..conftest import BRATS


def _toy_exam(seed=0):
    """Bright blobs are tumour: a problem a tiny U-Net learns in a few dozen steps."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 0.3, (4, 24, 24, 24)).astype(np.float16)
    target = np.zeros((3, 24, 24, 24), np.uint8)
    target[:, 8:16, 6:14, 10:18] = 1
    image[:, 8:16, 6:14, 10:18] += 2
    return CachedExam("toy", image, target)


def test_crop_padded_pads_outside_the_volume():
    array = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    out = crop_padded(array, (-1, 2), (3, 3))
    assert out.shape == (2, 3, 3)
    assert (out[:, 0] == 0).all() and (out[:, :, 2] == 0).all()
    np.testing.assert_array_equal(out[:, 1:, :2], array[:, :2, 2:])


@pytest.mark.parametrize("dims", [2, 3])
def test_sampler_shapes_and_sequence_dropout(dims):
    sampler = PatchSampler(
        [_toy_exam()], (16,) * dims, batch_size=3, p_drop_t1ce=1.0, p_drop_other=0.0, seed=1
    )
    image, target = sampler.sample()
    assert image.shape == (3, 4, *(16,) * dims) and target.shape == (3, 3, *(16,) * dims)
    assert (image[:, 1] == 0).all()  # t1ce dropped
    assert (image[:, 3] != 0).any()  # FLAIR never


def test_train_steps_learns_and_stops_when_closed():
    torch.manual_seed(0)
    network = UNet(3, features=(4, 8))
    sampler = PatchSampler(
        [_toy_exam()], (16, 16, 16), batch_size=2, p_tumour=0.9, p_drop_t1ce=0.0, p_drop_other=0.0
    )
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    run = train_steps(
        network, iter(sampler), optimizer, lambda step, elapsed: 1e-2, max_steps=60, bf16=False
    )
    losses = [progress.loss for progress in run]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    run = train_steps(network, iter(sampler), optimizer, lambda step, elapsed: 1e-2, max_steps=100)
    next(run)
    run.close()
    assert not network.training  # left in eval mode whatever happened


@pytest.mark.parametrize("norm_statistics", [True, False])
def test_a_fine_tune_can_keep_the_batch_norm_statistics(norm_statistics):
    torch.manual_seed(0)
    network = UNet(2, features=(4, 8), norm="batch")
    before = {k: v.clone() for k, v in network.state_dict().items() if "running" in k}
    sampler = PatchSampler([_toy_exam()], (16, 16), batch_size=2, p_drop_other=0.0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    run = train_steps(
        network,
        iter(sampler),
        optimizer,
        lambda step, elapsed: 1e-2,
        max_steps=3,
        bf16=False,
        norm_statistics=norm_statistics,
    )
    assert len(list(run)) == 3
    after = network.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert bool(moved) == norm_statistics
    assert any(p.grad is not None for p in network.parameters())  # it trained either way


def test_cache_matches_the_inference_preprocessing():
    exam = read_exam(BRATS)
    cached = cache_exam(exam, [2.0, 2.0, 2.0])
    assert cached.image.dtype == np.float16 and cached.target.dtype == np.uint8
    assert cached.image.shape[1:] == cached.target.shape[1:]
    # WT volume is kept through the resampling (within a few percent).
    wt_ml = region_targets(exam.labels.array)[0].sum() / 1000
    assert cached.target[0].sum() * 8 / 1000 == pytest.approx(wt_ml, rel=0.05)


@pytest.mark.parametrize("z", [93, 94, 95])
def test_cache_keeps_a_corrected_slice_among_weaker_ones(z):
    """1 -> 1.5 mm: whichever slice the user corrected, its labels and weight survive."""
    exam = read_exam(BRATS)
    expert = exam.labels.array
    labels = np.zeros_like(expert)
    labels[z] = expert[z]
    weight = np.full(expert.shape, 0.1, np.float32)
    weight[z] = 1.0
    cached = cache_exam(exam, [1.5, 1.5, 1.5], labels=labels, weight=weight)
    # The model slices around it (one, or two when it falls between them) carry its tumour
    # (1.5 x 1.5 mm in-plane voxels) ...
    wt_ml = (expert[z] > 0).sum() / 1000
    carrying = np.flatnonzero(cached.target[0].any(axis=(1, 2)))
    assert len(carrying) in (1, 2) and np.ptp(carrying) < 2
    for k in carrying:
        assert cached.target[0, k].sum() * 1.5**2 / 1000 == pytest.approx(wt_ml, rel=0.1)
    # ... and counts as a correction (weight >= 0.5), far more than the slices left alone.
    assert cached.weight.max() >= 0.5
    assert cached.weight.max() > 5 * cached.weight.min() > 0


@pytest.mark.parametrize("dx", [0, 1, 2])
def test_cache_keeps_a_one_voxel_brush_stroke_a_correction(dx):
    """A correction one voxel wide (here: erasing a line across the tumour) can fill as little
    as a quarter of a 1.5 mm model voxel (one column in three): it must still be a correction,
    weight >= 0.5 (or distillation hands it back to the parent) and its own label as target
    (or the untouched tumour around it outvotes it)."""
    from napari_tumorseg.core.finetune import MODES, correction_weights

    exam = read_exam(BRATS)
    labels = exam.labels.array.copy()
    tumour = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    z = int(tumour[len(tumour) // 2])
    rows, cols = np.nonzero(labels[z] > 0)
    x = int(np.median(cols)) + dx
    line = np.flatnonzero(labels[z, :, x] > 0)
    assert len(line) >= 20
    edited = np.zeros(labels.shape, bool)
    edited[z, line, x] = True
    labels[edited] = 0
    weight = correction_weights(edited, labels.shape, confirmed=MODES["keep"]["confirmed"])
    cached = cache_exam(exam, [1.5, 1.5, 1.5], labels=labels, weight=weight)
    corrections = cached.weight >= 0.5
    # The line is about len(line) / 1.5 model voxels long and one or two across, on one or
    # two model slices ...
    assert len(line) / 1.5 * 0.8 <= corrections.sum() <= 4 * (len(line) / 1.5 + 2)
    assert len(np.flatnonzero(corrections.any(axis=(1, 2)))) <= 2
    # ... and there the target is what the user drew (no tumour), not the tumour around it.
    assert cached.target[0][corrections].mean() < 0.2


def test_teacher_gives_the_targets_where_the_labels_are_not_corrections():
    torch.manual_seed(0)
    network, teacher = UNet(3, features=(4, 8)), UNet(3, features=(4, 8)).eval()
    image = torch.randn(1, 4, 16, 16, 16)
    labels = (torch.rand(1, 3, 16, 16, 16) > 0.5).float()
    weight = torch.full((1, 1, 16, 16, 16), 0.1)
    weight[:, :, 5:8] = 1.0  # three corrected slices ...
    weight[:, :, 8] = 0.7  # ... and one blurred by resampling
    seen = []

    def loss_fn(logits, target, weight=None):
        seen.append(target.detach().clone())
        return logits.float().mean()

    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    batches = iter([(image, labels, weight)])
    list(
        train_steps(
            network,
            batches,
            optimizer,
            lambda s, e: 0.0,
            1,
            loss_fn=loss_fn,
            bf16=False,
            teacher=teacher,
        )
    )
    with torch.no_grad():
        soft = torch.sigmoid(teacher(image))
    target = seen[0]
    torch.testing.assert_close(target[:, :, 5:9], labels[:, :, 5:9])
    torch.testing.assert_close(target[:, :, :5], soft[:, :, :5])
    torch.testing.assert_close(target[:, :, 9:], soft[:, :, 9:])


def test_training_uses_bfloat16_where_the_device_has_it(monkeypatch):
    from napari_tumorseg.core import training

    monkeypatch.setattr(training, "cpu_bf16_is_fast", lambda: True)
    assert training.uses_bf16("cpu")
    monkeypatch.setattr(training, "cpu_bf16_is_fast", lambda: False)
    assert not training.uses_bf16("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    asked = []

    def capability(device=None, major=8):
        asked.append(torch.device(device))
        return (major, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert training.uses_bf16("cuda:1") and asked == [torch.device("cuda:1")]  # Ampere
    # Turing (7.5) and older: torch would emulate bfloat16 (is_bf16_supported says yes).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert not training.uses_bf16("cuda")
    assert not training.uses_bf16("mps")


def test_the_cache_is_made_again_when_an_exam_changes(tmp_path):
    """An exam whose label map (or scans) changed is not trained on stale voxels."""
    import shutil

    from napari_tumorseg.core.training import build_cache

    data = tmp_path / "data"
    shutil.copytree(BRATS, data / "case")
    logged = []
    first = build_cache(data, tmp_path / "cache", [3.0, 3.0, 3.0], log=logged.append)
    again = build_cache(data, tmp_path / "cache", [3.0, 3.0, 3.0], log=logged.append)
    assert len(logged) == 1  # the second call read the cache
    np.testing.assert_array_equal(again[0].target, first[0].target)

    seg = next((data / "case").glob("*_seg.nii.gz"))
    image = nib.load(seg)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), seg)
    changed = build_cache(data, tmp_path / "cache", [3.0, 3.0, 3.0], log=logged.append)
    assert len(logged) == 2
    assert first[0].target.any() and not changed[0].target.any()
