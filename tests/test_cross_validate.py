"""scripts/cross_validate.py: folds stratified by site and grade, each exam held out once."""

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
    model = tmp_path / "cv" / "r" / "fold0" / "model"
    model.mkdir(parents=True)
    (model / "card.json").write_text("{}")
    command = ["train", "--data", str(data), "--recipe", "r", "--folds", "0,1"]
    assert cross_validate.main([*command, "--", "--dims", "2"]) == 0
    assert len(calls) == 1 and str(tmp_path / "cv" / "r" / "fold1" / "model") in calls[0]
    assert calls[0][-2:] == ["--dims", "2"]
    calls.clear()
    assert cross_validate.main([*command, "--rescore", "--", "--context-mm", "32"]) == 0
    assert [c[c.index("--out") + 1] for c in calls] == [
        str(tmp_path / "cv" / "r" / f"fold{k}" / "model") for k in (0, 1)
    ]
