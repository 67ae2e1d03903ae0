"""Fine-tuning on corrections: weights, learning from 3 corrected slices, saving, cancelling."""

import hashlib

import numpy as np
import pytest

from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.finetune import (
    change_summary,
    correction_weights,
    finetune,
    finetune_and_save,
    interpolate_weights,
)
from napari_tumorseg.core.io import read_exam
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.models import learnt_from, load_model, user_models_dir

from ..conftest import BRATS, BRATS2023, make_tiny_model


@pytest.fixture(scope="module")
def exam():
    return read_exam(BRATS)


def _three_corrected_slices(exam, prediction):
    """A user who replaces 3 axial slices through the tumour by the expert labels."""
    expert = exam.labels.array
    tumour_slices = np.flatnonzero((expert > 0).any(axis=(1, 2)))
    chosen = tumour_slices[
        [len(tumour_slices) // 4, len(tumour_slices) // 2, 3 * len(tumour_slices) // 4]
    ]
    corrected = prediction.copy()
    corrected[chosen] = expert[chosen]
    edited = corrected != prediction
    return corrected, edited, chosen


def _folder_digest(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_correction_weights_favour_corrected_slices():
    edited = np.zeros((5, 4, 4), bool)
    edited[2, 1, 1] = True
    weights = correction_weights(edited, edited.shape, uncorrected=0.1)
    assert (weights[2] == 1).all() and (weights[[0, 1, 3, 4]] == pytest.approx(0.1))
    assert (correction_weights(None, (2, 2, 2)) == 1).all()
    # The rest of a corrected slice can count less than the corrected voxels themselves.
    weights = correction_weights(edited, edited.shape, uncorrected=0.1, confirmed=0.4)
    assert weights[2, 1, 1] == 1 and weights[2, 0, 0] == pytest.approx(0.4)
    assert weights[[0, 1, 3, 4]] == pytest.approx(0.1)


def test_interpolate_weights_blends_towards_the_parent():
    import torch

    network = torch.nn.Conv3d(2, 3, 3)
    tuned = {k: v.detach().clone() for k, v in network.named_parameters()}
    parent = {k: torch.randn_like(v) for k, v in tuned.items()}
    interpolate_weights(network, parent, 0.25)
    for name, p in network.named_parameters():
        torch.testing.assert_close(p.detach(), 0.25 * tuned[name] + 0.75 * parent[name])
    interpolate_weights(network, parent, 0.0)
    for name, p in network.named_parameters():
        torch.testing.assert_close(p.detach(), parent[name])


def test_change_summary_counts_and_scores_uncorrected_slices():
    before = np.zeros((4, 5, 5), np.uint8)
    before[:, 1:3, 1:3] = 2
    after = before.copy()
    after[0, 3, 3] = 4  # added ET (and WT, TC)
    after[1, 1, 1] = 0  # removed WT
    corrected = after.copy()
    edited = np.zeros_like(before, bool)
    edited[3, 0, 0] = True
    summary = change_summary(before, after, corrected, edited, (1.0, 1.0, 1.0))
    assert summary["changes"]["ET"] == {"added": 1, "removed": 0}
    assert summary["changes"]["WT"] == {"added": 1, "removed": 1}
    assert summary["uncorrected_slices"] == 3
    assert summary["dice_after"]["WT"] == 1.0 and summary["dice_before"]["WT"] < 1.0


# "adapt" cancelled while its parent segments the exam, and while its head is fitted.
@pytest.mark.parametrize("mode, training", [("keep", True), ("adapt", False), ("adapt", True)])
def test_cancelled_finetune_leaves_model_files_byte_identical(exam, mode, training):
    label = make_tiny_model("mine")
    model = load_model(label)
    root = user_models_dir()
    digest = _folder_digest(root)
    prediction = np.zeros(exam.reference.spatial_shape, np.uint8)
    corrected, edited, _ = _three_corrected_slices(exam, prediction)
    run = finetune_and_save(
        model, exam, corrected, edited, name="mine", mode=mode, steps=50, seconds=None
    )
    progress = next(run)
    while training and progress.loss is None:
        progress = next(run)
    if training:
        progress = next(run)
    assert (progress.loss is not None) == training
    run.close()
    assert _folder_digest(root) == digest
    assert [p.name for p in (root / "mine").iterdir()] == ["v1"]


def test_finetune_saves_a_new_version_with_its_card(exam):
    model = load_model(make_tiny_model("mine"))
    prediction = np.zeros(exam.reference.spatial_shape, np.uint8)
    corrected, edited, chosen = _three_corrected_slices(exam, prediction)
    folder, result = run_to_end(
        finetune_and_save(model, exam, corrected, edited, name="mine", steps=3, seconds=None)
    )
    assert folder.name == "v2"
    new = load_model("mine")
    card = new.card
    assert card["parent"] == "mine@v1" and card["version"] == 2
    assert card["finetune"]["exam"] == "Brats18_TCIA01_378_1"
    assert card["finetune"]["corrected_voxels"] == int(edited.sum())
    assert card["finetune"]["corrected_slices"] == [int(z) for z in chosen]
    assert card["finetune"]["steps"] == 3
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]
    # The parent version is still there: "revert" is choosing it again.
    assert load_model("mine@v1").card["version"] == 1


def test_a_fine_tune_keeps_the_batch_norm_statistics_of_its_parent(exam):
    """A few patches of one exam must not replace statistics gathered over a training set."""
    model = load_model(make_tiny_model("bn", spatial_dims=2, norm="batch"))
    prediction = np.zeros(exam.reference.spatial_shape, np.uint8)
    corrected, edited, _ = _three_corrected_slices(exam, prediction)
    run_to_end(finetune_and_save(model, exam, corrected, edited, name="bn", steps=3, seconds=None))
    parent, new = model.network.state_dict(), load_model("bn").network.state_dict()
    running = [k for k in parent if "running" in k]
    assert running
    for k in running:
        np.testing.assert_allclose(new[k].numpy(), parent[k].numpy(), rtol=1e-3)
    assert any(not np.allclose(new[k], parent[k]) for k in parent if "weight" in k)


def test_a_versions_card_says_which_exams_and_slices_it_learnt_from(exam):
    """Two "keep" rounds on two exams: the card's lineage names both exams (and their scans'
    fingerprints, which differ), their corrected slices, and the figures "keep" was measured
    with; `learnt_from` says it in a line."""
    other = read_exam(BRATS2023)
    model = load_model(make_tiny_model("chain"))
    for case in (exam, other):
        prediction = np.zeros(case.reference.spatial_shape, np.uint8)
        if case.labels is not None:
            corrected, edited, chosen = _three_corrected_slices(case, prediction)
        else:  # no expert labels: the user paints oedema on 3 slices
            z, y, x = (n // 2 for n in prediction.shape)
            chosen = [z - 10, z, z + 10]
            corrected = prediction.copy()
            corrected[chosen, y - 8 : y + 8, x - 8 : x + 8] = 2
            edited = corrected != prediction
        run_to_end(
            finetune_and_save(model, case, corrected, edited, name="chain", steps=2, seconds=None)
        )
        model = load_model("chain")
    lineage = model.card["lineage"]
    assert [entry["exam"] for entry in lineage] == [exam.name, other.name]
    assert [entry["parent"] for entry in lineage] == ["chain@v1", "chain@v2"]
    assert lineage[1]["corrected_slices"] == [int(z) for z in chosen]
    fingerprints = [entry["exam_fingerprint"] for entry in lineage]
    assert len(set(fingerprints)) == 2 and all(len(f) == 32 for f in fingerprints)
    measured = lineage[0]["measured"]
    assert measured and all("command" in figures for figures in measured.values())
    line = learnt_from(model.card)
    assert line.startswith("chain@v1 fine-tuned on 2 exams: ")
    assert f"{other.name} (keep, slices {', '.join(str(z) for z in chosen)})" in line
    assert learnt_from(load_model("chain@v1").card) == ""  # the tiny model: no training exams
    latest = learnt_from(model.card, latest=1)
    assert latest.startswith("chain@v1 fine-tuned on 2 exams: 1 earlier round; ")
    assert exam.name not in latest and other.name in latest


def test_no_correction_is_a_clear_error(exam):
    model = load_model(make_tiny_model("mine"))
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    with pytest.raises(TumorSegError, match="no corrected voxel"):
        next(finetune(model, exam, labels, np.zeros_like(labels, bool)))


def test_label_values_and_corrected_voxels_are_checked(exam):
    """The Python API checks what the dock checks: values outside BraTS would be learnt as
    background, a mask of corrected voxels on another grid would fail deep in training."""
    model = load_model(make_tiny_model("mine"))
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    edited = np.zeros_like(labels, bool)
    edited[70, 100:110, 100:110] = True
    labels[70, 100:110, 100:110] = 5
    with pytest.raises(TumorSegError, match="outside the BraTS convention"):
        next(finetune(model, exam, labels, edited, steps=1))
    labels[70, 100:110, 100:110] = 2
    with pytest.raises(TumorSegError, match="does not lie on the label map's grid"):
        next(finetune(model, exam, labels, edited[:-1], steps=1))


@pytest.mark.parametrize("name", ["3d", "a/b", "", ".hidden", "x" * 101, "é" * 51])
def test_a_bad_model_name_fails_before_any_training(exam, name):
    model = load_model(make_tiny_model())
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    edited = np.zeros_like(labels, bool)
    edited[70, 100:110, 100:110] = True
    run = finetune_and_save(model, exam, labels, edited, name=name, seconds=60)
    with pytest.raises(TumorSegError, match="not a valid model name"):
        next(run)  # the first step would have come here; no step is taken


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ({"seconds": 0}, "positive number of seconds"),
        ({"seconds": -5}, "positive number of seconds"),
        ({"seconds": float("nan")}, "positive number of seconds"),
        ({"seconds": None, "steps": 0}, "at least 1 step"),
    ],
)
def test_an_empty_budget_is_refused_not_saved_as_a_new_version(exam, budget, match):
    """A zero budget used to save an unchanged copy labelled as fine-tuned."""
    model = load_model(make_tiny_model("mine"))
    labels = np.zeros(exam.reference.spatial_shape, np.uint8)
    edited = np.zeros_like(labels, bool)
    edited[70, 100:110, 100:110] = True
    with pytest.raises(TumorSegError, match=match):
        next(finetune_and_save(model, exam, labels, edited, name="mine", **budget))
    assert load_model("mine").card["version"] == 1  # no new version


