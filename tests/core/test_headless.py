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
