"""The exam head of "adapt to this exam": starts as the network, learns what the corrected
slices say, applies to its own exam only."""

import json
import re

import numpy as np
import pytest
import torch

from napari_tumorseg.core import refine
from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.finetune import finetune_and_save
from napari_tumorseg.core.inference import segment
from napari_tumorseg.core.io import read_exam
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.labels import probabilities_to_labels
from napari_tumorseg.core.models import HEAD_FILE, load_model
from napari_tumorseg.core.training import region_targets

from ..conftest import BRATS, make_tiny_model


@pytest.fixture(scope="module")
def exam():
    return read_exam(BRATS)


def _phantom(shape=(12, 24, 24)):
    """A 4-channel exam: a bright FLAIR ball is the tumour; the network's logits say nothing."""
    rng = np.random.default_rng(0)
    channels = rng.normal(100, 5, size=(4, *shape)).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    ball = (zz - 6) ** 2 / 16 + (yy - 12) ** 2 / 36 + (xx - 12) ** 2 / 36 < 1
    channels[3][ball] += 40
    labels = np.where(ball, 2, 0).astype(np.uint8)
    _skull_strip(channels)
    probabilities = np.full((3, *shape), 0.2, np.float32)  # WT missed but for the ball's centre
    probabilities[0, 5:8, 11:14, 11:14] = 0.9
    return channels, labels, probabilities


def _skull_strip(channels, z=(0, None), y=(3, -3), x=(3, -3)):
    """Zero outside a block, as in BraTS exams (the brain mask is the non-zero part)."""
    inside = np.zeros(channels.shape[1:], bool)
    inside[slice(*z), slice(*y), slice(*x)] = True
    channels[:, ~inside] = 0


def _fit(features, targets, **kwargs):
    steps = []
    fitting = refine.fit_head(features, targets, **kwargs)
    while True:
        try:
            steps.append(next(fitting))
        except StopIteration as stop:
            return stop.value, steps


def test_an_unfitted_head_returns_the_network_probabilities():
    channels, _, _ = _phantom()
    probabilities = np.random.default_rng(1).uniform(0.01, 0.99, (3, *channels.shape[1:]))
    probabilities = probabilities.astype(np.float32)
    out = run_to_end(
        refine.apply_head(refine.ExamHead(), channels, range(4), probabilities, (1, 1, 1))
    )
    np.testing.assert_allclose(out, probabilities, atol=1e-5)


def test_the_head_learns_the_corrected_slices_and_carries_to_the_others():
    channels, labels, probabilities = _phantom()
    edited = np.zeros(labels.shape, bool)
    edited[6] = labels[6] > 0  # the user paints the ball on one slice
    rows = refine.corrected_rows(edited, labels.shape[0])
    assert np.flatnonzero(rows).tolist() == [6]
    features, box, mask = run_to_end(
        refine.head_features(channels, range(4), probabilities, (1, 1, 1), rows=rows)
    )
    everywhere, _, brain = run_to_end(
        refine.head_features(channels, range(4), probabilities, (1, 1, 1))
    )
    # Every brain voxel of the corrected slice, nothing else; the same features either way.
    assert mask.sum() == brain[6 - box[0].start].sum() and len(features) == mask.sum()
    np.testing.assert_array_equal(features, everywhere[mask[brain]])
    assert features.shape[1] == refine.N_FEATURES
    head, steps = _fit(features, region_targets(labels[box][mask]).T)
    assert [i for i, _ in steps] == list(range(0, refine.ITERATIONS + 1, refine.CHUNK))
    assert steps[-1][1] < steps[0][1] / 3
    out = run_to_end(refine.apply_head(head, channels, range(4), probabilities, (1, 1, 1)))
    other = np.ones(labels.shape[0], bool)
    other[6] = False
    found, truth = out[0][other] > 0.5, labels[other] > 0
    dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
    assert dice > 0.9  # the network alone: 0


