"""Registration and resampling (core/registration.py) on the sample exams.

- Accuracy: BraTS T2 and FLAIR moved by known rigid transforms onto another grid are registered
  back to T1ce; mean target registration error over the brain < 1 mm.
- Real exam: the raw TCGA-FG-6692 sequences (oblique 5.5 mm slabs) registered to their T1ce
  overlap it better than in scanner coordinates (Dice of Otsu head masks >= 0.90).
- Bad input raises TumorSegError; closing a running registration stops it at once.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.io import SEQUENCES, read_exam, read_volume, write_volume
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.registration import (
    RegistrationProgress,
    reference_grid,
    register,
    register_files,
    register_to_reference,
    resample_to,
    stack_sequences,
)
from napari_tumorseg.core.volume import Volume

from ..conftest import BRATS, TCGA_RAW


@pytest.fixture(scope="module")
def brats():
    return read_exam(BRATS, labels=next(BRATS.glob("*_seg.nii.gz")))


@pytest.fixture(scope="module")
def tcga():
    return read_exam(TCGA_RAW)


# --------------------------------------------------------------------------- helpers
def _moved_copy(volume: Volume, angles_deg, shift_mm, spacing_mm=1.2, size_xyz=(200, 190, 120)):
    """``volume`` displaced by a known rigid transform and resampled on another grid.

    Returns the new volume M, with M(q) = volume(A(q)), and the transform A. The transform that
    registration must find (fixed point -> moving point) is therefore A's inverse.
    """
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    centre = np.asarray(
        image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    )
    a = sitk.Euler3DTransform()
    a.SetCenter(centre.tolist())
    a.SetRotation(*np.deg2rad(angles_deg).tolist())
    a.SetTranslation([float(t) for t in shift_mm])
    grid = sitk.Image(list(size_xyz), sitk.sitkFloat32)
    grid.SetSpacing([spacing_mm] * 3)
    origin = centre - (np.asarray(size_xyz) - 1) / 2 * spacing_mm + np.array([3.0, -4.0, 2.0])
    grid.SetOrigin(origin.tolist())
    moved = sitk.Resample(image, grid, a, sitk.sitkLinear, 0.0)
    return Volume.from_sitk(moved, name=volume.name), a


def _matrix(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with transform(x) = A x + b."""
    if transform.GetName() == "CompositeTransform":
        transform = transform.GetNthTransform(0)
    transform = transform.Downcast()
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    return matrix, np.asarray(transform.GetTranslation()) + centre - matrix @ centre


