"""Sliding-window and slice inference, labels and `segment`, on tiny networks made here (CPU)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_tumorseg.core import devices, inference, slices
from napari_tumorseg.core.devices import select_device
from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.inference import exam_to_channels, segment
from napari_tumorseg.core.io import SEQUENCES, Exam, read_exam
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.labels import card_labels, probabilities_to_labels
from napari_tumorseg.core.models import TumorModel
from napari_tumorseg.core.postprocess import keep_largest_component, minor_tumours_note
from napari_tumorseg.core.slices import VIEWS, slice_inference, views_inference
from napari_tumorseg.core.sliding import sliding_window
from napari_tumorseg.core.unet import UNet
from napari_tumorseg.core.volume import Volume
from napari_tumorseg.core.windows import gaussian_importance, plan_windows, window_starts

from ..conftest import BRATS, TCGA_RAW

monai_utils = pytest.importorskip("monai.data.utils")
from monai.inferers import sliding_window_inference  # noqa: E402


class LogitIdentity(nn.Module):
    """Returns the logit of its first three channels: after the sigmoid, the input itself."""

    divisor = 1

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.batches: list[int] = []

    def forward(self, x):
        self.calls += 1
        self.batches.append(x.shape[0])
        return torch.logit(x[:, :3].clamp(1e-6, 1 - 1e-6))


def _drain(generator):
    events = []
    result = run_to_end(generator, events.append)
    return events, result


def _tiny_unet(spatial_dims, seed=0):
    torch.manual_seed(seed)
    return UNet(spatial_dims, features=(4, 8, 16), norm="instance").eval()


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# --------------------------------------------------------------------------- window plan
@pytest.mark.parametrize(
    ("size", "patch", "overlap"),
    [
        (100, 32, 0.5),
        (100, 32, 0.25),
        (64, 64, 0.5),
        (40, 64, 0.5),
        (41, 64, 0.5),
        (7, 4, 0.9),
        (130, 128, 0.5),
        (155, 96, 0.5),
        (240, 128, 0.0),
    ],
)
def test_window_starts_are_monai_positions(size, patch, overlap):
    from monai.inferers.utils import _get_scan_interval

    padded = max(size, patch)
    interval = _get_scan_interval((padded,), (patch,), 1, (overlap,))
    slices = monai_utils.dense_patch_slices((padded,), (patch,), interval)
    shift = (padded - size) // 2  # MONAI pads (half, rest) before planning
    assert window_starts(size, patch, overlap) == [s[0].start - shift for s in slices]


@pytest.mark.parametrize("patch", [(16, 16, 16), (8, 24, 12), (32, 20)])
def test_gaussian_importance_is_monais(patch):
    ours = gaussian_importance(patch, ndim=len(patch))
    theirs = monai_utils.compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == patch
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert gaussian_importance(patch, ndim=len(patch)) is ours  # cached


def test_skipped_windows_hold_no_mask_voxel():
    shape, patch = (30, 40, 36), (16, 16, 16)
    mask = np.zeros(shape, bool)
    mask[3:9, 25:33, 2:7] = True
    mask[28, 0, 35] = True
    full = plan_windows(shape, patch, 0.5)
    kept = plan_windows(shape, patch, 0.5, mask=mask)
    assert set(kept) <= set(full) and 0 < len(kept) < len(full)
    for start in full:
        box = tuple(slice(max(s, 0), s + p) for s, p in zip(start, patch))
        assert (start in kept) == bool(mask[box].any())
    # Every mask voxel is still covered by a kept window.
    covered = np.zeros(shape, bool)
    for start in kept:
        covered[tuple(slice(s, s + p) for s, p in zip(start, patch))] = True
    assert covered[mask].all()


# --------------------------------------------------------------------------- engines
def _engine(mode, network, image, tta=False, mask=None, batch_size=2, activation="sigmoid"):
    if mode == "3d":
        return sliding_window(
            network,
            image,
            (8, 12, 8),
            overlap=0.5,
            batch_size=batch_size,
            mask=mask,
            tta=tta,
            activation=activation,
        )
    if mode == "views":
        assert activation == "sigmoid"
        return views_inference(
            network, image, tuple(VIEWS), batch_size=batch_size, mask=mask, tta=tta
        )
    return slice_inference(
        network, image, batch_size=batch_size, mask=mask, tta=tta, activation=activation
    )


@pytest.mark.parametrize(
    ("mode", "tta"), list(itertools.product(["3d", "2d", "views"], [False, True]))
)
def test_identity_network_reproduces_the_input(mode, tta):
    image = _random_image((4, 11, 23, 17)) * 0.9 + 0.05
    network = LogitIdentity()
    events, probabilities = _drain(_engine(mode, network, image, tta=tta))
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (3, *image.shape[1:])
    np.testing.assert_allclose(probabilities, image[:3], atol=1e-5)
    if mode == "views":
        return
    _, logits = _drain(_engine(mode, LogitIdentity(), image, activation=None))
    np.testing.assert_allclose(logits, np.log(image[:3] / (1 - image[:3])), atol=1e-4)


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "patch", "overlap"),
    [
        (3, (20, 37, 29), (16, 16, 16), 0.5),
        (3, (20, 37, 29), (16, 32, 16), 0.25),
        (3, (12, 37, 29), (16, 40, 16), 0.5),  # the patch is larger than the image on 2 axes
        (2, (37, 29), (16, 16), 0.5),
        (2, (37, 29), (32, 48), 0.5),
    ],
)
def test_matches_monai_sliding_window(spatial_dims, shape, patch, overlap):
    network = _tiny_unet(spatial_dims)
    image = _random_image((4, *shape), seed=1)
    _, ours = _drain(
        sliding_window(network, image, patch, overlap=overlap, batch_size=3, precision="float32")
    )
    with torch.inference_mode():
        theirs = sliding_window_inference(
            torch.from_numpy(image)[None], patch, 3, network, overlap=overlap, mode="gaussian"
        )
    theirs = torch.sigmoid(theirs[0]).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_skipping_changes_nothing_where_the_brain_is():
    network = _tiny_unet(3)
    image = _random_image((4, 24, 40, 36), seed=2)
    mask = np.zeros(image.shape[1:], bool)
    mask[2:10, 5:18, 20:30] = True
    counting = LogitIdentity()
    _, _ = _drain(sliding_window(counting, image, 16, mask=mask, batch_size=1))
    assert (
        counting.calls
        == len(plan_windows(image.shape[1:], 16, 0.5, mask))
        < len(plan_windows(image.shape[1:], 16, 0.5))
    )
    _, skipped = _drain(sliding_window(network, image, 16, mask=mask))
    _, full = _drain(sliding_window(network, image, 16))
    np.testing.assert_allclose(skipped[:, mask], full[:, mask], atol=1e-6)
    # Voxels no computed window covers are 0, not sigmoid(0).
    assert skipped[:, 20:, :, :4].max() == 0


@pytest.mark.parametrize("mode", ["3d", "2d", "views"])
@pytest.mark.parametrize("masked", [False, True])
def test_final_boxes_tile_the_output_once_with_final_values(mode, masked):
    image = _random_image((4, 13, 30, 22), seed=3)
    mask = None
    if masked:
        mask = np.zeros(image.shape[1:], bool)
        mask[4:9, 3:12, 10:20] = True
    events, result = _drain(_engine(mode, _tiny_unet(3 if mode == "3d" else 2), image, mask=mask))
    if mode == "views":  # every view's slices counted, final boxes in the last view only
        slices_with_brain = [13, 30, 22] if mask is None else [5, 9, 10]
        assert events[-1].total == sum(slices_with_brain)
    painted = np.zeros(image.shape[1:], np.int32)
    assert events[0].done == 0 and events[0].box is None
    for event in events:
        assert 0 <= event.done <= event.total
        if event.box is not None:
            painted[event.box] += 1
            np.testing.assert_allclose(event.partial, result[(slice(None), *event.box)], atol=1e-6)
        if event.window is not None:
            preview = event.current(event.window)
            assert preview.shape == (3, *(s.stop - s.start for s in event.window))
    assert (painted == 1).all()
    assert events[-1].done == events[-1].total
    assert [e.done for e in events] == sorted(e.done for e in events)


def test_views_average_the_network_over_axial_coronal_and_sagittal_slices():
    """A 2D network over three views: the mean of its slice-by-slice maps of the volume
    transposed so that each view's slices come first (a 3x3 network: the views differ)."""
    network = _tiny_unet(2)
    image = _random_image((4, 9, 20, 14), seed=4)
    _, mean = _drain(views_inference(network, image, ("axial", "coronal", "sagittal")))
    maps = []
    for order in ((0, 1, 2), (1, 0, 2), (2, 1, 0)):
        moved = np.ascontiguousarray(image.transpose(0, *(a + 1 for a in order)))
        _, own = _drain(slice_inference(network, moved))
        maps.append(own.transpose(0, *(a + 1 for a in np.argsort(order))))
    assert not np.allclose(maps[0], maps[1], atol=1e-3)
    np.testing.assert_allclose(mean, np.mean(maps, axis=0), atol=1e-5)
    _, axial = _drain(views_inference(network, image, ("axial",)))
    np.testing.assert_allclose(axial, maps[0], atol=1e-6)
    with pytest.raises(ValueError, match="views must be some of"):
        run_to_end(views_inference(network, image, ("oblique",)))


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_closing_the_generator_stops_between_batches(mode):
    network = LogitIdentity()
    image = _random_image((4, 12, 24, 16))
    engine = _engine(mode, network, image, batch_size=1)
    first = next(engine)
    assert first.done == 0 and network.calls == 0
    next(engine)
    assert not torch.is_inference_mode_enabled()  # no torch state leaks out between yields
    calls = network.calls
    engine.close()
    assert calls == 1 and network.calls == 1
    with pytest.raises(StopIteration):
        next(engine)


