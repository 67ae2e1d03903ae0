"""Reading, orientation, writing and input errors of NIfTI files."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform

from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.io import (
    OutputFiles,
    check_output_path,
    classify_path,
    read_exam,
    read_scan,
    read_volume,
    to_brats_labels,
    write_labels,
    write_volume,
)

from ..conftest import BRATS, BRATS2023, TCGA_RAW

SEG = BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"
T1CE = BRATS / "Brats18_TCIA01_378_1_t1ce.nii.gz"


def _reoriented_copy(src, dst, axcodes):
    image = nib.load(str(src))
    xform = ornt_transform(nib.io_orientation(image.affine), axcodes2ornt(axcodes))
    nib.save(image.as_reoriented(xform), str(dst))
    return dst


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Brats18_TCIA01_378_1_t1ce.nii.gz", "t1ce"),
        ("case-t1n.nii.gz", "t1"),
        ("case_T1W.nii", "t1"),
        ("BraTS-GLI-00001-000-t2f.nii.gz", "flair"),
        ("x_t1gd.nii.gz", "t1ce"),
        ("x_t2w.nii.gz", "t2"),
        ("TCGA-FG-6692_t1c_raw.nii.gz", "t1ce"),
        ("case_seg.nii.gz", "labels"),
        ("scan.nii.gz", None),
    ],
)
def test_sequence_names(name, expected):
    assert classify_path(name) == expected


def test_brats_sample_is_lps_zyx():
    volume = read_volume(T1CE)
    source = nib.load(str(T1CE)).get_fdata()
    assert volume.name == "t1ce"
    assert volume.array.shape == (155, 240, 240)
    # BraTS files are stored LPS (i -> left, j -> posterior, k -> superior): only a transpose.
    np.testing.assert_array_equal(volume.array, source.transpose(2, 1, 0))
    np.testing.assert_allclose(volume.spacing, [1, 1, 1])
    # voxel (x, y, z) -> LPS mm; the file's RAS affine negated in x and y.
    np.testing.assert_allclose(volume.affine[:3, :3], np.eye(3))


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("A", "S", "L"), ("P", "I", "R")])
def test_any_orientation_reads_as_the_lps_original(tmp_path, axcodes):
    original = read_volume(T1CE)
    moved = read_volume(_reoriented_copy(T1CE, tmp_path / "case_t1ce.nii.gz", axcodes))
    np.testing.assert_array_equal(moved.array, original.array)
    np.testing.assert_allclose(moved.affine, original.affine, atol=1e-4)


def test_labels_round_trip_is_exact(tmp_path):
    labels = read_volume(SEG)
    out = write_labels(tmp_path / "out_seg.nii.gz", labels.array, labels)
    src, dst = nib.load(str(SEG)), nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(dst.dataobj), np.asanyarray(src.dataobj))
    np.testing.assert_array_equal(dst.affine, src.affine)
    assert dst.get_data_dtype() == np.uint8


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S")])
def test_ras_labels_round_trip(tmp_path, axcodes):
    ras = _reoriented_copy(SEG, tmp_path / f"{''.join(axcodes)}_seg.nii.gz", axcodes)
    labels = read_volume(ras)
    np.testing.assert_array_equal(labels.array, read_volume(SEG).array)
    out = write_labels(tmp_path / "back.nii.gz", labels.array, labels)
    src, dst = nib.load(str(ras)), nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(dst.dataobj), np.asanyarray(src.dataobj))
    np.testing.assert_array_equal(dst.affine, src.affine)


@pytest.mark.parametrize("sequence", ["t1", "t1c", "t2", "flair"])
def test_oblique_raw_scan_round_trip(tmp_path, sequence):
    path = TCGA_RAW / f"TCGA-FG-6692_{sequence}_raw.nii.gz"
    volume = read_volume(path)
    src = nib.load(str(path))
    # Z is the slice axis (5.5 mm) after reorientation to LPS.
    assert volume.spacing[0] == pytest.approx(5.5, abs=0.05)
    # The LPS affine maps every voxel where the file's RAS affine does.
    zyx = np.array([[3, 10, 20], [20, 150, 100]])
    for z, y, x in zyx:
        world_lps = volume.affine @ [x, y, z, 1]
        # find the same voxel in the file: it holds the same value
        ijk = np.linalg.solve(src.affine, np.diag([-1, -1, 1, 1]) @ world_lps)[:3]
        ijk = np.round(ijk).astype(int)
        assert np.asanyarray(src.dataobj)[tuple(ijk)] == volume.array[z, y, x]
    out = write_volume(tmp_path / "copy_t1.nii.gz", volume.array, volume)
    dst = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(dst.dataobj), np.asanyarray(src.dataobj))
    np.testing.assert_array_equal(dst.affine, src.affine)
    again = read_volume(out)
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_array_equal(again.affine, volume.affine)


def test_written_maps_are_not_shown_with_the_scans_window_nor_as_time_series(tmp_path):
    """A probability map took the FLAIR's time unit and repetition time (viewers showed WT,
    TC and ET as time points 9 s apart), and a label map the scan's display window."""
    path = TCGA_RAW / "TCGA-FG-6692_flair_raw.nii.gz"
    image = nib.load(str(path))
    image.header["cal_max"] = 1500.0
    windowed = tmp_path / "windowed_flair.nii.gz"
    nib.save(image, str(windowed))
    scan = read_volume(windowed)
    assert scan.source.header["pixdim"][4] == pytest.approx(9.0)
    labels = nib.load(
        str(write_labels(tmp_path / "m.nii.gz", np.zeros(scan.spatial_shape, np.uint8), scan))
    )
    assert labels.header["cal_max"] == 0 and labels.header["cal_min"] == 0
    prob = np.zeros((3, *scan.spatial_shape), np.float32)
    written = nib.load(str(write_volume(tmp_path / "p.nii.gz", prob, scan)))
    assert written.shape == (*image.shape, 3)
    assert written.header.get_xyzt_units() == ("mm", "unknown")
    assert written.header["pixdim"][4] == 1.0 and written.header["cal_max"] == 0
    np.testing.assert_array_equal(written.affine, image.affine)