def test_the_head_adds_no_tumour_away_from_the_networks_and_the_users():
    """Two bright balls; the network found part of the first only; the user painted both on
    one slice. Without the user's anchors the head's second ball is dropped; with them kept."""
    shape = (16, 40, 64)
    rng = np.random.default_rng(0)
    channels = rng.normal(100, 5, size=(4, *shape)).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    balls = [(zz - 9) ** 2 / 16 + (yy - 24) ** 2 / 36 + (xx - x) ** 2 / 36 < 1 for x in (24, 48)]
    labels = np.zeros(shape, np.uint8)
    for ball in balls:
        channels[3][ball] += 40
        labels[ball] = 2
    # A brain box that starts well inside the grid on every axis (anchors are exam-grid voxels).
    _skull_strip(channels, z=(3, None), y=(12, None), x=(14, -2))
    probabilities = np.full((3, *shape), 0.2, np.float32)
    probabilities[0, 8:11, 23:26, 23:26] = 0.9
    given = probabilities.copy()
    rows = np.zeros(shape[0], bool)
    rows[9] = True
    features, box, mask = run_to_end(
        refine.head_features(channels, range(4), probabilities, (1, 1, 1), rows=rows)
    )
    head, _ = _fit(features, region_targets(labels[box][mask]).T)
    anchors = refine.tumour_anchors(labels, rows)
    # The innermost voxel of each painted piece: the balls' centres on slice 9.
    assert sorted(anchors) == [[9, 24, 24], [9, 24, 48]]
    for chosen, second_found in (((), False), (anchors, True)):
        out = run_to_end(
            refine.apply_head(head, channels, range(4), probabilities, (1, 1, 1), chosen)
        )
        assert (out[0][balls[0]] > 0.5).mean() > 0.9
        assert ((out[0][balls[1]] > 0.5).mean() > 0.9) == second_found
    np.testing.assert_array_equal(probabilities, given)  # the caller's map is left alone


def test_the_fingerprint_tells_exams_apart():
    channels, _, _ = _phantom()
    same = refine.exam_fingerprint(channels.copy(), [0, 1, 2, 3], (1, 1, 1))
    assert refine.exam_fingerprint(channels, [0, 1, 2, 3], (1, 1, 1)) == same
    changed = channels.copy()
    changed[2, 5, 5, 5] += 1
    assert refine.exam_fingerprint(changed, [0, 1, 2, 3], (1, 1, 1)) != same
    assert refine.exam_fingerprint(channels, [0, 2, 3], (1, 1, 1)) != same  # t1ce left out
    assert refine.exam_fingerprint(channels, [0, 1, 2, 3], (1, 1, 2)) != same