def _tre_mm(estimated: sitk.Transform, truth: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance (mm) between where two transforms send ``points`` (N, 3)."""
    (m1, o1), (m2, o2) = _matrix(estimated), _matrix(truth)
    return float(np.linalg.norm(points @ (m1 - m2).T + (o1 - o2), axis=1).mean())


def _brain_points(volume: Volume, stride: int = 5) -> np.ndarray:
    index_xyz = np.argwhere(volume.array > 0)[::stride, ::-1].astype(float)
    return index_xyz @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def _otsu(array: np.ndarray) -> np.ndarray:
    """Otsu head/brain mask of a scan (threshold on log intensity, holes filled)."""
    logged = sitk.GetImageFromArray(np.log1p(np.maximum(array, 0)).astype(np.float32))
    mask = sitk.BinaryFillhole(sitk.OtsuThreshold(logged, 0, 1, 128))
    return sitk.GetArrayFromImage(mask) > 0


def _head_dice(fixed: Volume, moving: Volume, transform) -> float:
    """Dice of the Otsu masks of fixed and moved scan on the fixed grid, in the common FOV."""
    moved = resample_to(moving, fixed, transform, "linear")
    ones = moving.with_array(np.ones(moving.spatial_shape, np.uint8), name="fov")
    cover = resample_to(ones, fixed, transform, "nearest").array > 0
    a, b = _otsu(fixed.array) & cover, _otsu(moved.array) & cover
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _drain(generator):
    events = []
    result = run_to_end(generator, events.append)
    return result, events


# --------------------------------------------------------------------------- accuracy
def test_known_rigid_transforms_are_recovered_within_1mm(brats):
    fixed = brats.scans["t1ce"]
    t2, truth_t2 = _moved_copy(brats.scans["t2"], (6, -4, 8), (7, -5, 6))
    flair, truth_flair = _moved_copy(brats.scans["flair"], (-8, 5, -10), (-6, 10, -4))
    start = time.perf_counter()
    result, events = _drain(stack_sequences({"flair": flair, "t2": t2, "t1ce": fixed}, threads=2))
    seconds = time.perf_counter() - start

    points = _brain_points(fixed)
    for seq, truth in (("t2", truth_t2), ("flair", truth_flair)):
        tre = _tre_mm(result.transforms[seq], truth.GetInverse(), points)
        assert tre < 1.0, f"{seq}: mean TRE {tre:.2f} mm"
        assert result.results[seq].quality > 0.95
        assert result.results[seq].quality > result.results[seq].quality_before
        assert result.results[seq].ok, result.results[seq].warning
    assert result.reference == "t1ce"
    assert result.volume.channels == ("t1ce", "t2", "flair")
    assert result.volume.array.shape == (3, *fixed.spatial_shape)
    assert result.volume.array.dtype == np.float32
    assert np.allclose(result.volume.affine, fixed.affine)
    # progress names each sequence, its step, and metric values while optimising
    optimise = [e for e in events if e.stage == "optimise"]
    assert {e.sequence for e in optimise} == {"t2", "flair"}
    assert {e.step for e in optimise} == {1, 2} and all(e.steps == 3 for e in events)
    assert all(np.isfinite(e.metric) and e.metric < 0 for e in optimise)
    assert 0 <= min(e.fraction for e in events) <= max(e.fraction for e in events) <= 1
    assert seconds < 30


def test_register_files_writes_fixed_geometry_and_itk_transform(brats, tmp_path):
    flair, truth = _moved_copy(brats.scans["flair"], (5, 7, -6), (9, -3, 5))
    moving_path = write_volume(tmp_path / "case_flair.nii.gz", flair.array, like=flair)
    fixed_path = next(BRATS.glob("*_t1ce.nii.gz"))
    out, tfm = tmp_path / "out" / "moved_flair.nii.gz", tmp_path / "flair_to_t1ce.tfm"

    result = register_files(fixed_path, moving_path, out, transform_out=tfm, threads=2)

    fixed = read_volume(fixed_path)
    written = read_volume(out, kind="scan")
    assert written.same_grid(fixed)
    assert written.array.dtype == flair.array.dtype
    # ITK convention: the written transform maps fixed-space points to moving-space points
    read_back = sitk.ReadTransform(str(tfm))
    points = _brain_points(fixed, stride=50)
    assert _tre_mm(read_back, truth.GetInverse(), points) < 1.0
    again = sitk.Resample(
        sitk.Cast(read_volume(moving_path).to_sitk(), sitk.sitkFloat32),
        sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32),
        read_back,
        sitk.sitkLinear,
        0.0,
    )
    assert np.abs(sitk.GetArrayViewFromImage(again) - written.array).max() <= 1.0
    assert result.quality > 0.95


def test_register_files_never_overwrites_an_input_nor_half_of_its_output(tmp_path, monkeypatch):
    from napari_tumorseg.core import registration

    fixed_path = tmp_path / "fixed_t2.nii.gz"
    moving_path = tmp_path / "moving_flair.nii.gz"
    fixed = read_volume(TCGA_RAW / "TCGA-FG-6692_t2_raw.nii.gz")
    write_volume(fixed_path, fixed.array, like=fixed)
    moving = read_volume(TCGA_RAW / "TCGA-FG-6692_flair_raw.nii.gz")
    write_volume(moving_path, moving.array, like=moving)
    before = fixed_path.read_bytes()
    with pytest.raises(TumorSegError, match="is one of the input scans"):
        register_files(fixed_path, moving_path, fixed_path)
    assert fixed_path.read_bytes() == before
    with pytest.raises(TumorSegError, match="is a file, not a folder"):
        register_files(
            fixed_path, moving_path, tmp_path / "out.nii.gz", transform_out=fixed_path / "t.tfm"
        )
    # The transform cannot be written after the registration: the existing output stays.
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"earlier result")

    def fail(transform, path):
        raise RuntimeError("ITK ERROR: TransformFileWriter: disk full")

    monkeypatch.setattr(registration.sitk, "WriteTransform", fail)
    with pytest.raises(TumorSegError, match="cannot write the transform") as info:
        register_files(fixed_path, moving_path, out, transform_out=tmp_path / "t.tfm", threads=2)
    assert str(tmp_path / "t.tfm") in str(info.value)
    assert out.read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fixed_t2.nii.gz",
        "moving_flair.nii.gz",
        "out.nii.gz",
    ]


def _qform_20mm_off(path, sform_code: int):
    """The raw T2 saved at ``path`` with a qform 20 mm from its sform (FSL FLIRT outputs);
    returns its sform (where this tool places it)."""
    import nibabel as nib

    image = nib.load(str(TCGA_RAW / "TCGA-FG-6692_t2_raw.nii.gz"))
    qform = image.affine.copy()
    qform[:3, 3] += (20.0, 0.0, 0.0)
    image.set_qform(qform, code=1)
    image.set_sform(image.affine, code=sform_code)
    nib.save(image, str(path))
    return image.affine


def test_a_transform_is_not_written_for_a_scan_itk_tools_place_elsewhere(tmp_path):
    """qform and sform that disagree (FSL FLIRT outputs): this tool places the scan by its
    sform, ITK tools by its qform (sform_code 2) -- the transform would map the wrong space."""
    fixed = tmp_path / "flirted_t2.nii.gz"
    _qform_20mm_off(fixed, sform_code=2)
    with pytest.raises(TumorSegError, match="qform and sform place it 20.0 mm apart") as info:
        register_files(
            fixed,
            TCGA_RAW / "TCGA-FG-6692_flair_raw.nii.gz",
            tmp_path / "out.nii.gz",
            transform_out=tmp_path / "t.tfm",
        )
    assert str(fixed) in str(info.value) and not (tmp_path / "out.nii.gz").exists()


def test_a_transform_is_written_where_simpleitk_reads_the_sform_too(tmp_path, monkeypatch):
    """With sform_code 1 SimpleITK (ITK 5.4) places a scan by its sform, as this tool does:
    the qform's disagreement is then no reason to refuse. Decided by what SimpleITK reads."""
    from napari_tumorseg.core import registration

    fixed = tmp_path / "both_t2.nii.gz"
    sform = _qform_20mm_off(fixed, sform_code=1)
    itk_origin = np.asarray(sitk.ReadImage(str(fixed)).GetOrigin())
    itk_reads_sform = np.allclose(itk_origin, np.diag([-1, -1, 1]) @ sform[:3, 3], atol=0.1)

    class Registered(Exception):
        """The check let the scan through (no registration is run: the check is tested)."""

    def register(*args, **kwargs):
        raise Registered

    monkeypatch.setattr(registration, "register", register)
    moving = TCGA_RAW / "TCGA-FG-6692_flair_raw.nii.gz"
    expected = (Registered,) if itk_reads_sform else (TumorSegError,)
    with pytest.raises(*expected):
        registration.register_files(
            fixed, moving, tmp_path / "out.nii.gz", transform_out=tmp_path / "t.tfm"
        )
    assert itk_reads_sform  # SimpleITK 2.5 (ITK 5.4), as pinned by the install, reads the sform


def test_a_tiny_field_of_view_is_a_clear_error(tcga):
    """A 4-voxel scan used to shrink to no voxel in the registration pyramid (an ITK
    "zero-valued spacing" traceback)."""
    tiny = _small(np.arange(64, dtype=np.float32).reshape(4, 4, 4), name="tiny")
    with pytest.raises(TumorSegError, match="tiny"):
        register(tcga.scans["t1ce"], tiny)


def test_simpleitk_errors_become_one_line_messages_naming_the_scan(tcga):
    from napari_tumorseg.core.registration import _registration_error

    error = RuntimeError(
        "Exception thrown in SimpleITK ImageRegistrationMethod_Execute: /x/itkImageBase.hxx:77:\n"
        "ITK ERROR: Image(0x7f9b): Zero-valued spacing is not supported\nRefusing to change"
    )
    converted = _registration_error(error, tcga.scans["t2"], tcga.scans["t1ce"])
    assert isinstance(converted, TumorSegError)
    assert "Zero-valued spacing is not supported" in str(converted)
    assert "TCGA-FG-6692_t2_raw.nii.gz" in str(converted) and "\n" not in str(converted)
    other = ValueError("a bug")
    assert _registration_error(other, tcga.scans["t2"], tcga.scans["t1ce"]) is other


def test_raw_clinical_exam_overlaps_its_reference_better(tcga):
    fixed = tcga.scans["t1ce"]
    for seq in ("t1", "t2", "flair"):
        moving = tcga.scans[seq]
        result = register(fixed, moving, threads=2)
        before = _head_dice(fixed, moving, None)
        after = _head_dice(fixed, moving, result.transform)
        assert after >= 0.90, f"{seq}: Dice {after:.3f}"
        assert after > before, f"{seq}: Dice {before:.3f} -> {after:.3f}"
        assert result.moved.same_grid(fixed) and result.moved.name == seq
        assert result.ok, result.warning


# --------------------------------------------------------------------------- stacking
def test_stack_already_registered_keeps_channel_order_and_grid(brats):
    result, events = _drain(stack_sequences(brats.scans, already_registered=True))
    assert result.volume.channels == SEQUENCES
    assert result.volume.array.shape == (4, 155, 240, 240)
    assert result.reference == "t1ce"
    assert not any(e.stage == "optimise" for e in events)
    assert result.volume.source is brats.scans["t1ce"].source
    np.testing.assert_array_equal(result.volume.array[2], brats.scans["t2"].array)

    two_mm, _ = _drain(
        stack_sequences({"flair": brats.scans["flair"]}, already_registered=True, spacing_mm=2)
    )
    assert two_mm.reference == "flair" and two_mm.volume.channels == ("flair",)
    assert two_mm.volume.spatial_shape == (78, 120, 120)
    np.testing.assert_allclose(two_mm.volume.spacing, 2.0)


def test_reference_grid_covers_the_same_extent(tcga):
    scan = tcga.scans["flair"]  # oblique, 0.9 x 0.9 x 5.5 mm
    grid = reference_grid(scan, (1, 1, 1))
    assert grid.spatial_shape == (143, 230, 187)
    np.testing.assert_allclose(grid.spacing, 1.0)
    np.testing.assert_allclose(grid.direction, scan.direction, atol=1e-9)

    def centre(volume):
        return (
            volume.affine[:3, :3] @ ((np.array(volume.spatial_shape[::-1]) - 1) / 2)
            + (volume.affine[:3, 3])
        )

    np.testing.assert_allclose(centre(grid), centre(scan), atol=1e-6)


def test_resample_labels_nearest_keeps_values(brats):
    labels = brats.labels
    grid = reference_grid(labels, 2.0)
    moved = resample_to(labels, grid)  # "auto": nearest for label maps
    assert moved.array.dtype == labels.array.dtype
    assert set(np.unique(moved.array)) <= {0, 1, 2, 4}
    ratio = (moved.array > 0).sum() * 8 / (labels.array > 0).sum()
    assert 0.9 < ratio < 1.1


# --------------------------------------------------------------------------- bad input
def _small(array, name="t2", affine=None):
    return Volume(array=array, affine=np.eye(4) if affine is None else affine, name=name)


def test_no_overlap_is_an_error(tcga):
    moving = tcga.scans["t2"]
    far = moving.affine.copy()
    far[:3, 3] += (0, 0, 2000)
    with pytest.raises(TumorSegError, match="does not overlap"):
        register(tcga.scans["t1ce"], moving.with_array(moving.array, affine=far))


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((20, 32, 32), np.int16), "empty .all voxels are 0"),
        (np.full((20, 32, 32), 7.0, np.float32), "empty .all voxels are 7"),
        (np.ones((1, 64, 64), np.float32), "2D image"),
        (np.ones((3, 4, 64, 64), np.float32), "one 3D scan"),
    ],
)
def test_bad_volumes_are_errors(tcga, array, match):
    with pytest.raises(TumorSegError, match=match):
        register(tcga.scans["t1ce"], _small(array))
    with pytest.raises(TumorSegError, match=match):
        _drain(stack_sequences({"t1ce": tcga.scans["t1ce"], "t2": _small(array)}))


