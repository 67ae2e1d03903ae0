"""Brain extraction (HD-BET, `core.brain`) in the segmentation pipeline."""

from pathlib import Path

import numpy as np
import pytest

from napari_tumorseg.core import brain
from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.io import read_exam, read_volume
from napari_tumorseg.core.registration import register, resample_to
from napari_tumorseg.pipeline import segment_exam

from ..conftest import BRATS, TCGA_RAW

BRATS_SPACE = Path(__file__).resolve().parents[3] / "shared/data/tcia/TCGA-FG-6692/brats_space"

needs_hd_bet = pytest.mark.skipif(not brain.available(), reason="HD-BET is not installed")


@needs_hd_bet
def test_the_raw_exam_is_brain_extracted_before_it_is_segmented(tmp_path, tiny_model):
    exam = read_exam(TCGA_RAW)
    outcome = segment_exam(
        exam,
        tmp_path / "seg.nii.gz",
        model=tiny_model,
        register=True,
        reference="t1ce",
        log=lambda _: None,
    )  # brain extraction "auto": the raw exam has its skull
    assert outcome.brain is not None and outcome.result.skull_stripped
    mask = outcome.brain.mask.array.astype(bool)
    labels = outcome.result.labels.array
    assert labels.any() and not labels[~mask].any()  # no tumour voxel outside the brain
    # The mask against the skull-stripped brain of the same exam in BraTS space.
    reference = read_volume(BRATS_SPACE / "TCGA-FG-6692_t1c_bet.nii.gz")
    moved = register(reference, exam.scans["t1ce"], transform="affine")
    across = resample_to(outcome.brain.mask, reference, moved.transform, interpolation="nearest")
    ours, theirs = across.array > 0, reference.array > 0
    dice = 2 * (ours & theirs).sum() / (ours.sum() + theirs.sum())
    assert dice >= 0.90, dice


def test_a_skull_stripped_exam_is_left_as_it_is(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(brain, "extract_brain", lambda scan: pytest.fail("extracted"))
    exam = read_exam(BRATS)
    outcome = segment_exam(exam, tmp_path / "seg.nii.gz", model=tiny_model, log=lambda _: None)
    assert outcome.brain is None


def test_brain_extraction_on_without_hd_bet_says_how_to_install(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(brain.importlib.util, "find_spec", lambda name: None)
    logged = []
    exam = read_exam(TCGA_RAW)
    with pytest.raises(TumorSegError, match=r"pip install .*\[brain\]"):
        segment_exam(
            exam, tmp_path / "seg.nii.gz", model=tiny_model, brain_extraction="on", log=str
        )
    # "auto" goes on, and says what is missing.
    outcome = segment_exam(
        exam,
        tmp_path / "seg.nii.gz",
        model=tiny_model,
        register=True,
        log=logged.append,
    )
    assert outcome.brain is None and any("[brain]" in line for line in logged)
    assert np.asarray(outcome.result.labels.array).shape == exam.reference.array.shape


@needs_hd_bet
def test_the_brain_is_found_in_the_post_contrast_t1_whichever_sequences_are_given(
    tmp_path, tiny_model
):
    # The post-contrast T1 alone: the model input's first channel (t1) is empty; the mask must
    # come from the scan that is there.
    exam = read_exam([TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"])
    outcome = segment_exam(
        exam, tmp_path / "seg.nii.gz", model=tiny_model, brain_extraction="on", log=str
    )
    assert outcome.brain.source == "t1ce"
    assert 900 < outcome.brain.volume_ml < 2000
