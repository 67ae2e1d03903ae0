"""The bundled models: cards, size, and accuracy on the sample exam (never trained on)."""

import json

import numpy as np
import pytest

from napari_tumorseg.core.finetune import finetune
from napari_tumorseg.core.inference import segment
from napari_tumorseg.core.io import read_exam
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.metrics import evaluate_labels
from napari_tumorseg.core.models import (
    BUNDLED,
    DEFAULT_MODEL,
    REQUIRED_CARD_KEYS,
    bundled_dir,
    load_model,
)

from .conftest import BRATS


@pytest.fixture(scope="module")
def exam():
    return read_exam(BRATS)


@pytest.mark.parametrize("name", BUNDLED)
def test_cards_are_complete(name):
    card = json.loads((bundled_dir() / name / "card.json").read_text())
    assert set(REQUIRED_CARD_KEYS) <= set(card)
    assert card["parent"] is None and card["spatial_dims"] == int(name[0])
    validation = card["metrics"]["validation"]
    assert set(validation["per_exam"]) == set(card["training"]["validation_exams"])
    assert set(card["metrics"]["validation_without_t1ce"]["mean"]) == {"WT", "TC", "ET"}
    assert not set(card["training"]["validation_exams"]) & set(card["training"]["train_exams"])
    assert "Brats18_TCIA01_378_1" not in card["training"]["train_exams"]


def test_bundled_weights_fit_the_budget():
    size = sum(p.stat().st_size for p in bundled_dir().rglob("*.safetensors"))
    assert size <= 25 * 1024**2


def test_the_default_model_on_the_sample_exam(exam):
    """CI's accuracy check: the model `tumorseg segment` runs without --model, on an exam
    that no model here was trained or chosen on."""
    model = load_model()
    assert model.card["name"] == DEFAULT_MODEL
    result = run_to_end(segment(exam, model, device="cpu"))
    scores = evaluate_labels(result.labels.array, exam.labels.array, exam.reference.spacing)
    print(
        f"{DEFAULT_MODEL} on the sample exam:",
        {r: f"Dice {s['dice']:.3f} HD95 {s['hd95_mm']:.1f} mm" for r, s in scores.items()},
    )
    assert scores["WT"]["dice"] >= 0.80


@pytest.mark.xfail(
    strict=True,
    reason="the bundled 3D model misses part of this exam's oedema (measured WT 0.722, TC "
    "0.940, ET 0.897; docs/MODELS.md); it is no longer the default",
)
def test_bundled_3d_model_on_the_sample_exam(exam):
    model = load_model("3d")
    result = run_to_end(segment(exam, model, device="cpu"))
    scores = evaluate_labels(
        result.labels.array, exam.labels.array, exam.reference.spacing, hd95=False
    )
    assert scores["WT"]["dice"] >= 0.80


def test_finetuning_a_weakened_model_helps_the_uncorrected_slices(exam):
    """The 3D model, weakened by noise on its weights (enhancing tumour all but lost), adapted
    to the exam on 3 expert slices (its exam head), recovers on the other slices."""
    import torch

    model = load_model("3d")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.network.parameters():
            parameter.add_(
                torch.randn(parameter.shape, generator=generator)
                * parameter.std().nan_to_num(0)
                * 1.0
            )
    before = run_to_end(segment(exam, model, device="cpu")).labels.array
    expert = exam.labels.array
    slices = np.flatnonzero((expert > 0).any(axis=(1, 2)))
    chosen = slices[[len(slices) // 4, len(slices) // 2, 3 * len(slices) // 4]]
    corrected = before.copy()
    corrected[chosen] = expert[chosen]
    result = run_to_end(
        finetune(model, exam, corrected, corrected != before, mode="adapt", steps=30, seconds=None)
    )
    after = run_to_end(segment(exam, result.model(model), device="cpu"))
    assert any("exam head" in note for note in after.notes)
    after = after.labels.array
    keep = np.ones(expert.shape[0], bool)
    keep[chosen] = False
    dice = {
        name: evaluate_labels(labels[keep], expert[keep], exam.reference.spacing, hd95=False)
        for name, labels in (("before", before), ("after", after))
    }
    print("uncorrected slices, before:", dice["before"], "after:", dice["after"])
    gain = {r: dice["after"][r]["dice"] - dice["before"][r]["dice"] for r in ("WT", "TC", "ET")}
    # Measured: WT 0.621 -> 0.918, TC 0.760 -> 0.957, ET 0.005 -> 0.943 (the exam head; before
    # the card cut tumour core at 0.65: 0.605 / 0.688 / 0.005 before; a network fine-tuned for
    # 30 steps then gained +0.008, +0.07, +0.43).
    assert np.mean(list(gain.values())) >= 0.05
    assert min(gain.values()) >= -0.02


def test_a_model_folder_loads_as_its_name_does(tmp_path):
    """`load_model_folder` (a cross-validation fold's model) is `load_model` without the name:
    a copy of the bundled 2D model's folder gives the same network."""
    import shutil

    import torch

    from napari_tumorseg.core.models import load_model_folder

    copy = tmp_path / "fold0" / "model"
    shutil.copytree(bundled_dir() / "2d", copy)
    by_folder, by_name = load_model_folder(copy), load_model("2d")
    assert by_folder.card == by_name.card and by_folder.path == copy
    for (k, a), (_, b) in zip(
        by_folder.network.state_dict().items(), by_name.network.state_dict().items()
    ):
        assert torch.equal(a, b), k