def test_brats2023_labels_3_mean_enhancing():
    labels = to_brats_labels(np.array([[[0, 1, 2, 3]]]))
    np.testing.assert_array_equal(labels, [[[0, 1, 2, 4]]])


def test_exam_folder_and_reference():
    exam = read_exam(BRATS)
    assert list(exam.scans) == ["t1", "t1ce", "t2", "flair"]
    assert exam.labels is not None and set(np.unique(exam.labels.array)) == {0, 1, 2, 4}
    assert exam.name == "Brats18_TCIA01_378_1"
    exam23 = read_exam(BRATS2023)
    assert list(exam23.scans) == ["t1", "t1ce", "t2", "flair"] and exam23.labels is None


# ----------------------------------------------------------------------------- errors
def _assert_error(path, fragment, **kwargs):
    with pytest.raises(TumorSegError) as info:
        read_volume(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and fragment in message
    assert "\n" not in message
    return message


def test_not_a_nifti(tmp_path):
    path = tmp_path / "notes_t1.nii.gz"
    path.write_text("this is a text file, not an image")
    _assert_error(path, "NIfTI")
    plain = tmp_path / "notes_t2.nii"
    plain.write_bytes(b"\x00" * 400)
    _assert_error(plain, "NIfTI")


def test_truncated_gz(tmp_path):
    path = tmp_path / "cut_t1.nii.gz"
    data = T1CE.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_error(path, "truncated")


def test_corrupt_gz_stream_is_refused_not_read_as_garbage(tmp_path):
    """nibabel stops reading at the last voxel, before the gzip checksum: one flipped byte
    near the end of the stream gave a scan with wrong voxels and no error."""
    data = bytearray(T1CE.read_bytes())
    data[int(0.95 * len(data))] ^= 0xFF
    path = tmp_path / "flipped_t1.nii.gz"
    path.write_bytes(bytes(data))
    _assert_error(path, "corrupt")
    data = bytearray(T1CE.read_bytes())
    data[-6] ^= 0xFF  # the CRC itself
    path.write_bytes(bytes(data))
    _assert_error(path, "corrupt")


def test_gz_files_nibabel_reads_are_still_read(tmp_path):
    """Several gzip members, and bytes after the last one (padding), are valid files."""
    original = read_volume(T1CE).array
    raw = gzip.decompress(T1CE.read_bytes())
    half = len(raw) // 2
    members = tmp_path / "members_t1ce.nii.gz"
    members.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    padded = tmp_path / "padded_t1ce.nii.gz"
    padded.write_bytes(T1CE.read_bytes() + b"\0" * 64 + b"trailing")
    for path in (members, padded):
        np.testing.assert_array_equal(read_volume(path).array, original)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-inflater", "zlib"])
def test_gz_errors_and_reads_are_the_same_with_or_without_the_fast_inflater(
    tmp_path, monkeypatch, fast
):
    """zlib-ng or python-isal (the optional ``fast`` extra) only decompresses: the voxels,
    and every message for a corrupt, cut or padded file, are zlib's."""
    from napari_tumorseg.core import io as core_io

    if fast and core_io._FAST_ZLIB is None:
        pytest.skip("no fast inflater installed (pip install napari-tumorseg[fast])")
    if not fast:
        monkeypatch.setattr(core_io, "_FAST_ZLIB", None)
    data = T1CE.read_bytes()
    cut, flipped, crc = (tmp_path / f"{name}_t1.nii.gz" for name in ("cut", "flipped", "crc"))
    cut.write_bytes(data[: len(data) // 2])
    for path, at in ((flipped, int(0.95 * len(data))), (crc, len(data) - 6)):
        changed = bytearray(data)
        changed[at] ^= 0xFF
        path.write_bytes(bytes(changed))
    messages = [_assert_error(path, "corrupt") for path in (cut, flipped, crc)]
    monkeypatch.setattr(core_io, "_FAST_ZLIB", None)
    assert messages == [_assert_error(path, "corrupt") for path in (cut, flipped, crc)]
    assert "incorrect data check" in messages[2]  # zlib's own words for a wrong CRC


def test_exam_read_in_parallel_fails_as_read_in_order(tmp_path, monkeypatch):
    """The scans and label map of an exam are read side by side; the error is the one of the
    first file in reading order (scans t1, t1ce, t2, flair, then the label map)."""
    from napari_tumorseg.core import io as core_io

    for path in BRATS.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / SEG.name).write_bytes(b"not a label map")
    t2 = tmp_path / "Brats18_TCIA01_378_1_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[:5000])
    for workers in (4, 1):
        monkeypatch.setattr(core_io.os, "cpu_count", lambda workers=workers: workers)
        with pytest.raises(TumorSegError, match="truncated") as info:
            read_exam(tmp_path)
        assert str(t2) in str(info.value)
    shutil.copy(BRATS / t2.name, t2)
    with pytest.raises(TumorSegError, match="NIfTI") as info:
        read_exam(tmp_path)
    assert str(tmp_path / SEG.name) in str(info.value)
    calls = [lambda: 1, lambda: 1 / 0, lambda: [][0]]
    with pytest.raises(ZeroDivisionError):
        core_io.read_in_parallel(calls)
    assert core_io.read_in_parallel([lambda: 1, lambda: 2]) == [1, 2]


@pytest.mark.parametrize(
    "values",
    [[0], [4, 0, 2], [1, 1], [3, 4, 0], [-1, 2], [0, 7], [2**40, 0], [], [0.0, 2.0], [True]],
)
def test_distinct_values_are_those_of_unique(values):
    from napari_tumorseg.core.io import _distinct_values

    for dtype in (None, np.uint8, np.int16):
        try:
            array = np.array(values, dtype=dtype)
        except OverflowError:
            continue
        if dtype is not None and not np.array_equal(array, np.array(values)):
            continue  # not representable in this dtype
        found = _distinct_values(array)
        assert found == set(np.unique(array).tolist())
        assert {type(v) for v in found} == {type(v) for v in np.unique(array).tolist()}


def test_header_announcing_more_voxels_than_the_file_holds(tmp_path):
    """A corrupt header's dimensions (30000^3) are refused before any memory is allocated."""
    for name in ("huge_t1.nii", "huge_t2.nii.gz"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4)), str(path))
        image = nib.load(str(path))
        header = image.header.copy()
        header.set_data_shape((30000, 30000, 30000))
        header["vox_offset"] = 352
        raw = header.binaryblock + b"\0" * 4 + b"\1" * 1024  # no extension, 1 KiB of voxels
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        assert "30000x30000x30000" in _assert_error(path, "truncated or its header is corrupt")


