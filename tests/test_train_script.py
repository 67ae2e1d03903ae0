"""scripts/train_bundled.py: checked settings on resume, whole checkpoints, clear refusals."""

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import train_bundled  # noqa: E402

SEQUENCES = ("t1", "t1ce", "t2", "flair")


def _case(folder, name, seed, labels=True):
    """A 24^3 head at 2 mm: a bright sphere of tumour in a dimmer brain."""
    rng = np.random.default_rng(seed)
    case = folder / name
    case.mkdir(parents=True)
    z, y, x = np.mgrid[:24, :24, :24]
    brain = (z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 < 10**2
    tumour = (z - 10) ** 2 + (y - 13) ** 2 + (x - 11) ** 2 < 4**2
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    for seq in SEQUENCES:
        scan = np.where(brain, 100 + 10 * rng.standard_normal(brain.shape), 0)
        scan[tumour] += 80
        nib.save(nib.Nifti1Image(scan.astype(np.int16), affine), case / f"{name}_{seq}.nii.gz")
    if labels:
        seg = np.where(tumour, 2, 0).astype(np.uint8)
        seg[(z - 10) ** 2 + (y - 13) ** 2 + (x - 11) ** 2 < 2**2] = 4
        nib.save(nib.Nifti1Image(seg, affine), case / f"{name}_seg.nii.gz")
    return case


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    for i in range(3):
        _case(folder, f"case{i}", i)
    return folder


def _args(tmp_path, data, *extra):
    return [
        "--data", str(data), "--dims", "3", "--out", str(tmp_path / "out"),
        "--minutes", "0.01", "--patch", "16", "--features", "4,8", "--batch", "1",
        "--spacing", "2", "--validation", "case2", "--sample", str(tmp_path / "none"),
        "--cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
        "--threads", "1", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_a_run_resumes_with_its_own_settings_and_the_card_says_so(tmp_path, data, monkeypatch):
    assert train_bundled.main(_args(tmp_path, data)) == 0
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    first_steps = state["step"]
    assert first_steps > 0
    # The state points at whole files, and only those are left.
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["state.json", state["weights"], state["optimizer"]]
    )
    assert {"sampler_rng", "augment_rng"} <= set(state)

    # More time: a change a resumed run may make; the same folder named another way is the same.
    monkeypatch.chdir(tmp_path)
    assert train_bundled.main(_args(tmp_path, Path("data"), "--minutes", "0.02")) == 0
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    training = card["training"]
    assert training["steps"] > first_steps
    assert training["train_exams"] == ["case0", "case1"]
    assert training["validation_exams"] == ["case2"]
    assert len(training["resumed_with"]) == 1
    assert training["config"]["lr"] == 2e-3 and training["config"]["minutes"] == 0.02
    assert "3 expert-labelled exams" in training["data"]
    assert set(card["metrics"]["validation"]["per_exam"]) == {"case2"}


def test_a_resume_with_other_training_settings_is_refused(tmp_path, data, capsys):
    assert train_bundled.main(_args(tmp_path, data)) == 0
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    card = (tmp_path / "out" / "card.json").read_bytes()
    capsys.readouterr()
    args = _args(tmp_path, data, "--lr", "0.5", "--batch", "2")
    assert train_bundled.main(args) == 2
    err = capsys.readouterr().err
    assert "--lr 0.002 -> 0.5" in err and "--batch 1 -> 2" in err and "state.json" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert (tmp_path / "out" / "card.json").read_bytes() == card


def test_batch_norm_is_a_setting_and_older_checkpoints_resume_as_instance_norm(tmp_path, data):
    assert train_bundled.main(_args(tmp_path, data, "--norm", "batch")) == 0
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["architecture"]["norm"] == "batch" and "context_mm" not in card
    assert train_bundled.main(_args(tmp_path, data, "--norm", "instance")) == 2  # another run
    # The context is an inference setting: a finished run takes it and is scored again.
    assert train_bundled.main(_args(tmp_path, data, "--norm", "batch", "--context-mm", "8")) == 0
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["context_mm"] == 8 and card["training"]["config"]["context_mm"] == 8

    # A checkpoint made before the setting was stored was made with instance norm.
    run = tmp_path / "run"
    shutil.rmtree(run)
    assert train_bundled.main(_args(tmp_path, data)) == 0
    state = json.loads((run / "state.json").read_text())
    del state["config"]["norm"]
    (run / "state.json").write_text(json.dumps(state))
    assert train_bundled.main(_args(tmp_path, data, "--minutes", "0.02")) == 0
    assert train_bundled.main(_args(tmp_path, data, "--norm", "batch")) == 2


def test_a_warm_start_from_another_architecture_is_a_clear_refusal(tmp_path, data, capsys):
    from .conftest import make_tiny_model

    parent = make_tiny_model("parent")  # 3D, instance norm, features 4, 8, 16
    args = _args(tmp_path, data, "--features", "4,8,16", "--norm", "batch", "--init", parent)
    assert train_bundled.main(args) == 2
    err = capsys.readouterr().err
    assert "cannot start this run: it has instance norm" in err and "this run batch" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse's own refusal
        train_bundled.main(_args(tmp_path, data, "--context-mm", "-1"))


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("no labels", "case1: no label map to train on"),
        ("other grid", "case1: t2 (case1_t2.nii.gz) (24x24x20 voxels of 2x2x2 mm) does not lie"),
        ("empty", "no case folder to train on"),
        ("only validation", "no case folder to train on besides the validation ones"),
        ("unknown validation", "no validation case folder case9"),
    ],
)
def test_a_bad_data_folder_is_named_in_one_line(tmp_path, problem, expected, capsys):
    data = tmp_path / "data"
    data.mkdir()
    extra = ()
    if problem in ("no labels", "other grid"):
        _case(data, "case0", 0)
        _case(data, "case1", 1, labels=problem != "no labels")
        _case(data, "case2", 2)
        if problem == "other grid":
            path = data / "case1" / "case1_t2.nii.gz"
            image = nib.load(path)
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:20], image.affine), path)
    elif problem == "empty":
        extra = ("--validation", "")
    elif problem == "only validation":
        _case(data, "case2", 2)
    elif problem == "unknown validation":
        _case(data, "case0", 0)
        extra = ("--validation", "case9")
    assert train_bundled.main(_args(tmp_path, data, *extra)) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_missing_files_or_other_exams_is_refused(tmp_path, data, capsys):
    assert train_bundled.main(_args(tmp_path, data)) == 0
    _case(data, "case3", 3)  # one more exam in the folder: another training set
    capsys.readouterr()
    assert train_bundled.main(_args(tmp_path, data)) == 2
    assert "trained on other exams (case0, case1)" in capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    (tmp_path / "run" / state["weights"]).unlink()
    shutil.rmtree(data / "case3")
    assert train_bundled.main(_args(tmp_path, data)) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint's {state['weights']} are missing" in err and "Traceback" not in err


def test_a_steps_budget_makes_exactly_that_many_steps_and_scores_hd95(tmp_path, data):
    args = [a for a in _args(tmp_path, data) if a != "0.01"]
    args.remove("--minutes")
    assert train_bundled.main([*args, "--steps", "3"]) == 0
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["training"]["steps"] == 3
    validation = card["metrics"]["validation"]
    assert set(validation["hd95"]["case2"]) == {"WT", "TC", "ET"}
    assert all(0 <= v <= 373.13 for v in validation["hd95"]["case2"].values())


def test_with_no_validation_exam_every_exam_is_trained_on_and_the_card_says_so(tmp_path, data):
    """--validation "": the model a recipe's cross-validation chose, trained on all the exams;
    its card has no validation figures (none was held out) and says where the estimate is."""
    assert train_bundled.main(_args(tmp_path, data, "--validation", "")) == 0
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["training"]["train_exams"] == ["case0", "case1", "case2"]
    assert card["training"]["validation_exams"] == []
    assert card["metrics"]["validation"] is None and "mean" not in card["metrics"]
    assert "cross-validation" in card["metrics"]["note"]