class _RecordsDtype(torch.nn.Module):
    """A 1x1 convolution that records the dtype its output had under autocast."""

    def __init__(self, spatial_dims: int):
        super().__init__()
        conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
        self.conv = conv(4, 3, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y.dtype)
        return y


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_cpu_mixed_precision_only_where_the_cpu_has_bfloat16(monkeypatch, mode):
    image = _random_image((4, 8, 16, 16))
    results = {}
    for native, precision in [(True, "auto"), (True, "float32"), (False, "auto")]:
        monkeypatch.setattr(devices, "cpu_bf16_is_fast", lambda native=native: native)
        network = _RecordsDtype(3 if mode == "3d" else 2)
        torch.manual_seed(0)
        network.conv.reset_parameters()
        if mode == "3d":
            engine = sliding_window(network, image, 8, precision=precision)
        else:
            engine = slice_inference(network, image, precision=precision)
        _, results[native, precision] = _drain(engine)
        expected = torch.bfloat16 if (native, precision) == (True, "auto") else torch.float32
        assert set(network.seen) == {expected}
    assert results[True, "auto"].dtype == np.float32  # blending stays float32
    np.testing.assert_allclose(results[True, "auto"], results[True, "float32"], atol=2e-2)
    assert not np.array_equal(results[True, "auto"], results[True, "float32"])
    np.testing.assert_array_equal(results[False, "auto"], results[True, "float32"])


