"""`core` must stay importable and usable without Qt or napari."""

import subprocess
import sys


def test_core_and_api_import_no_qt_or_napari():
    code = (
        "import sys, napari_tumorseg, napari_tumorseg.core.io, napari_tumorseg.core.volume, "
        "napari_tumorseg.core.models, napari_tumorseg.core.preprocess, napari_tumorseg.cli, "
        "napari_tumorseg.pipeline\n"
        "import pkgutil, importlib, napari_tumorseg.core as c\n"
        "for m in pkgutil.iter_modules(c.__path__):\n"
        "    importlib.import_module('napari_tumorseg.core.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'vispy'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reports_keep_a_dotted_exam_name(tmp_path):
    """``with_suffix`` would turn "sub-01.ses-1_report" into "sub-01.json"."""
    import numpy as np

    from napari_tumorseg.pipeline import label_map_report, report_paths, write_report

    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1, 1, 1] = 2
    base = tmp_path / "sub-01.ses-1_report"
    written = write_report(base, label_map_report(labels, 0.001, exam="sub-01.ses-1"))
    assert [p.name for p in written] == ["sub-01.ses-1_report.json", "sub-01.ses-1_report.csv"]
    assert list(report_paths(base)) == written


def test_segment_exam_replaces_an_existing_label_map_only_with_its_probabilities(
    tmp_path, tiny_model, monkeypatch
):
    """The label map and the probability map are one output: when the second cannot be written
    after the inference (a full disk), the user's earlier (perhaps edited) map stays."""
    import nibabel as nib
    import pytest

    from napari_tumorseg.core.errors import TumorSegError
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.pipeline import segment_exam

    from ..conftest import BRATS

    out, prob = tmp_path / "case_seg.nii.gz", tmp_path / "case_prob.nii.gz"
    out.write_bytes(b"edited mask")
    save = nib.save

    def disk_full(image, path):
        if "case_prob" in str(path):
            raise OSError(28, "No space left on device")
        save(image, path)

    monkeypatch.setattr(nib, "save", disk_full)
    exam = read_exam([BRATS / "Brats18_TCIA01_378_1_flair.nii.gz"])
    with pytest.raises(TumorSegError, match="No space left") as info:
        segment_exam(exam, out, model=tiny_model, prob_out=prob, log=lambda _: None)
    assert str(prob) in str(info.value)
    assert out.read_bytes() == b"edited mask" and not prob.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_seg.nii.gz"]
    monkeypatch.setattr(nib, "save", save)
    segment_exam(exam, out, model=tiny_model, prob_out=prob, log=lambda _: None)
    assert nib.load(str(out)).shape == nib.load(str(prob)).shape[:3]
