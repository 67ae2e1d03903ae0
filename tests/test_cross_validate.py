"""scripts/cross_validate.py: folds stratified by site and grade, each exam held out once."""

import json
import sys
from collections import Counter

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