def test_autocast_dtype_per_device_and_precision(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_is_fast", lambda: False)
    assert devices.autocast_dtype(torch.device("cuda")) == torch.float16
    assert devices.autocast_dtype(torch.device("cuda"), "float32") is None
    assert devices.autocast_dtype(torch.device("cpu")) is None
    assert devices.autocast_dtype(torch.device("mps")) is None
    with pytest.raises(TumorSegError, match="unknown precision 'half'"):
        devices.autocast_dtype(torch.device("cpu"), "half")


class _OutOfMemoryOnMeta(LogitIdentity):
    def forward(self, x):
        if x.device.type == "meta":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return super().forward(x)


def test_out_of_device_memory_falls_back_to_cpu():
    image = _random_image((4, 10, 12, 12)) * 0.9 + 0.05
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        events, result = _drain(
            sliding_window(_OutOfMemoryOnMeta(), image, 8, device=torch.device("meta"))
        )
    assert events[0].device == "meta" and events[-1].device == "cpu"
    np.testing.assert_allclose(result, image[:3], atol=1e-5)


class _NoRoomForWeights(LogitIdentity):
    """Moving the weights to the GPU already fails (a GPU other programs fill)."""

    def to(self, device, *args, **kwargs):
        if torch.device(device).type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return super().to(device, *args, **kwargs)


def test_out_of_device_memory_while_loading_the_weights_falls_back_to_cpu():
    image = _random_image((4, 10, 12, 12)) * 0.9 + 0.05
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        events, result = _drain(
            sliding_window(_NoRoomForWeights(), image, 8, device=torch.device("meta"))
        )
    assert all(event.device == "cpu" for event in events)
    np.testing.assert_allclose(result, image[:3], atol=1e-5)


def test_select_device():
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert select_device("auto").type == expected
    assert select_device("CPU") == torch.device("cpu")
    with pytest.raises(TumorSegError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TumorSegError, match="'cuda' is not available"):
            select_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(TumorSegError, match="'mps' is not available"):
            select_device("mps")


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    ("wt", "tc", "et", "label"),
    [
        (0.1, 0.1, 0.1, 0),
        (0.9, 0.1, 0.1, 2),
        (0.9, 0.9, 0.1, 1),
        (0.9, 0.9, 0.9, 4),
        (0.1, 0.9, 0.1, 1),
        (0.1, 0.1, 0.9, 4),
        (0.9, 0.1, 0.9, 4),
        (0.5, 0.5, 0.5, 0),
    ],
)
def test_labels_follow_brats_and_nest(wt, tc, et, label):
    probabilities = np.array([wt, tc, et], np.float32).reshape(3, 1, 1, 1)
    labels = probabilities_to_labels(probabilities)
    assert labels.dtype == np.uint8 and labels.shape == (1, 1, 1)
    assert labels.item() == label


def test_labels_regions_are_nested_on_random_maps():
    probabilities = _random_image((3, 20, 20, 20), seed=4)
    labels = probabilities_to_labels(probabilities, threshold=0.4)
    wt, tc, et = labels > 0, np.isin(labels, (1, 4)), labels == 4
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert not (et & ~tc).any() and not (tc & ~wt).any()
    np.testing.assert_array_equal(et, probabilities[2] > 0.4)


# --------------------------------------------------------------------------- segment
def _synthetic_channels(shape=(20, 36, 32), spacing=(1.0, 1.0, 1.0), channels=()):
    rng = np.random.default_rng(5)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = zz**2 + yy**2 + xx**2 < 0.8
    array = np.zeros((4, *shape), np.float32)
    for c in range(4):
        if not channels or SEQUENCES[c] in channels:
            array[c][brain] = 100 + 20 * c + rng.normal(0, 10, brain.sum())
    affine = np.diag([*spacing[::-1], 1.0])
    affine[:3, 3] = (-90.0, 120.0, -70.0)
    return Volume(array, affine, name="synthetic", channels=tuple(channels))


