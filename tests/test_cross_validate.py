"""scripts/cross_validate.py: folds stratified by site and grade, each exam held out once."""

import json
import sys
from collections import Counter
from pathlib import Path

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import cross_validate  # noqa: E402

NAMES = [
    *(f"Brats18_2013_{i}_1" for i in (3, 11, 23)),
    *(f"Brats18_CBICA_A{c}_1" for c in "BCDEFGHIJKLMNOPQ"),
    *(f"Brats18_TCIA0{i}_{i}00_1" for i in range(1, 6)),
    "Brats18_TCIA10_628_1",
    "Brats18_TCIA10_637_1",
    "Brats18_TCIA13_623_1",
]


def test_every_exam_is_held_out_once_in_folds_stratified_by_site_and_grade():
    folds = cross_validate.make_folds(NAMES)
    assert len(folds) == 5
    assert sorted(n for f in folds for n in f) == sorted(NAMES)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for fold in folds:
        sites = Counter(cross_validate.stratum(n) for n in fold)
        assert sites["CBICA"] in (3, 4)
        assert sites["TCIA"] + sites["TCIA lower-grade"] >= 1
        assert sites["TCIA lower-grade"] <= 1 and sites["2013"] <= 1
    # The same folds whatever order the exams come in.
    assert cross_validate.make_folds(NAMES[::-1]) == folds


def test_a_finished_fold_is_skipped_unless_it_is_to_be_scored_again(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in NAMES:
        (data / name).mkdir(parents=True)
        (data / name / f"{name}_seg.nii.gz").touch()
    monkeypatch.setattr(cross_validate, "CV_DIR", tmp_path / "cv")
    calls = []
    monkeypatch.setattr(cross_validate.train_bundled, "main", lambda argv: calls.append(argv) or 0)
    fold0 = tmp_path / "cv" / "r" / "fold0"
    (fold0 / "model").mkdir(parents=True)
    (fold0 / "model" / "card.json").write_text("{}")
    (fold0 / "labels").mkdir()
    (fold0 / "labels" / "exam.npy").touch()  # `predictions`' cache
    command = ["train", "--data", str(data), "--recipe", "r", "--folds", "0,1"]
    assert cross_validate.main([*command, "--", "--dims", "2"]) == 0
    assert len(calls) == 1 and str(tmp_path / "cv" / "r" / "fold1" / "model") in calls[0]
    assert calls[0][-2:] == ["--dims", "2"]
    calls.clear()
    # Scored again only from a checkpoint at its step budget: otherwise it would train on.
    (fold0 / "run").mkdir()
    state = {"step": 1500, "config": {"steps": 2000}}
    (fold0 / "run" / "state.json").write_text(json.dumps(state))
    rescore = [*command, "--rescore", "--", "--context-mm", "32"]
    assert cross_validate.main(rescore) == 2
    assert calls == [] and (fold0 / "labels" / "exam.npy").exists()
    (fold0 / "run" / "state.json").write_text(json.dumps({**state, "step": 2000}))
    assert cross_validate.main(rescore) == 0
    assert [c[c.index("--out") + 1] for c in calls] == [
        str(tmp_path / "cv" / "r" / f"fold{k}" / "model") for k in (0, 1)
    ]
    assert not (fold0 / "labels").exists()  # labels of the old settings


def test_the_report_says_when_folds_were_scored_with_different_inference_settings():
    cards = [{"context_mm": 32.0, "patch_size": [128, 128]}, {"patch_size": [128, 128]}]
    done = [{"fold": k, "card": card} for k, card in enumerate(cards)]
    said = " ".join(cross_validate._mixed_settings(done))
    assert "`context_mm` differs between the folds (fold 0: 32.0, fold 1: None)" in said
    assert "patch_size" not in said
    assert cross_validate._mixed_settings(done[:1]) == []


def _fold_models(tmp_path, monkeypatch, folds_of: dict[str, tuple[int, ...]]) -> Path:
    """Tiny 2D fold models (named as the bundled 2D model, whose rules they take) under a CV
    folder for each recipe and fold of ``folds_of``; one held-out exam, the sample, in each of
    two folds; MODELS.md in a temporary root. Returns the data folder."""
    import shutil

    from napari_tumorseg.core.models import user_models_dir

    from .conftest import BRATS, make_tiny_model

    exam = "Brats18_TCIA01_378_1"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / exam).symlink_to(BRATS)
    make_tiny_model("tinyfold", spatial_dims=2)
    cv = tmp_path / "cv"
    for recipe, folds in folds_of.items():
        for k in folds:
            folder = cv / recipe / f"fold{k}" / "model"
            shutil.copytree(user_models_dir() / "tinyfold" / "v1", folder)
            card = json.loads((folder / "card.json").read_text())
            (folder / "card.json").write_text(json.dumps({**card, "name": "2d"}))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "MODELS.md").write_text("# Bundled models\n")
    monkeypatch.setattr(cross_validate, "CV_DIR", cv)
    monkeypatch.setattr(cross_validate, "ROOT", tmp_path)
    monkeypatch.setattr(cross_validate, "make_folds", lambda names: [names, names])
    return tmp_path / "data"


