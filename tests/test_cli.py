"""The `tumorseg` command: exit status and messages (contract 2.3)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_tumorseg.cli import main

from .conftest import BRATS


def test_headless_demo_writes_outputs_without_a_display(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "napari_tumorseg.cli", "demo", "--headless", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(next(out.glob("*_report.json")).read_text())
    assert report["volumes_ml"]["WT"] > 0
    for seg in out.glob("*seg*.nii.gz"):
        image = nib.load(str(seg))
        assert image.shape == (240, 240, 155)
        np.testing.assert_array_equal(
            image.affine, nib.load(str(next(BRATS.glob("*_t1.nii.gz")))).affine
        )


def test_models_lists_the_user_folder(capsys):
    assert main(["models"]) == 0
    assert "user models folder" in capsys.readouterr().out


def test_unwritable_output_is_exit_2_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "napari_tumorseg.cli", "demo", "--headless", str(blocker / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(blocker) in lines[0] and "Traceback" not in result.stderr


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "tumorseg"
    assert exe.exists()
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "models" in result.stdout