def test_trailing_unit_dimensions_are_dropped(tmp_path):
    path = tmp_path / "five_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 9, 10, 1, 1), np.int16), np.eye(4)), str(path))
    assert read_volume(path).spatial_shape == (10, 9, 8)


def test_a_missing_case_folder_is_named_as_missing(tmp_path):
    with pytest.raises(TumorSegError, match="no such file or folder"):
        read_exam(tmp_path / "brats218")
    with pytest.raises(TumorSegError, match="no such file or folder"):
        read_exam([tmp_path / "case_t1.nii.gz"])


def test_label_maps_that_are_not_needed_are_not_read(tmp_path):
    """Two label maps in a case folder (the expert's and a corrected one) are refused only
    where a label map is read; with ``read_labels=False`` they are listed as the exam's files."""
    case = tmp_path / "case"
    shutil.copytree(BRATS, case)
    seg = next(case.glob("*_seg.nii.gz"))
    shutil.copy(seg, case / "case_corrected_seg.nii.gz")
    with pytest.raises(TumorSegError, match="two label maps"):
        read_exam(case)
    with pytest.raises(TumorSegError, match="two label maps given"):
        read_exam(sorted(case.glob("*.nii.gz")))  # the files themselves: the same choice
    exam = read_exam(case, read_labels=False)
    assert exam.labels is None and len(exam.scans) == 4
    assert sorted(p.name for p in exam.unread_labels) == sorted(
        ["case_corrected_seg.nii.gz", seg.name]
    )