def _rows(doc: str, candidates) -> dict[str, list[str]]:
    """Each candidate's row of a choice table: Dice and HD95 of WT, TC, ET as printed."""
    return {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:7]
        for line in doc.splitlines()
        if line.startswith(tuple(f"| {c} |" for c in candidates))
    }


def test_an_ensemble_is_scored_against_each_recipe_on_the_folds_all_have(tmp_path, monkeypatch):
    """Two recipes' fold models on a held-out exam: each alone and their mean, labelled with the
    bundled 2D card's rules, in a choice table; a fold one recipe has not finished is left out.
    Two recipes with the same weights: their mean scores exactly what each scores alone."""
    data = _fold_models(tmp_path, monkeypatch, {"ra": (0, 1), "rb": (0,)})
    argv = ["ensemble", "--data", str(data), "--recipes", "ra,rb"]
    assert cross_validate.main(argv) == 0
    doc = (tmp_path / "docs" / "MODELS.md").read_text()
    assert "<!-- ensemble ra+rb: begin -->" in doc and "### Ensemble, ra + rb" in doc
    assert "folds 0 (1 exams)" in doc  # fold 1: recipe rb has no model there
    rows = _rows(doc, ("ra", "rb", "mean of ra and rb"))
    assert set(rows) == {"ra", "rb", "mean of ra and rb"}
    assert rows["ra"] == rows["rb"] == rows["mean of ra and rb"]
    assert cross_validate.main(["ensemble", "--recipes", "ra"]) == 1  # one recipe is no ensemble


def _count_views(monkeypatch) -> list:
    """The ``views`` of every `segment` call cross_validate makes from now on."""
    from napari_tumorseg.core import inference

    calls, real = [], inference.segment

    def counted(*args, **kwargs):
        calls.append(kwargs.get("views"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "segment", counted)
    return calls


def test_views_are_each_run_once_and_the_axial_row_is_what_segment_gives(tmp_path, monkeypatch):
    """Every view's map computed once per exam, each candidate the mean of its views: the axial
    candidate's row holds exactly the scores of `segment` over axial slices with the bundled
    card's rules, and the table says which candidates the rule keeps."""
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.metrics import evaluate_labels
    from napari_tumorseg.core.models import load_model_folder

    data = _fold_models(tmp_path, monkeypatch, {"rv": (0,)})
    calls = _count_views(monkeypatch)
    assert cross_validate.main(["views", "--data", str(data), "--recipe", "rv"]) == 0
    assert sorted(calls) == [("axial",), ("coronal",), ("sagittal",)]  # one exam, fold 0
    doc = (tmp_path / "docs" / "MODELS.md").read_text()
    rows = _rows(doc, cross_validate.view_candidates())
    assert set(rows) == {"axial (the card's)", "axial + coronal", "axial + coronal + sagittal"}

    model = cross_validate.with_bundled_rules(
        load_model_folder(tmp_path / "cv" / "rv" / "fold0" / "model")
    )
    exam = read_exam(next(data.iterdir()))
    labels = run_to_end(segment(exam, model, device="cpu", views=("axial",))).labels.array
    found = evaluate_labels(labels, exam.labels.array, exam.reference.spacing)
    expected = [f"{found[r]['dice']:.3f}" for r in ("WT", "TC", "ET")]
    assert rows["axial (the card's)"][:3] == expected


def test_views_can_stop_at_coronal_and_must_start_axial(tmp_path, monkeypatch):
    data = _fold_models(tmp_path, monkeypatch, {"rv": (0,)})
    calls = _count_views(monkeypatch)
    argv = ["views", "--data", str(data), "--recipe", "rv"]
    assert cross_validate.main([*argv, "--views", "coronal,axial"]) == 1
    assert cross_validate.main([*argv, "--views", "axial,coronal"]) == 0
    assert calls == [("axial",), ("coronal",)]
    rows = _rows((tmp_path / "docs" / "MODELS.md").read_text(), cross_validate.view_candidates())
    assert set(rows) == {"axial (the card's)", "axial + coronal"}