def test_adapt_saves_a_head_that_applies_to_its_exam_only(exam):
    model = load_model(make_tiny_model("mine"))
    before = run_to_end(segment(exam, model, device="cpu"))
    expert = exam.labels.array
    chosen = [60, 75, 90]
    corrected = before.labels.array.copy()
    corrected[chosen] = expert[chosen]
    edited = corrected != before.labels.array
    progress = []
    folder, result = run_to_end(
        finetune_and_save(model, exam, corrected, edited, name="mine", mode="adapt", seconds=5),
        progress.append,
    )
    assert (folder / HEAD_FILE).is_file()
    losses = [p.loss for p in progress if p.loss is not None]
    assert losses[-1] < losses[0]
    # The seconds of the head's features are reported as they go, not waited through.
    features = [p.fraction for p in progress if p.stage == "features"]
    assert len(features) > 10 and features == sorted(features) and features[-1] == 1.0
    adapted = load_model("mine")
    entry = adapted.card["exam_head"]
    assert entry["exam"] == exam.name and entry["training_voxels"] > 0
    # The network is the parent's: only the head differs.
    for a, b in zip(model.network.state_dict().values(), adapted.network.state_dict().values()):
        assert torch.equal(a, b)
    # A card's thresholds are chosen for the network's calibration; the head's probabilities
    # are fitted to the user's labels, so its map is cut at 0.5.
    for m in (model, adapted):
        m.card["postprocess"] = {"thresholds": [0.5, 0.9, 0.95]}
    events = []
    again = run_to_end(segment(exam, adapted, device="cpu"), events.append)
    assert any("exam head fitted on the corrections" in n for n in again.notes)
    # Applying the head moves the progress too: its share comes after the windows.
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    finishing = [e for e in events if e.finishing]
    assert len(finishing) > 10 and finishing[0].fraction < 0.9
    assert again.postprocess["thresholds"] == [0.5, 0.5, 0.5]
    np.testing.assert_array_equal(
        again.labels.array, probabilities_to_labels(again.probabilities.array)
    )
    keep = np.ones(expert.shape[0], bool)
    keep[chosen] = False

    def wt_dice(labels):
        a, b = labels[keep] > 0, expert[keep] > 0
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert wt_dice(again.labels.array) > wt_dice(before.labels.array) + 0.2
    # Another exam (here: the same scans with one sequence missing) gets the network alone.
    other = type(exam)(scans={k: v for k, v in exam.scans.items() if k != "t1"}, name="other")
    alone = run_to_end(segment(other, model, device="cpu"))
    elsewhere = run_to_end(segment(other, adapted, device="cpu"))
    assert any("not applied" in n for n in elsewhere.notes)
    assert elsewhere.postprocess["thresholds"] == [0.5, 0.9, 0.95]
    np.testing.assert_array_equal(elsewhere.labels.array, alone.labels.array)


def test_a_segmentation_unlike_the_one_the_head_was_fitted_on_is_said(exam):
    model = load_model(make_tiny_model("mine"))
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    labels[75, 100:140, 100:140] = 2
    run_to_end(finetune_and_save(model, exam, labels, labels > 0, name="mine", mode="adapt"))
    adapted = load_model("mine")
    assert adapted.card["exam_head"]["segmentation"] == {"overlap": 0.5, "tta": False}
    same = run_to_end(segment(exam, adapted, device="cpu"))
    assert not any("has not seen" in note for note in same.notes)
    other = run_to_end(segment(exam, adapted, device="cpu", tta=True))
    assert any("exam head fitted" in note for note in other.notes)
    assert any("TTA on, which it has not seen" in note for note in other.notes)


def test_keep_after_adapt_drops_the_parent_head(exam):
    model = load_model(make_tiny_model("mine"))
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    labels[75, 100:140, 100:140] = 2
    edited = labels > 0
    run_to_end(finetune_and_save(model, exam, labels, edited, name="mine", mode="adapt"))
    adapted = load_model("mine")
    assert adapted.head is not None
    folder, result = run_to_end(
        finetune_and_save(adapted, exam, labels, edited, name="mine", steps=1, seconds=None)
    )
    assert result.head is None and not (folder / HEAD_FILE).exists()
    kept = load_model("mine")
    assert kept.card["version"] == 3 and kept.head is None and "exam_head" not in kept.card


@pytest.mark.parametrize("damage", ["file", "card", "anchors"])
def test_a_damaged_head_is_a_clear_error_naming_the_file(exam, damage):
    model = load_model(make_tiny_model("mine"))
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    labels[75, 100:140, 100:140] = 2
    folder, _ = run_to_end(
        finetune_and_save(model, exam, labels, labels > 0, name="mine", mode="adapt")
    )
    if damage == "file":
        (folder / HEAD_FILE).write_bytes(b"not safetensors")
        expected = re.escape(f"{HEAD_FILE}: the exam head cannot be read")
    else:
        card = json.loads((folder / "card.json").read_text())
        if damage == "card":
            del card["exam_head"]["fingerprint"]
        else:
            card["exam_head"]["anchors"] = [[75, 120]]
        (folder / "card.json").write_text(json.dumps(card))
        expected = re.escape("card.json: the card's exam_head entry is incomplete")
    with pytest.raises(TumorSegError, match=expected):
        load_model("mine")