def test_a_renamed_model_folder_is_named_by_its_folder():
    """Segmentations record a model's label and a fine-tune loads its parent by it: the name
    comes from the folder it is found in, not from the card written before a rename."""
    assert make_tiny_model("mine") == "mine@v1"
    (user_models_dir() / "mine").rename(user_models_dir() / "theirs")
    model = load_model("theirs@v1")
    assert model.label == "theirs@v1"
    assert load_model(model.label).path == model.path


def test_a_new_version_never_replaces_a_folder_it_did_not_make():
    """The version number is claimed with an exclusive mkdir: a folder already there (a save
    running at the same time elsewhere, or a leftover without a card) is skipped, not replaced."""
    assert make_tiny_model("mine") == "mine@v1"
    stray = user_models_dir() / "mine" / "v2"
    stray.mkdir()
    (stray / "notes.txt").write_text("keep")
    assert make_tiny_model("mine") == "mine@v3"
    assert (stray / "notes.txt").read_text() == "keep"
    assert load_model("mine").card["version"] == 3


def test_2d_keep_draws_slices_around_the_corrections_and_elsewhere():
    """A 2D model's "keep" sees the brain beyond the corrected slices (`MODES_2D`'s
    ``context``), as a 3D patch does; "adapt" and 3D models are as `MODES` says."""
    from napari_tumorseg.core.finetune import (
        MODES,
        CorrectionExam,
        _CorrectionSampler,
        recipe,
    )
    from napari_tumorseg.core.training import CachedExam

    image = np.zeros((4, 12, 16, 16), np.float16)
    image[:, :, 2:14, 2:14] = np.arange(1, 13, dtype=np.float16)[:, None, None]  # z + 1
    weight = np.full((12, 16, 16), 0.125, np.float32)
    weight[5] = 1.0  # the one corrected slice
    cached = CachedExam("toy", image, np.zeros((3, 12, 16, 16), np.uint8), weight)
    exam = CorrectionExam(cached=cached, focus=np.argwhere(weight >= 0.5))

    def slices_drawn(context):
        sampler = _CorrectionSampler(exam, (8, 8), batch_size=64, seed=0, context=context)
        images = next(sampler)[0]
        return set(images[:, 0].amax(dim=(1, 2)).round().int().tolist())

    assert slices_drawn(0.0) == {6}
    share = recipe("keep", 2)["context"]
    assert 0 < share < 1 and len(slices_drawn(share)) > 5
    assert recipe("keep", 3) == MODES["keep"] and "context" not in recipe("keep", 3)
    assert recipe("adapt", 2) == MODES["adapt"]
    with pytest.raises(TumorSegError, match="unknown fine-tuning mode"):
        recipe("forget", 3)


def test_keep_makes_its_fewest_steps_whatever_the_time_budget(exam):
    """On a busy 2-core machine 60 s once made 2 steps and a version that had learnt nothing
    was saved: the time budget ends a run only after `min_steps`, and the progress says how
    long is left."""
    model = load_model(make_tiny_model("busy"))
    prediction = np.zeros(exam.reference.spatial_shape, np.uint8)
    corrected, edited, _ = _three_corrected_slices(exam, prediction)
    events = []
    result = run_to_end(
        finetune(model, exam, corrected, edited, seconds=0.01, min_steps=4), events.append
    )
    assert result.steps == 4
    assert events[0].loss is None and events[0].step == 0  # before the first step's wait
    trained = [e for e in events if e.loss is not None]
    assert [e.step for e in trained] == [1, 2, 3, 4]
    assert all(e.min_steps == 4 for e in trained)
    left = [e.remaining_seconds() for e in trained]
    assert left[0] > 0 and left[-1] == 0
