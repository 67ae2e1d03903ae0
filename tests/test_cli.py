"""The `tumorseg` command: exit status and messages (contract 2.3)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from napari_tumorseg.cli import main
from napari_tumorseg.core.bundled import DEFAULT_MODEL
from napari_tumorseg.core.devices import select_device
from napari_tumorseg.core.errors import TumorSegError

from .conftest import BRATS, BRATS2023, TCGA_RAW


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "napari_tumorseg.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_exit_2(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_headless_demo_writes_outputs_without_a_display(tmp_path, monkeypatch):
    """The README's main command, with the default model."""
    monkeypatch.delenv("DISPLAY", raising=False)
    out = tmp_path / "out"
    result = _run("demo", "--headless", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "Brats18_TCIA01_378_1_report.json").read_text())
    assert set(report["metrics"]) == {"WT", "TC", "ET"}
    assert report["metrics"]["TC"]["dice"] > 0.8  # a real model, not a stub
    assert report["expert_volumes_ml"]["WT"] == pytest.approx(125.37, abs=0.01)
    assert report["model"] == DEFAULT_MODEL
    assert report["thresholds"] == "WT 0.5 / TC 0.7 / ET 0.5"  # the 2D card's
    seg = nib.load(str(out / "Brats18_TCIA01_378_1_seg.nii.gz"))
    t1 = nib.load(str(BRATS / "Brats18_TCIA01_378_1_t1.nii.gz"))
    assert seg.shape == t1.shape
    np.testing.assert_array_equal(seg.affine, t1.affine)
    # The raw exam is registered to its post-contrast T1 and segmented in its geometry.
    raw_seg = nib.load(str(out / "TCGA-FG-6692_seg.nii.gz"))
    t1c = nib.load(str(TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"))
    assert raw_seg.shape == t1c.shape
    np.testing.assert_array_equal(raw_seg.affine, t1c.affine)
    # It has its skull: masked to the brain first (HD-BET, installed with the dev extra).
    raw_report = json.loads((out / "TCGA-FG-6692_report.json").read_text())
    from napari_tumorseg.core.brain import available

    if available():
        assert raw_report["brain_extracted"] and 900 < raw_report["brain_ml"] < 2000
        assert "not skull-stripped" not in raw_report["warnings"]


def test_segment_case_folder_writes_in_the_scan_geometry(tmp_path, tiny_model):
    out, prob = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    result = _run(
        *("segment", BRATS, "--out", out, "--prob", prob, "--model", tiny_model),
        *("--overlap", "0.25", "--precision", "float32"),
    )
    assert result.returncode == 0, result.stderr
    # The report names the device that "auto" picked (CUDA on a GPU machine) and the precision.
    assert f"on {select_device('auto').type} (float32)" in result.stderr
    t1 = nib.load(str(BRATS / "Brats18_TCIA01_378_1_t1.nii.gz"))
    seg, p = nib.load(str(out)), nib.load(str(prob))
    assert seg.shape == t1.shape and p.shape == (*t1.shape, 3)
    np.testing.assert_array_equal(seg.affine, t1.affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 4}


def test_segment_with_missing_sequences_says_so(tmp_path, tiny_model):
    out = tmp_path / "seg.nii.gz"
    result = _run(
        "segment",
        "--flair",
        BRATS / "Brats18_TCIA01_378_1_flair.nii.gz",
        "--t2",
        BRATS / "Brats18_TCIA01_378_1_t2.nii.gz",
        "--out",
        out,
        "--model",
        tiny_model,
    )
    assert result.returncode == 0, result.stderr
    assert "missing: t1, t1ce" in result.stderr
    flair = nib.load(str(BRATS / "Brats18_TCIA01_378_1_flair.nii.gz"))
    np.testing.assert_array_equal(nib.load(str(out)).affine, flair.affine)


def test_segment_bad_inputs_exit_2(tmp_path, tiny_model):
    text = tmp_path / "notes_t1.nii.gz"
    text.write_text("hello")
    _assert_exit_2(_run("segment", text, "--out", tmp_path / "s.nii.gz"), str(text), "NIfTI")
    odd = tmp_path / "scan.nii.gz"
    shutil.copy(BRATS / "Brats18_TCIA01_378_1_t1.nii.gz", odd)
    _assert_exit_2(
        _run("segment", odd, "--out", tmp_path / "s.nii.gz"), str(odd), "unknown sequence name"
    )
    cut = tmp_path / "cut_flair.nii.gz"
    data = (BRATS / "Brats18_TCIA01_378_1_flair.nii.gz").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    _assert_exit_2(_run("segment", cut, "--out", tmp_path / "s.nii.gz"), str(cut), "truncated")
    _assert_exit_2(
        _run("segment", TCGA_RAW, "--out", tmp_path / "s.nii.gz", "--model", tiny_model),
        "register",
    )
    _assert_exit_2(
        _run("segment", BRATS, "--out", tmp_path / "s.nii.gz", "--model", "nonexistent"),
        "no model named 'nonexistent'",
    )
    assert not (tmp_path / "s.nii.gz").exists()


def test_segment_checks_its_outputs_before_any_work(tmp_path, tiny_model):
    """Minutes of registration and inference are not spent before a bad output is refused."""
    out = tmp_path / "s.nii.gz"
    _assert_exit_2(_run("segment", BRATS, "--out", out, "--overlap", "1"), "overlap")
    _assert_exit_2(
        _run("segment", BRATS, "--out", out, "--prob", tmp_path / "p.nrrd"), "p.nrrd", ".nii"
    )
    _assert_exit_2(_run("segment", BRATS, "--out", out, "--prob", out), "same file")
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    _assert_exit_2(_run("segment", BRATS, "--out", folder), str(folder), "is a folder")
    _assert_exit_2(
        _run("segment", BRATS, "--out", out, "--prob", out / "p.nii.gz"),
        "p.nii.gz",
        "another output",
    )
    case = tmp_path / "case"
    shutil.copytree(BRATS, case)
    seg = next(case.glob("*_seg.nii.gz"))
    before = seg.read_bytes()
    _assert_exit_2(_run("segment", case, "--out", seg, "--model", tiny_model), str(seg), "input")
    assert seg.read_bytes() == before and not out.exists()


def _case(folder: Path, name: str) -> Path:
    """A case folder ``folder/name`` holding the sample's four scans (links: no copy)."""
    case = folder / name
    case.mkdir(parents=True)
    for seq in ("t1", "t1ce", "t2", "flair"):
        source = BRATS / f"Brats18_TCIA01_378_1_{seq}.nii.gz"
        (case / f"{name}_{seq}.nii.gz").symlink_to(source)
    return case


def test_segment_out_dir_runs_a_batch_past_a_bad_case(tmp_path, tiny_model, capsys, monkeypatch):
    import napari_tumorseg.batch as batch

    loads = []
    load_model = batch.load_model
    monkeypatch.setattr(batch, "load_model", lambda name: loads.append(name) or load_model(name))
    exams = tmp_path / "exams"
    a = _case(exams, "a")
    broken = exams / "broken"
    broken.mkdir()
    (broken / "broken_t1.nii.gz").write_bytes(b"not a NIfTI file")
    # A linked case folder is named as given, not after the folder it points to.
    (exams / "patient01").symlink_to(_case(tmp_path / "raw", "scan_2019_xyz"))
    out = exams / "seg"  # beside the cases: `exams/*` holds it too
    common = ["--out-dir", str(out), "--model", tiny_model, "--overlap", "0.25"]
    cases = [str(a), str(broken), str(exams / "patient01"), str(a)]  # a given twice
    assert main(["segment", *cases, *common]) == 2
    captured = capsys.readouterr()
    # The bad case is named with its problem; the cases after it were still segmented.
    assert "[2/3]" in captured.err and "broken_t1.nii.gz" in captured.err
    assert "2 segmented; 1 failed: broken" in captured.err
    assert loads == [tiny_model]  # one model load for the whole batch
    maps = [out / "a_seg.nii.gz", out / "patient01_seg.nii.gz"]
    reports = [out / "a_report.json", out / "patient01_report.json"]
    cohort = [out / "cohort.csv", out / "cohort.json"]
    assert sorted(out.iterdir()) == sorted([*maps, *reports, *cohort])
    assert all(f"wrote {path}" in captured.out for path in maps)
    t1 = nib.load(str(BRATS / "Brats18_TCIA01_378_1_t1.nii.gz"))
    for path in maps:
        seg = nib.load(str(path))
        assert seg.shape == t1.shape
        np.testing.assert_array_equal(seg.affine, t1.affine)

    # Resumed with probability maps asked for: the label maps there (perhaps edited since)
    # are never replaced, only the missing probability maps written; the output folder among
    # the cases is left out.
    before = {path: path.read_bytes() for path in maps}
    everything = sorted(str(p) for p in exams.iterdir())
    probs = tmp_path / "prob"
    argv = ["segment", *everything, *common, "--prob-dir", str(probs), "--skip-existing"]
    assert main(argv) == 2  # broken is still broken
    err = capsys.readouterr().err
    assert "the output folder, not a case: left out" in err
    assert "2 segmented; 1 failed: broken" in err
    assert {path: path.read_bytes() for path in maps} == before
    for name in ("a", "patient01"):
        assert nib.load(str(probs / f"{name}_prob.nii.gz")).shape == (*t1.shape, 3)
    assert main(argv) == 2
    assert "0 segmented; 2 skipped (outputs already there); 1 failed: broken" in (
        capsys.readouterr().err
    )
    # A probability map that is there is not replaced either when its label map is missing.
    (out / "a_seg.nii.gz").unlink()
    prob_a = (probs / "a_prob.nii.gz").read_bytes()
    assert main(argv) == 2
    assert "a_prob.nii.gz is already there and is left as it is" in capsys.readouterr().err
    assert (out / "a_seg.nii.gz").exists() and (probs / "a_prob.nii.gz").read_bytes() == prob_a


def test_a_case_that_fails_unexpectedly_does_not_stop_the_batch(tmp_path, capsys, monkeypatch):
    import napari_tumorseg.batch as batch

    def segment_exam(exam, out, **kwargs):
        if exam.name == "a":
            raise ValueError("autodetected range of [inf, inf] is not finite")
        raise TumorSegError("no common grid", exam.name)

    monkeypatch.setattr(batch, "segment_exam", segment_exam)
    monkeypatch.setattr(batch, "load_model", lambda name: SimpleNamespace(label=name, card={}))
    cases = [str(_case(tmp_path, name)) for name in ("a", "b")]
    assert main(["segment", *cases, "--out-dir", str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err
    assert "error: unexpected ValueError: autodetected range" in err
    assert "0 segmented; 2 failed: a, b" in err and "Traceback" not in err


def test_segment_batch_arguments_are_checked_before_any_work(tmp_path, capsys):
    a = _case(tmp_path / "x", "a")
    out = tmp_path / "seg"
    scan = a / "a_t1.nii.gz"

    def fails(*argv, says):
        assert main(["segment", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err

    fails(a, scan, "--out-dir", out, says="is not a folder: a batch takes case folders")
    fails(a, _case(tmp_path / "y", "a"), "--out-dir", out, says="two case folders are named 'a'")
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    fails(a, "--out-dir", notes, says="is not a folder")
    fails(a, "--out-dir", tmp_path / "seg.nii.gz", says="is a NIfTI file name")
    fails(a, "--out-dir", a, says="no case folder given")  # the only case is the output folder
    prob = tmp_path / "p.nii.gz"
    fails(a, "--out-dir", out, "--prob", prob, says="with --out-dir use --prob-dir")
    fails(a, "--out-dir", out, "--t1", scan, says="use --out")
    fails(a, "--out-dir", out, "--model", "no-such-model", says="no-such-model")
    fails(a, "--out", tmp_path / "s.nii.gz", "--skip-existing", says="goes with --out-dir")
    fails(a, a.parent, "--out", tmp_path / "s.nii.gz", says="for a batch give --out-dir")
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(a), "--out", str(tmp_path / "s.nii.gz"), "--out-dir", str(out)])
    assert exit_info.value.code == 2


def test_explicit_sequences_keep_the_order_given():
    """The first sequence given on the command line is the reference (contract 2.3)."""
    from napari_tumorseg.cli import _exam_from_args, build_parser

    files = {s: BRATS / f"Brats18_TCIA01_378_1_{s}.nii.gz" for s in ("flair", "t1ce")}
    args = build_parser().parse_args(
        ["segment", "--flair", str(files["flair"]), "--t1ce", str(files["t1ce"]), "--out", "s.nii"]
    )
    assert list(_exam_from_args(args).scans) == ["flair", "t1ce"]


def test_register_writes_image_and_itk_transform(tmp_path):
    import SimpleITK as sitk

    fixed = TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"
    moving = TCGA_RAW / "TCGA-FG-6692_flair_raw.nii.gz"
    out, tfm = tmp_path / "flair_on_t1c.nii.gz", tmp_path / "t.tfm"
    result = _run(
        "register", "--fixed", fixed, "--moving", moving, "--out", out, "--transform-out", tfm
    )
    assert result.returncode == 0, result.stderr
    moved, ref = nib.load(str(out)), nib.load(str(fixed))
    assert moved.shape == ref.shape
    np.testing.assert_array_equal(moved.affine, ref.affine)
    # The transform maps fixed-space points into moving space (ITK convention).
    transform = sitk.ReadTransform(str(tfm))
    again = sitk.Resample(
        sitk.ReadImage(str(moving)), sitk.ReadImage(str(fixed)), transform, sitk.sitkLinear, 0.0
    )
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(float)
    theirs = sitk.GetArrayFromImage(again)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99


def test_evaluate_json_and_grid_mismatch(tmp_path):
    seg = BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"
    result = _run("evaluate", "--pred", seg, "--ref", seg, "--json")
    assert result.returncode == 0
    scores = json.loads(result.stdout)["regions"]
    assert scores["WT"] == {"dice": 1.0, "hd95_mm": 0.0}
    # Full precision: a Dice of 0.91234567 must not read 0.9123 (statistics are done on it).
    from napari_tumorseg.core.metrics import evaluate_labels

    labels = np.asanyarray(nib.load(str(seg)).dataobj)
    eroded = labels.copy()
    k = np.nonzero(labels.any(axis=(0, 1)))[0]
    eroded[:, :, k[len(k) // 2]] = 0  # one tumour slice less
    pred = tmp_path / "pred_seg.nii.gz"
    image = nib.load(str(seg))
    nib.save(nib.Nifti1Image(eroded, image.affine, image.header), str(pred))
    result = _run("evaluate", "--pred", pred, "--ref", seg, "--json")
    scores = json.loads(result.stdout)["regions"]
    exact = evaluate_labels(eroded, labels, image.header.get_zooms())  # Dice: any axis order
    assert scores["WT"]["dice"] == pytest.approx(exact["WT"]["dice"], rel=1e-12, abs=0)
    assert scores["WT"]["dice"] != round(scores["WT"]["dice"], 4)
    other = tmp_path / "other_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(other))
    _assert_exit_2(_run("evaluate", "--pred", other, "--ref", seg), str(other), "grid")


def test_models_lists_the_user_folder(capsys):
    assert main(["models"]) == 0
    assert "user models folder" in capsys.readouterr().out


def test_a_broken_user_model_does_not_hide_the_others(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TUMORSEG_USER_DIR", str(tmp_path))
    from napari_tumorseg.core.models import CARD_FILE, bundled_dir, user_models_dir

    broken = user_models_dir() / "mine" / "v1"
    broken.mkdir(parents=True)
    (broken / CARD_FILE).write_text("{not json")
    not_an_object = user_models_dir() / "other" / "v1"
    not_an_object.mkdir(parents=True)
    (not_an_object / CARD_FILE).write_text("null")
    no_weights = user_models_dir() / "third" / "v1"
    no_weights.mkdir(parents=True)
    (no_weights / CARD_FILE).write_text((bundled_dir() / "3d" / CARD_FILE).read_text())
    assert main(["models"]) == 0
    captured = capsys.readouterr()
    assert "3d" in captured.out and "2d" in captured.out
    assert "third" not in captured.out
    assert str(broken / CARD_FILE) in captured.err
    assert f"{not_an_object / CARD_FILE}: model card is not a JSON object" in captured.err
    assert f"{no_weights}: no weights" in captured.err


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


def test_the_headless_commands_load_nothing_of_napari():
    """`tumorseg segment` starts in seconds on 2 cores, imports included (docs/BENCHMARKS.md,
    "Whole process"): the CLI and the pipeline load neither napari, Qt, nor the plugin's napari
    modules (the sample reader is imported by the demo alone)."""
    code = (
        "import sys, napari_tumorseg.cli, napari_tumorseg.pipeline, napari_tumorseg.batch\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5')"
        " or m in ('napari_tumorseg._reader', 'napari_tumorseg._sample_data',"
        " 'napari_tumorseg._layers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_finetune_stores_a_user_model_that_segment_can_use(tmp_path, tiny_model):
    seg = tmp_path / "seg.nii.gz"
    assert _run("segment", BRATS, "--out", seg, "--model", tiny_model).returncode == 0
    # The "corrected" map: expert labels on 3 slices, the model's output elsewhere.
    image = nib.load(str(seg))
    predicted = np.asanyarray(image.dataobj).copy()
    expert = np.asanyarray(nib.load(str(BRATS / "Brats18_TCIA01_378_1_seg.nii.gz")).dataobj)
    corrected = predicted.copy()
    corrected[:, :, [70, 85, 100]] = expert[:, :, [70, 85, 100]]
    edited = (corrected != predicted).astype(np.uint8)
    labels_path, edited_path = tmp_path / "corrected_seg.nii.gz", tmp_path / "edited.nii.gz"
    nib.save(nib.Nifti1Image(corrected, image.affine, image.header), str(labels_path))
    nib.save(nib.Nifti1Image(edited, image.affine, image.header), str(edited_path))
    result = _run(
        "finetune",
        BRATS,
        "--labels",
        labels_path,
        "--edited",
        edited_path,
        "--model",
        tiny_model,
        "--name",
        "mine",
        "--steps",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "saved mine@v1" in result.stdout
    listed = _run("models")
    assert "mine@v1" in listed.stdout and f"parent {tiny_model}" in listed.stdout
    out = tmp_path / "seg2.nii.gz"
    assert _run("segment", BRATS, "--out", out, "--model", "mine").returncode == 0
    # "adapt": an exam head, used on this exam only.
    adapt = _run(
        *("finetune", BRATS, "--labels", labels_path, "--edited", edited_path),
        *("--model", tiny_model, "--name", "here", "--mode", "adapt", "--steps", "2"),
    )
    assert adapt.returncode == 0, adapt.stderr
    assert "an exam head" in adapt.stdout and "saved here@v1" in adapt.stdout
    assert "--seconds and --steps budget --mode keep" in adapt.stderr  # not silently ignored
    assert "adapted to Brats18_TCIA01_378_1" in _run("models").stdout
    same = _run("segment", BRATS, "--out", out, "--model", "here")
    assert "with the exam head fitted on the corrections" in same.stdout + same.stderr
    other = _run("segment", BRATS2023, "--out", tmp_path / "seg3.nii.gz", "--model", "here")
    assert other.returncode == 0
    assert "its exam head is not applied" in other.stdout + other.stderr
    blank = tmp_path / "nothing_edited.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(edited), image.affine, image.header), str(blank))
    _assert_exit_2(
        _run(*("finetune", BRATS, "--labels", labels_path, "--edited", blank, "--name", "x")),
        str(blank),
        "no corrected voxel",
    )
    _assert_exit_2(
        _run(
            "finetune",
            BRATS,
            "--labels",
            TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz",
            "--model",
            tiny_model,
            "--name",
            "x",
        ),
        "TCGA-FG-6692_t1c_raw.nii.gz",
    )


def test_a_second_label_map_in_the_case_folder_does_not_block_segment(tmp_path, tiny_model):
    """Corrections saved beside the scans: `segment` reads no label map, and still never
    writes over one."""
    case = tmp_path / "case"
    shutil.copytree(BRATS, case)
    seg = next(case.glob("*_seg.nii.gz"))
    corrected = case / "Brats18_TCIA01_378_1_corrected_seg.nii.gz"
    shutil.copy(seg, corrected)
    out = tmp_path / "s.nii.gz"
    result = _run("segment", case, "--out", out, "--model", tiny_model)
    assert result.returncode == 0, result.stderr
    assert out.exists()
    _assert_exit_2(_run("segment", case, "--out", corrected, "--model", tiny_model), "input")


def test_input_and_model_mistakes_are_named_before_any_work(tmp_path, monkeypatch):
    _assert_exit_2(
        _run("segment", tmp_path / "brats218", "--out", tmp_path / "s.nii.gz"),
        "brats218",
        "no such file or folder",
    )
    # An unknown model before minutes of registration, not after them.
    result = _run(
        *("segment", TCGA_RAW, "--register", "--model", "nosuch"),
        *("--out", tmp_path / "r.nii.gz"),
    )
    _assert_exit_2(result, "no model named 'nosuch'")
    assert "registered" not in result.stdout + result.stderr
    # A fine-tune whose version could not be saved fails before training, not after it.
    labels = BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"
    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("TUMORSEG_USER_DIR", str(blocker))
    result = _run("finetune", BRATS, "--labels", labels, "--name", "x", "--steps", "2")
    _assert_exit_2(result, "is a file, not a folder")  # one line: no training step
    monkeypatch.setenv("TUMORSEG_USER_DIR", str(tmp_path / "ud"))
    result = _run("finetune", BRATS, "--labels", labels, "--name", "€" * 90, "--steps", "2")
    _assert_exit_2(result, "not a valid model name", "bytes")  # one line: no training step


def test_segment_folders_takes_plain_strings(tmp_path, tiny_model):
    from napari_tumorseg.batch import segment_folders

    outcome = segment_folders([str(BRATS)], str(tmp_path / "out"), model=tiny_model, log=str)
    assert not outcome.failed
    assert [p.name for p in outcome.written] == ["brats2018_seg.nii.gz", "brats2018_report.json"]


def test_views_are_checked_before_any_work(tmp_path):
    """``--views`` names views a 2D model can run over; with a 3D model it is refused."""
    out = tmp_path / "s.nii.gz"
    result = _run("segment", BRATS, "--out", out, "--views", "axial,oblique")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown view(s) oblique: use some of axial, coronal, sagittal" in result.stderr
    _assert_exit_2(
        _run("segment", BRATS, "--out", out, "--model", "3d", "--views", "coronal"),
        "views are for 2D models",
    )
    assert not out.exists()
