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
