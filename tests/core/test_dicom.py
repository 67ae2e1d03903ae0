"""DICOM import: series found, recognised and read to the geometry the NIfTI reader gives."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_tumorseg.core import dicom
from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.io import SEQUENCES, read_exam

from ..conftest import BRATS

sitk = pytest.importorskip("SimpleITK")

FORREST = Path(__file__).resolve().parents[3] / "shared/data/dicom/studyforrest_T1w_every8th"
DESCRIPTIONS = {
    "t1": "T1 SE axial",
    "t1ce": "T1 SE axial post contrast",
    "t2": "T2 TSE axial",
    "flair": "FLAIR axial",
}


def write_series(volume, folder: Path, description: str, image_type="ORIGINAL\\PRIMARY\\AXIAL"):
    """Write a Volume as one DICOM series, a file per slice, with the tags a scanner writes
    (as SimpleITK's DicomSeriesFromArray example does). GDCM's writer leaves the process in
    the C locale (in a napari test session: Python then decodes a subprocess's output as
    ASCII): put back for the tests that follow. Reading leaves it alone (`test_plugin`)."""
    import locale

    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_series(volume, folder, description, image_type)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(volume, folder, description, image_type):
    folder.mkdir(parents=True)
    image = volume.to_sitk()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(abs(hash((str(folder), description))))[:18]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR",
            "0008|0008": image_type,
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.10f}" for p in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(plane)
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The sample exam as a study of 4 series and a 3-slice localiser."""
    exam = read_exam(BRATS)
    root = tmp_path_factory.mktemp("study")
    for i, seq in enumerate(SEQUENCES):
        write_series(exam.scans[seq], root / f"s{i}", DESCRIPTIONS[seq])
    t1 = exam.scans["t1"]
    localiser = dataclasses.replace(t1, array=t1.array[70:73])  # 3 slices, as a scanner's
    write_series(localiser, root / "loc", "3-plane localizer", "ORIGINAL\\PRIMARY\\LOCALIZER")
    return exam, root


@pytest.mark.skipif(not FORREST.is_dir(), reason="../shared/data/dicom is not there")
def test_a_real_oblique_series_reads_as_simpleitk_reads_it():
    (series,) = dicom.find_series(FORREST)
    assert dicom.sequence_of(series) == "t1" and dicom.left_out(series) is None
    volume = dicom.read_series(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(FORREST)))
    image = reader.Execute()
    assert volume.array.shape == (48, 384, 274)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    # Slices 5.33 mm apart, from the positions (SliceThickness says 0.67 mm); oblique kept.
    np.testing.assert_allclose(volume.spacing, [5.3333, 0.6667, 0.7], atol=1e-3)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(volume.affine[:3, :3], direction * image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 3], image.GetOrigin(), atol=1e-6)
    assert not np.allclose(direction, np.eye(3), atol=1e-3)


def test_a_study_of_four_series_and_a_localiser_reads_as_its_nifti(study):
    exam, root = study
    read = dicom.read_dicom_exam(root, name="case")
    assert list(read.scans) == list(SEQUENCES)
    assert any("localiser" in w for w in read.warnings)
    for seq in SEQUENCES:
        ours, theirs = read.scans[seq], exam.scans[seq]
        np.testing.assert_array_equal(ours.array, theirs.array)
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)


def test_a_missing_slice_is_one_clear_error_naming_the_series(study, tmp_path):
    _, root = study
    broken = tmp_path / "s0"
    shutil.copytree(root / "s0", broken)
    (broken / "0070.dcm").unlink()
    (series,) = dicom.find_series(broken)
    with pytest.raises(TumorSegError, match=r"T1 SE axial.*unequal slice spacing.*missing"):
        dicom.read_series(series)


def test_two_series_of_one_sequence_are_listed_for_the_user_to_choose(study, tmp_path):
    _, root = study
    for name in ("s0", "s1", "s2", "s3"):
        shutil.copytree(root / name, tmp_path / name)
    exam = read_exam(BRATS)
    write_series(exam.scans["t2"], tmp_path / "again", "T2 TSE axial repeat")
    with pytest.raises(dicom.SeriesChoiceNeeded, match="more than one series for t2") as caught:
        dicom.read_dicom_exam(tmp_path)
    assert "T2 TSE axial repeat" in str(caught.value) and "FLAIR axial" in str(caught.value)
    # What a GUI asks with, and reads the user's choice from.
    needed = caught.value
    by_description = {s.tags["description"]: s for s in needed.candidates}
    repeat = by_description["T2 TSE axial repeat"]
    assert needed.guesses[repeat.uid] == "t2" and len(needed.candidates) == 5
    choice = {needed.guesses[s.uid]: s.uid for s in needed.candidates if s is not repeat}
    choice["t2"] = repeat.uid
    read = dicom.read_dicom_exam(tmp_path, choice=choice)
    assert list(read.scans) == list(SEQUENCES)
    np.testing.assert_array_equal(read.scans["t2"].array, exam.scans["t2"].array)
    assert any("not chosen" in w for w in read.warnings)
    with pytest.raises(TumorSegError, match="one series was chosen for two sequences"):
        dicom.read_dicom_exam(tmp_path, choice={"t1": repeat.uid, "t2": repeat.uid})


@pytest.mark.parametrize(
    "description, expected",
    [
        ("t1_mprage_sag", "t1"),
        ("T1 MPRAGE +C", "t1ce"),
        ("AX T1 POST GD", "t1ce"),
        ("T2W_TSE", "t2"),
        ("AX FLAIR", "flair"),
        ("t2_tirm_tra_dark-fluid", "flair"),
        ("AX T1CE", "t1ce"),
        ("t1n", "t1"),
        ("DWI b1000", None),
    ],
)
def test_sequences_are_recognised_from_their_descriptions(description, expected):
    series = dicom.Series(uid="1", files=["a", "b", "c"], tags={"description": description})
    assert dicom.sequence_of(series) == expected


def test_a_folder_without_dicom_is_a_clear_error(tmp_path):
    with pytest.raises(TumorSegError, match="holds no DICOM series"):
        dicom.read_dicom_exam(tmp_path)


def test_a_dicom_study_segments_from_the_cli_into_its_niftis_geometry(study, tmp_path, tiny_model):
    """`tumorseg segment DICOM_DIR` gives the mask the NIfTI exam would give, in the same
    place in the world."""
    import nibabel as nib

    from napari_tumorseg.cli import main

    _, root = study
    from_dicom, from_nifti = tmp_path / "dicom_seg.nii.gz", tmp_path / "nifti_seg.nii.gz"
    for case, out in ((root, from_dicom), (BRATS, from_nifti)):
        args = ["segment", str(case), "--out", str(out), "--model", tiny_model]
        assert main([*args, "--precision", "float32"]) == 0
    a, b = nib.load(str(from_dicom)), nib.load(str(from_nifti))
    # The same voxels in the same places (the voxel order may differ: LPS from DICOM).
    np.testing.assert_allclose(
        nib.as_closest_canonical(a).affine, nib.as_closest_canonical(b).affine, atol=1e-4
    )
    np.testing.assert_array_equal(
        np.asanyarray(nib.as_closest_canonical(a).dataobj),
        np.asanyarray(nib.as_closest_canonical(b).dataobj),
    )
    assert np.asanyarray(a.dataobj).any()  # a map with something in it, not two empty ones