def test_error_names_the_file(tcga):
    zeros = tcga.scans["t2"].with_array(np.zeros_like(tcga.scans["t2"].array))
    with pytest.raises(TumorSegError) as info:
        register(tcga.scans["t1ce"], zeros)
    assert "TCGA-FG-6692_t2_raw.nii.gz" in str(info.value)


def test_bad_arguments_are_errors(tcga):
    with pytest.raises(TumorSegError, match="unknown transform"):
        register(tcga.scans["t1ce"], tcga.scans["t2"], transform="bspline")
    with pytest.raises(TumorSegError, match="unknown sequence"):
        _drain(stack_sequences({"dwi": tcga.scans["t2"]}))
    with pytest.raises(TumorSegError, match="reference sequence 't1'"):
        _drain(stack_sequences({"t2": tcga.scans["t2"]}, reference="t1"))


def test_very_different_fields_of_view_are_flagged(tcga):
    fixed = tcga.scans["t1ce"]
    affine = fixed.affine.copy()
    affine[:3, 3] = fixed.affine[:3, :3] @ np.array([0, 0, 10]) + fixed.affine[:3, 3]
    slab = Volume(np.ascontiguousarray(fixed.array[10:13]), affine, name="t1")  # 3 of 26 slices
    result = register(fixed, slab, threads=2)
    assert "fields of view" in result.warning and not result.ok


# --------------------------------------------------------------------------- cancel
def _workers():
    return [t for t in threading.enumerate() if t.name.startswith("tumorseg-register")]


def test_closing_stops_the_registration_promptly(tcga):
    scans = {k: tcga.scans[k] for k in ("t1ce", "t2", "flair")}
    for generator in (
        register_to_reference(scans["t1ce"], scans["t2"]),
        stack_sequences(scans),
    ):
        seen = 0
        for event in generator:
            assert isinstance(event, RegistrationProgress)
            seen += event.stage == "optimise"
            if seen == 3:
                break
        assert _workers(), "the optimiser should be running in its worker thread"
        start = time.perf_counter()
        generator.close()  # no exception, no hang
        assert time.perf_counter() - start < 5
        assert not _workers()