def test_empty_file(tmp_path):
    path = tmp_path / "empty_flair.nii.gz"
    path.touch()
    _assert_error(path, "empty")


def test_2d_image(tmp_path):
    path = tmp_path / "slice_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64), np.int16), np.eye(4)), str(path))
    _assert_error(path, "2D image")
    flat = tmp_path / "flat_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 1), np.int16), np.eye(4)), str(flat))
    _assert_error(flat, "2D image")


def test_4d_image_is_rejected(tmp_path):
    path = tmp_path / "multi_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 4), np.float32), np.eye(4)), str(path))
    _assert_error(path, "4D")


def test_nan_voxels(tmp_path):
    data = np.ones((8, 8, 8), np.float32)
    data[2, 3, 4] = np.nan
    data[1, 1, 1] = np.inf
    path = tmp_path / "bad_t2.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    _assert_error(path, "NaN or infinite")


def test_non_integer_labels(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[2, 2, 2] = 1.5
    path = tmp_path / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    _assert_error(path, "non-integer")


def test_unknown_label_values(tmp_path):
    data = np.zeros((8, 8, 8), np.uint8)
    data[2, 2, 2] = 7
    path = tmp_path / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    _assert_error(path, "values 7 outside")


def test_unknown_sequence_name(tmp_path):
    path = tmp_path / "mystery_scan.nii.gz"
    shutil.copy(T1CE, path)
    with pytest.raises(TumorSegError) as info:
        read_exam([path])
    assert str(path) in str(info.value) and "unknown sequence name" in str(info.value)


def test_labels_on_no_scan_grid(tmp_path):
    path = tmp_path / "other_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), np.eye(4)), str(path))
    with pytest.raises(TumorSegError) as info:
        read_exam([T1CE], labels=path)
    assert str(path) in str(info.value) and "matches none of the exam" in str(info.value)


def test_odd_shapes_and_values_are_named_for_what_they_are(tmp_path):
    five = tmp_path / "five_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10, 1, 3), np.int16), np.eye(4)), str(five))
    _assert_error(five, "is a 5D NIfTI (shape 10x10x10x1x3)")
    thin = tmp_path / "thin_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 2), np.int16), np.eye(4)), str(thin))
    _assert_error(thin, "has only 2 slices along one axis")
    huge = tmp_path / "huge_t1.nii.gz"
    data = np.ones((8, 8, 8), np.float64)
    data[1, 2, 3] = 1e300
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(huge))
    _assert_error(huge, "too large to compute with (up to 1e+300")
    labels = tmp_path / "case_seg.nii.gz"
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 1, 1] = 1e20
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(labels))
    _assert_error(labels, "holds values 1e+20 outside")
    empty = tmp_path / "blank_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(empty))
    with pytest.raises(TumorSegError, match="is empty: every voxel is 0"):
        read_scan(empty)


def test_scans_named_after_two_exams_are_warned_about(tmp_path):
    for name, source in (("caseA_t1.nii.gz", T1CE), ("caseB_flair.nii.gz", T1CE)):
        shutil.copy(source, tmp_path / name)
    exam = read_exam([tmp_path / "caseA_t1.nii.gz", tmp_path / "caseB_flair.nii.gz"])
    assert exam.name == "caseA"
    assert any("named after 2 exams (caseA, caseB)" in w for w in exam.warnings)
    assert not read_exam(BRATS).warnings
    for seq in ("t1", "flair"):  # named by sequence alone: no exam named, nothing to compare
        shutil.copy(T1CE, tmp_path / f"{seq}.nii.gz")
    assert not read_exam([tmp_path / "t1.nii.gz", tmp_path / "flair.nii.gz"]).warnings


def test_an_output_through_a_link_replaces_the_file_it_points_to(tmp_path):
    labels = read_volume(SEG)
    real = tmp_path / "real" / "seg.nii.gz"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "link_seg.nii.gz"
    link.symlink_to(real)
    write_labels(link, labels.array, labels)
    assert link.is_symlink()
    np.testing.assert_array_equal(read_volume(real).array, labels.array)
    assert sorted(p.name for p in real.parent.iterdir()) == ["seg.nii.gz"]