def _tiny_model(spatial_dims, patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0)):
    card = {
        "name": f"tiny{spatial_dims}d",
        "spatial_dims": spatial_dims,
        "patch_size": list(patch),
        "spacing_mm": list(spacing),
    }
    return TumorModel(network=_tiny_unet(spatial_dims), card=card, path=Path("."))


@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize(
    ("model_spacing", "channels"),
    [((1.0, 1.0, 1.0), ()), ((1.5, 1.25, 1.0), ("t1ce", "flair"))],
)
def test_segment_end_to_end(spatial_dims, model_spacing, channels):
    volume = _synthetic_channels(channels=channels)
    if spatial_dims == 2:
        model_spacing = model_spacing[1:]
    model = _tiny_model(spatial_dims, spacing=model_spacing)
    events, result = _drain(segment(volume, model, device="cpu"))
    probabilities, labels = result.probabilities, result.labels
    assert probabilities.array.shape == (3, *volume.spatial_shape)
    assert probabilities.array.dtype == np.float32 and labels.array.dtype == np.uint8
    assert labels.array.shape == volume.spatial_shape
    assert probabilities.same_grid(volume) and labels.same_grid(volume)
    assert probabilities.channels == ("WT", "TC", "ET")
    assert set(np.unique(labels.array)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(labels.array, probabilities_to_labels(probabilities.array))
    # 0 outside the brain, also where the model grid is coarser than the exam's (interpolation
    # back onto the exam's grid spread values up to two voxels past the brain's edge).
    resampled = tuple(model_spacing) not in ((1.0, 1.0, 1.0), (1.0, 1.0))
    outside = volume.array.max(axis=0) == 0
    assert probabilities.array[:, outside].max() == 0
    expected_used = tuple(channels) or SEQUENCES
    assert result.used_sequences == expected_used
    assert result.missing_sequences == tuple(s for s in SEQUENCES if s not in expected_used)
    assert result.seconds > 0
    # Progress is on the input grid, and final boxes carry the final values.
    painted = np.zeros(volume.spatial_shape, np.int32)
    for event in events:
        if event.box is not None:
            painted[event.box] += 1
            np.testing.assert_allclose(
                event.probabilities, probabilities.array[(slice(None), *event.box)], atol=1e-5
            )
        if event.preview is not None:
            box, values = event.preview()
            assert box == event.window and values.shape[1:] == tuple(s.stop - s.start for s in box)
    assert painted.max() == 1
    if not resampled:  # the final boxes tile the brain box
        assert painted[~outside].all()


def test_segment_computes_the_final_boxes_only_for_a_consumer_that_reads_them(monkeypatch):
    """A script or the CLI (which never read ``event.probabilities``) does not pay for mapping
    each step's final boxes onto the input grid; the whole map comes with the result."""
    from napari_tumorseg.core import inference

    calls = []
    original = inference._ModelToInput.__call__
    monkeypatch.setattr(
        inference._ModelToInput,
        "__call__",
        lambda self, *a: calls.append(1) or original(self, *a),
    )
    volume = _synthetic_channels()
    model = _tiny_model(3, spacing=(1.5, 1.25, 1.0))
    events, result = _drain(segment(volume, model, device="cpu"))
    assert any(event.box is not None for event in events) and calls == []
    event = next(event for event in events if event.box is not None)
    values = event.probabilities
    assert len(calls) == 1 and event.probabilities is values  # computed once, on first read
    np.testing.assert_allclose(
        values, result.probabilities.array[(slice(None), *event.box)], atol=1e-5
    )


def test_card_labels_applies_the_rules():
    probabilities = np.zeros((3, 10, 20, 20), np.float32)
    probabilities[0, 2:8, 2:12, 2:12] = 0.45  # WT only above a 0.4 threshold
    probabilities[:, 4:6, 4:8, 4:8] = 0.9  # 32 voxels of ET (0.032 mL at 1 uL)
    probabilities[0, 5, 16:18, 16:18] = 0.9  # a 4-voxel island
    plain = card_labels(probabilities, None, 0.001)
    np.testing.assert_array_equal(plain, probabilities_to_labels(probabilities))
    rules = {"thresholds": [0.4, 0.5, 0.5], "et_min_ml": 0.1, "island_ml": 0.01}
    labels = card_labels(probabilities, rules, 0.001)
    assert (labels == 2).sum() == 6 * 10 * 10 - 32 and not (labels == 4).any()
    assert (labels == 1).sum() == 32 and not labels[5, 16:18, 16:18].any()
    overridden = card_labels(probabilities, rules, 0.001, threshold=0.5)
    assert (overridden == 2).sum() == 0  # the 0.45 region is gone; the island too
    assert (overridden == 1).sum() == 32


def test_card_labels_removes_pieces_under_a_share_of_the_largest_tumour():
    probabilities = np.zeros((3, 20, 20, 20), np.float32)
    probabilities[0, 2:8, 2:8, 2:8] = 0.9  # the main tumour: 216 voxels
    probabilities[0, 12:16, 12:16, 12:16] = 0.9  # a second focus: 64 voxels (30 %)
    probabilities[0, 17:19, 2:4, 2:4] = 0.9  # an island: 8 voxels (4 %)
    labels = card_labels(probabilities, {"minor_share": 0.25}, 0.001)
    assert (labels > 0).sum() == 216 + 64 and not labels[17:19, 2:4, 2:4].any()
    largest = card_labels(probabilities, {"minor_share": 1.0}, 0.001)
    np.testing.assert_array_equal(largest, keep_largest_component(labels))
    assert (largest > 0).sum() == 216
    # What the user is told: the pieces and millilitres left out, or nothing.
    (note,) = minor_tumours_note(labels, largest, 1.0, 0.001)
    assert note.startswith("kept the largest tumour (the model card's rule): 1 other piece, 0.1 mL")
    (note,) = minor_tumours_note(card_labels(probabilities, None, 0.001), labels, 0.25, 0.001)
    assert note.startswith("removed pieces under 25% of the largest tumour (the model card's rule)")
    assert minor_tumours_note(largest, largest, 1.0, 0.001) == ()


def test_segment_uses_the_cards_postprocess_rules():
    volume = _synthetic_channels()
    model = _tiny_model(3)
    rules = {"thresholds": [0.3, 0.6, 0.7], "island_ml": 0.005}
    model.card["postprocess"] = rules
    _, result = _drain(segment(volume, model, device="cpu"))
    probabilities = result.probabilities.array
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    np.testing.assert_array_equal(result.labels.array, card_labels(probabilities, rules, voxel_ml))
    assert result.postprocess == rules  # what made the map, for the Review dock to redo
    _, raw = _drain(segment(volume, model, device="cpu", postprocess=False))
    np.testing.assert_array_equal(raw.labels.array, probabilities_to_labels(probabilities))
    assert not np.array_equal(raw.labels.array, result.labels.array)
    assert raw.postprocess == {"thresholds": [0.5, 0.5, 0.5]}
    _, forced = _drain(segment(volume, model, device="cpu", threshold=0.4))
    assert forced.postprocess == {**rules, "thresholds": [0.4, 0.4, 0.4]}


def test_segment_rejects_bad_input():
    model = _tiny_model(3)
    volume = _synthetic_channels()
    with pytest.raises(TumorSegError, match="4-channel"):
        run_to_end(segment(volume.with_array(volume.array[:3]), model, device="cpu"))
    with pytest.raises(TumorSegError, match="unknown sequence"):
        run_to_end(segment(volume.with_array(volume.array, channels=("dwi",)), model, "cpu"))
    empty = volume.with_array(np.zeros_like(volume.array))
    with pytest.raises(TumorSegError, match="no brain voxels"):
        run_to_end(segment(empty, model, device="cpu"))


def test_exam_to_channels_checks_the_grid():
    base = _synthetic_channels()
    t1 = base.with_array(base.array[0], name="t1", channels=())
    flair = base.with_array(base.array[3], name="flair", channels=())
    channels = exam_to_channels(Exam(scans={"t1": t1, "flair": flair}, name="case"))
    assert channels.array.shape == (4, *base.spatial_shape) and channels.channels == ("t1", "flair")
    assert channels.array.dtype == np.float32 and channels.same_grid(base)
    np.testing.assert_array_equal(channels.array[3], base.array[3])
    assert not channels.array[1].any() and not channels.array[2].any()
    shifted = Volume(base.array[2], base.affine @ np.diag([2.0, 1, 1, 1]), name="t2")
    with pytest.raises(TumorSegError, match=r"t2 \(.*\) does not lie on the grid of t1"):
        exam_to_channels(Exam(scans={"t1": t1, "t2": shifted}))
    # Scans read from files are named by their files too.
    with pytest.raises(TumorSegError) as info:
        exam_to_channels(read_exam(TCGA_RAW))
    assert "t2 (TCGA-FG-6692_t2_raw.nii.gz)" in str(info.value)
    assert "grid of t1 (TCGA-FG-6692_t1_raw.nii.gz)" in str(info.value)


@pytest.mark.slow
def test_segment_sample_exam():
    exam = read_exam(BRATS)
    model = _tiny_model(2, spacing=(1.0, 1.0))
    model.network = UNet(2, features=(4, 8), norm="instance").eval()
    events, result = _drain(segment(exam, model, device="cpu", batch_size=32))
    assert result.labels.array.shape == (155, 240, 240)
    assert result.labels.same_grid(exam.reference)
    assert result.used_sequences == SEQUENCES and not result.missing_sequences
    assert events[-1].done == events[-1].total > 100
    assert inference.REGION_NAMES == ("WT", "TC", "ET")


def test_load_model_refuses_weights_that_do_not_fit_the_card(tiny_model):
    """The network is built without weights (meta device) and takes the file's tensors: a card
    whose architecture differs from the weights is named, not a half-built network."""
    import json

    from napari_tumorseg.core.models import load_model, model_folder

    model = load_model(tiny_model)
    params = list(model.network.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert all(p.requires_grad for p in params)
    card_path = model_folder(tiny_model) / "card.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["features"] = [4, 8, 32]
    card_path.write_text(json.dumps(card))
    with pytest.raises(TumorSegError, match="do not fit the card's architecture") as info:
        load_model(tiny_model)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    card["architecture"]["features"] = "abc"
    card_path.write_text(json.dumps(card))
    with pytest.raises(TumorSegError, match="architecture cannot be built") as info:
        load_model(tiny_model)
    assert str(card_path) in str(info.value)
    card["spatial_dims"] = 5
    card_path.write_text(json.dumps(card))
    with pytest.raises(TumorSegError, match="spatial_dims=5") as info:
        load_model(tiny_model)
    assert str(card_path) in str(info.value)


def test_a_model_name_is_never_a_path(tiny_model):
    from napari_tumorseg.core.models import load_model, model_folder

    folder = model_folder(tiny_model)
    for name in (str(folder.parent), f"../models/{tiny_model}", f"./{tiny_model}"):
        with pytest.raises(TumorSegError, match="no model named"):
            load_model(name)


def test_2d_inference_of_a_small_field_of_view():
    """Slices smaller than the network's divisor are padded to two of them: instance norm
    needs more than one voxel at the deepest level."""
    network = UNet(2, in_channels=1, out_channels=3, features=(4, 8, 16)).eval()
    image = np.random.default_rng(0).normal(size=(1, 3, 3, 3)).astype(np.float32)
    probabilities = run_to_end(slices.slice_inference(network, image))
    assert probabilities.shape == (3, 3, 3, 3) and np.isfinite(probabilities).all()


def test_an_exam_with_the_skull_on_is_flagged(tiny_model):
    """The bundled models were trained on skull-stripped brains: on a raw exam they mark
    orbits, sinuses and scalp too, and the user is told so."""
    from napari_tumorseg.core.models import load_model
    from napari_tumorseg.core.preprocess import SKULL_ON_WARNING

    model = load_model(tiny_model)
    raw = read_exam([TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"])
    assert run_to_end(segment(raw, model, device="cpu")).warnings == (SKULL_ON_WARNING,)
    stripped = read_exam([BRATS / "Brats18_TCIA01_378_1_t1ce.nii.gz"])
    assert run_to_end(segment(stripped, model, device="cpu")).warnings == ()


def test_a_scan_at_the_edge_of_float32_is_normalised_as_any_other():
    """A corrupt scaling slope (1e34) put a scan's values near float32's limit: its sums
    overflowed, the channel turned NaN and the segmentation came out empty, without a word."""
    from napari_tumorseg.core.preprocess import brain_mask, zscore

    rng = np.random.default_rng(0)
    channels = np.zeros((4, 20, 20, 20), np.float32)
    channels[:, 4:16, 4:16, 4:16] = rng.uniform(100, 3000, (4, 12, 12, 12))
    huge = channels.copy()
    huge[0] *= np.float32(1e34)  # up to 3e37; the brain's sum goes past 3.4e38
    mask = brain_mask(channels)
    np.testing.assert_array_equal(brain_mask(huge), mask)
    np.testing.assert_allclose(zscore(huge, mask), zscore(channels, mask), atol=1e-4)


@pytest.mark.parametrize("size", [3, 5, 8])
def test_a_convolution_in_more_parts_than_output_slices_is_the_convolution(size):
    """A small field of view: fewer output slices than the parts asked for."""
    from contextlib import nullcontext

    from napari_tumorseg.core.unet import _conv_in_parts

    torch.manual_seed(0)
    x = torch.randn(1, 4, size, 6, 5)
    for stride in (1, 2):
        conv = nn.Conv3d(4, 8, 3, stride=stride, padding=1)
        with torch.no_grad():
            parts = run_to_end(_conv_in_parts(conv, x, 7, nullcontext))
            torch.testing.assert_close(parts, conv(x))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_forward_steps_is_forward_in_small_steps(spatial_dims, residual):
    from napari_tumorseg.core.unet import MIN_STEPS

    torch.manual_seed(0)
    network = UNet(spatial_dims, features=(16, 32, 64, 128, 256), residual=residual).eval()
    x = torch.randn(1, 4, *[32] * spatial_dims)
    fractions = []
    with torch.no_grad():
        expected = network(x)
        steps = run_to_end(network.forward_steps(x), fractions.append)
    torch.testing.assert_close(steps, expected)
    # The work done grows to 1, and no step (a convolution, or part of a large one) does
    # more than about 1/MIN_STEPS of it.
    assert len(fractions) >= MIN_STEPS and fractions[-1] == pytest.approx(1.0)
    increments = np.diff([0.0, *fractions])
    assert increments.min() > 0 and increments.max() <= 1.05 / MIN_STEPS


def test_progress_moves_inside_a_3d_window_and_closing_stops_within_it():
    """A 112^3 window takes seconds on 2 cores: the engine yields between the network's
    convolutions (``part``), so progress moves and a closed job stops within one of them."""
    torch.manual_seed(0)
    network = UNet(3, features=(4, 8, 16)).eval()
    image = _random_image((4, 24, 24, 24))
    events, _ = _drain(sliding_window(network, image, 16, overlap=0.5, batch_size=1))
    windows = events[0].total
    parts = [e.part for e in events if e.part > 0]
    assert windows > 1 and len(parts) >= 9 * windows  # nine inside each of the windows
    assert all(0 < p < 1 for p in parts)
    fractions = [(e.done + e.part) / e.total for e in events]
    assert fractions == sorted(fractions)
    calls = []
    network.encoders[1].register_forward_hook(lambda *args: calls.append(1))
    engine = sliding_window(network, image, 16, overlap=0.5, batch_size=1)
    next(engine)
    assert next(engine).part > 0
    engine.close()  # inside the first window: the convolutions after it never run
    assert calls == []


def test_progress_moves_inside_a_batch_of_slices_and_closing_stops_within_it():
    """A batch of 16 slices takes a second on 2 cores, 2-4 s in the viewer beside its software
    rendering: the 2D engine yields between the network's convolutions too, so the bar moves
    within a batch and Cancel acts within one convolution."""
    network = _tiny_unet(2)
    image = _random_image((4, 10, 24, 24))
    events, maps = _drain(slice_inference(network, image, batch_size=4))
    inside = [e for e in events if e.part > 0]
    assert len(inside) >= 9 * 3  # three batches (4, 4 and 2 slices), ten convolutions each
    assert all(e.box is None and 0 < e.part < 4 for e in inside)
    fractions = [(e.done + e.part) / e.total for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum(e.box[0].stop - e.box[0].start for e in events if e.box) == 10
    np.testing.assert_allclose(maps, _drain(slice_inference(network, image, batch_size=10))[1])
    calls = []
    network.head.register_forward_hook(lambda *args: calls.append(1))
    engine = slice_inference(network, image, batch_size=4)
    next(engine)
    assert next(engine).part > 0
    engine.close()  # inside the first batch: its last convolution never runs
    assert calls == []


def test_the_skull_warning_comes_with_the_first_event_before_the_network_runs(tiny_model):
    """A user hears that the exam still has its skull before the wait, not after it."""
    from napari_tumorseg.core.preprocess import SKULL_ON_WARNING

    raw = read_exam(TCGA_RAW)
    t1ce = raw.scans["t1ce"]
    exam = Exam(scans={"t1ce": t1ce}, name="raw")
    engine = inference.segment(exam, tiny_model)
    first = next(engine)
    engine.close()
    assert first.done == 0 and SKULL_ON_WARNING in first.warnings
    stripped = inference.segment(read_exam(BRATS), tiny_model)
    assert next(stripped).warnings == ()
    stripped.close()


@pytest.mark.parametrize("dims, window", [(3, None), (3, "fit"), (2, None)])
def test_labels_hold_still_when_the_exam_is_padded_or_cropped_around_the_brain(dims, window):
    """The window plan (3D) or the slices (2D) are laid over the brain box, not the volume:
    padding the exam with 20 voxels of background per side, or cropping 20 voxels of
    background off, moves no label."""
    import dataclasses

    from napari_tumorseg.core.models import load_model

    from ..conftest import make_tiny_model

    model = load_model(make_tiny_model(f"fov{dims}d", spatial_dims=dims))
    channels = exam_to_channels(read_exam(BRATS))
    events = []
    base = run_to_end(segment(channels, model, device="cpu", window=window), events.append)
    if window == "fit":
        assert max(e.total for e in events) == 1  # one window holds the whole brain box
    labels = base.labels.array
    assert labels.any()
    padded = dataclasses.replace(channels, array=np.pad(channels.array, [(0, 0)] + [(20, 20)] * 3))
    again = run_to_end(segment(padded, model, device="cpu", window=window))
    np.testing.assert_array_equal(again.labels.array[20:-20, 20:-20, 20:-20], labels)
    brain = np.argwhere(channels.array.any(axis=0))
    low, high = brain.min(axis=0), brain.max(axis=0) + 1
    margin = [min(20, int(lo), int(n - hi)) for lo, hi, n in zip(low, high, labels.shape)]
    crop = tuple(slice(m, n - m) for m, n in zip(margin, labels.shape))
    cropped = dataclasses.replace(channels, array=channels.array[(slice(None), *crop)])
    again = run_to_end(segment(cropped, model, device="cpu", window=window))
    np.testing.assert_array_equal(again.labels.array, labels[crop])


def test_a_bad_inference_window_is_a_clear_error():
    from napari_tumorseg.core.models import load_model

    from ..conftest import make_tiny_model

    model = load_model(make_tiny_model("fov"))
    with pytest.raises(TumorSegError, match='"fit" or a size in voxels'):
        run_to_end(segment(read_exam(BRATS), model, device="cpu", window="whole"))


def test_a_2d_model_runs_over_the_views_asked_for_where_the_slices_allow(tmp_path):
    """Three views on a 1 mm exam (every view's slices in the progress); on thick slices the
    axial view alone, with a note; views for a 3D model or an unknown view: clear errors."""
    import dataclasses

    from napari_tumorseg.core.models import load_model

    from ..conftest import make_tiny_model

    model = load_model(make_tiny_model("views2d", spatial_dims=2))
    channels = exam_to_channels(read_exam(BRATS))
    views = ("axial", "coronal", "sagittal")
    events = []
    three = run_to_end(segment(channels, model, device="cpu", views=views), events.append)
    axial = run_to_end(segment(channels, model, device="cpu"))
    assert three.notes == () and axial.notes == ()
    assert events[-1].total > 2 * max(e.total for e in _axial_events(channels, model))
    assert not np.array_equal(three.probabilities.array, axial.probabilities.array)
    affine = channels.affine.copy()
    affine[:3, 2] *= 4.0  # slices (Z, the last column: x y z) 4 mm thick; the model reads 2 mm
    thick = dataclasses.replace(channels, affine=affine)
    result = run_to_end(segment(thick, model, device="cpu", views=views))
    assert len(result.notes) == 1 and "coronal and sagittal view(s) left out" in result.notes[0]
    alone = run_to_end(segment(thick, model, device="cpu", views=("axial",)))
    np.testing.assert_array_equal(result.probabilities.array, alone.probabilities.array)
    with pytest.raises(TumorSegError, match="unknown view"):
        run_to_end(segment(channels, model, device="cpu", views=("oblique",)))
    with pytest.raises(TumorSegError, match="views are for 2D models"):
        run_to_end(segment(channels, make_tiny_model("views3d"), device="cpu", views=views))


def _axial_events(channels, model):
    events = []
    run_to_end(segment(channels, model, device="cpu"), events.append)
    return events


def test_with_enough_context_a_batch_norm_network_ignores_how_tightly_slices_are_cropped():
    """Batch norm with fixed statistics: a voxel's output depends on its receptive field
    alone. Given ``context`` zeros beyond that field on every side, a tight crop and the same
    slices padded with background give the same map; without it the crop's edge shows, and an
    instance-norm network moves with the background whatever the context."""
    torch.manual_seed(0)
    network = UNet(2, features=(4, 8), norm="batch").eval()
    for module in network.modules():  # statistics as after training: not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    image = _random_image((4, 3, 20, 14), seed=5)
    padded = np.pad(image, [(0, 0), (0, 0), (8, 8), (8, 8)])
    inner = (slice(None), slice(None), slice(8, 28), slice(8, 22))

    def maps(net, img, context):
        return _drain(slice_inference(net, img, context=context))[1]

    np.testing.assert_allclose(
        maps(network, padded, 32)[inner], maps(network, image, 32), atol=1e-5
    )
    assert not np.allclose(maps(network, padded, 0)[inner], maps(network, image, 0), atol=1e-3)
    instance = _tiny_unet(2)
    assert not np.allclose(maps(instance, padded, 32)[inner], maps(instance, image, 32), atol=1e-3)
    with pytest.raises(ValueError, match="context must be 0 or more"):
        maps(network, image, -1)


def test_with_context_the_slices_meet_the_network_at_one_phase_whatever_the_crop():
    """A network that down-samples by 4 sees an image moved by 1-3 voxels differently (the
    pooling grid falls elsewhere on it): a crop that moves the brain by other than a multiple
    of 4 moves the labels. With context and a mask, the engine puts the mask's first row and
    column on that grid wherever the crop left them, so every crop gives the same map."""
    torch.manual_seed(0)
    network = UNet(2, features=(4, 8, 16), norm="batch").eval()
    assert network.divisor == 4
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    image = _random_image((4, 3, 20, 14), seed=5)
    mask = np.ones(image.shape[1:], dtype=bool)
    width = [(0, 0), (0, 0), (3, 2), (1, 6)]  # odd shifts: not multiples of the divisor
    moved, moved_mask = np.pad(image, width), np.pad(mask, width[1:])
    inner = (slice(None), slice(None), slice(3, 23), slice(1, 15))

    def maps(img, brain, context):
        return _drain(slice_inference(network, img, mask=brain, context=context))[1]

    np.testing.assert_allclose(maps(moved, moved_mask, 48)[inner], maps(image, mask, 48), atol=1e-5)
    # Without the mask the engine has no brain to anchor on: the phase moves with the crop.
    assert not np.allclose(maps(moved, None, 48)[inner], maps(image, None, 48), atol=1e-3)


def test_segment_gives_a_2d_model_the_context_its_card_asks_for(monkeypatch):
    from napari_tumorseg.core.models import load_model

    from ..conftest import make_tiny_model

    model = load_model(make_tiny_model("context2d", spatial_dims=2, norm="batch"))
    seen = []
    real = slices.slice_inference

    def spy(*args, **kwargs):
        seen.append(kwargs.get("context"))
        return real(*args, **kwargs)

    monkeypatch.setattr(slices, "slice_inference", spy)
    channels = exam_to_channels(read_exam(BRATS))
    plain = run_to_end(segment(channels, model, device="cpu"))
    model.card["context_mm"] = 32.0  # the tiny model reads 2 mm pixels: 16 of them
    wide = run_to_end(segment(channels, model, device="cpu"))
    assert seen == [0, 16]
    assert not np.array_equal(plain.probabilities.array, wide.probabilities.array)
    model.card["context_mm"] = -4.0
    with pytest.raises(TumorSegError, match="context_mm=-4.0; expected 0 or more"):
        next(segment(channels, model, device="cpu"))
    assert len(seen) == 2  # refused before any work
