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