def test_a_long_file_name_is_written(tmp_path):
    labels = read_volume(SEG)
    target = tmp_path / ("x" * 240 + "_seg.nii.gz")  # 251 bytes: the limit is 255
    write_labels(target, labels.array, labels)
    np.testing.assert_array_equal(read_volume(target).array, labels.array)


def test_write_keeps_existing_file_when_it_fails(tmp_path):
    labels = read_volume(SEG)
    target = tmp_path / "keep_seg.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(TumorSegError):
        write_labels(target, labels.array[:10], labels)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep_seg.nii.gz"]


def test_outputs_written_together_replace_their_targets_only_when_all_were_written(tmp_path):
    labels = read_volume(SEG)
    seg, prob = tmp_path / "old_seg.nii.gz", tmp_path / "old_prob.nii.gz"
    seg.write_bytes(b"edited mask")
    prob.write_bytes(b"old map")
    with pytest.raises(TumorSegError, match="does not lie on the grid"):
        with OutputFiles() as outputs:
            write_labels(seg, labels.array, labels, outputs=outputs)
            write_volume(prob, labels.array[:10], labels, outputs=outputs)  # fails: wrong shape
    assert seg.read_bytes() == b"edited mask" and prob.read_bytes() == b"old map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_prob.nii.gz", "old_seg.nii.gz"]
    with OutputFiles() as outputs:
        write_labels(seg, labels.array, labels, outputs=outputs)
        assert seg.read_bytes() == b"edited mask"  # not before the last one is written
        write_volume(prob, labels.array.astype(np.float32), labels, outputs=outputs)
    np.testing.assert_array_equal(read_volume(seg).array, labels.array)
    assert read_volume(prob, kind="scan").array.max() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_prob.nii.gz", "old_seg.nii.gz"]


def test_output_paths_are_checked_before_any_work(tmp_path):
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path, fragment in [
        (folder, "is a folder"),
        (blocker / "seg.nii.gz", "is a file, not a folder"),
        (tmp_path / "seg.nrrd", ".nii"),
    ]:
        with pytest.raises(TumorSegError, match=fragment) as info:
            check_output_path(path)
        assert str(path) in str(info.value)
    assert check_output_path(tmp_path / "new" / "deeper" / "seg.nii.gz").name == "seg.nii.gz"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_label_map_given_as_a_scan_is_refused(tmp_path):
    """A BraTS segmentation saved under a sequence's name would otherwise be segmented (its
    label values read as intensities)."""
    disguised = tmp_path / "case_flair.nii.gz"
    shutil.copy(SEG, disguised)
    with pytest.raises(TumorSegError, match="values 0, 1, 2, 4: a label map") as info:
        read_exam([disguised])
    assert str(disguised) in str(info.value)
    with pytest.raises(TumorSegError, match="no scan given: this file is a label map") as info:
        read_exam([SEG])
    assert str(SEG) in str(info.value)


def test_gzip_helper_matches_truncation_kind(tmp_path):
    # A valid gzip stream whose content is not NIfTI reads as "not a NIfTI".
    path = tmp_path / "zipped_t1.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"hello" * 100)
    _assert_error(path, "NIfTI")


def test_singular_affine_is_a_clear_error(tmp_path):
    image = nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4))
    image.set_sform(np.zeros((4, 4)), code=1)
    image.set_qform(None, code=0)
    path = tmp_path / "broken_t1.nii.gz"
    nib.save(image, str(path))
    _assert_error(path, "voxel-to-world")


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    labels = read_volume(SEG)
    umask = os.umask(0o022)
    try:
        fresh = write_labels(tmp_path / "new_seg.nii.gz", labels.array, labels)
    finally:
        os.umask(umask)
    # mkstemp makes 0600 files; a saved mask must be readable as any file the user saves.
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    shared = tmp_path / "shared_seg.nii.gz"
    shared.write_bytes(b"old")
    shared.chmod(0o664)
    write_labels(shared, labels.array, labels)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664  # replacing a file keeps its mode


def test_scaled_integer_scan_reads_as_float32(tmp_path):
    """scl_slope (scanner exports) must not turn a scan into a float64 copy."""
    image = nib.Nifti1Image(np.arange(512, dtype=np.int16).reshape(8, 8, 8), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled_t2.nii.gz"
    nib.save(image, str(path))
    volume = read_volume(path)
    assert volume.array.dtype == np.float32
    expected = nib.load(str(path)).get_fdata()  # float64, nibabel's scaling
    np.testing.assert_allclose(volume.array.transpose(2, 1, 0)[::-1, ::-1], expected, rtol=1e-6)
