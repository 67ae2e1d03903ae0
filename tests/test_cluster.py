"""The batch on Dask (`napari_tumorseg.cluster`) against the single-process batch."""

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_tumorseg.batch import CaseJob, segment_folders
from napari_tumorseg.cli import main
from napari_tumorseg.core.errors import TumorSegError

from .conftest import BRATS

distributed = pytest.importorskip("distributed")

SEQUENCES = ("t1", "t1ce", "t2", "flair")


@pytest.fixture(scope="module")
def exams(tmp_path_factory):
    """Four copies of the sample exam, cropped around the tumour (quick to segment), named
    a-d, and a broken case."""
    root = tmp_path_factory.mktemp("exams")
    crop = np.s_[60:170, 50:190, 40:120]  # (x, y, z) of the NIfTI arrays
    images = {}
    for seq in SEQUENCES:
        image = nib.load(str(BRATS / f"Brats18_TCIA01_378_1_{seq}.nii.gz"))
        images[seq] = image.slicer[crop]
    for name in "abcd":
        case = root / name
        case.mkdir()
        for seq, image in images.items():
            nib.save(image, str(case / f"{name}_{seq}.nii.gz"))
    broken = root / "broken"
    broken.mkdir()
    (broken / "broken_t1.nii.gz").write_bytes(b"not a NIfTI file")
    return root


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*_seg.nii.gz"))
    }


def _rows(folder: Path) -> dict[str, dict]:
    with open(folder / "cohort.csv", newline="", encoding="utf-8") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def test_local_cluster_gives_the_single_process_labels_and_reports_a_bad_exam(
    exams, tmp_path, tiny_model, capsys
):
    cases = [str(exams / n) for n in ("a", "b", "broken", "c", "d")]
    common = ["--model", tiny_model, "--overlap", "0.25"]
    assert main(["segment", *cases, "--out-dir", str(tmp_path / "one"), *common]) == 2
    argv = ["segment", *cases, "--out-dir", str(tmp_path / "dask"), *common]
    assert main([*argv, "--dask", "--workers", "2", "--threads-per-worker", "1"]) == 2
    err = capsys.readouterr().err
    assert "Dask dashboard: http://127.0.0.1:" in err  # the local cluster listens locally
    assert "4 segmented; 1 failed: broken" in err and "Traceback" not in err
    single, on_dask = _labels(tmp_path / "one"), _labels(tmp_path / "dask")
    assert sorted(on_dask) == [f"{n}_seg.nii.gz" for n in "abcd"]
    for name, labels in single.items():
        np.testing.assert_array_equal(on_dask[name], labels)
    # The same cohort report, one row per case; the bad exam's row says why.
    rows = _rows(tmp_path / "dask")
    assert sorted(rows) == ["a", "b", "broken", "c", "d"]
    assert rows["broken"]["status"] == "failed" and "broken_t1.nii.gz" in rows["broken"]["reason"]
    workers = {rows[n]["worker"] for n in "abcd"}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    one = _rows(tmp_path / "one")
    for name in "abcd":
        for column in ("WT_ml", "TC_ml", "ET_ml", "mean_uncertainty_in_tumour"):
            assert rows[name][column] == one[name][column]
    document = json.loads((tmp_path / "dask" / "cohort.json").read_text())
    assert document["counts"] == {"segmented": 4, "skipped": 0, "failed": 1}
    assert document["engine"].startswith("Dask")
    # Resumed on Dask: the outputs there are left as they are, the bad exam is tried again.
    before = {p: p.read_bytes() for p in (tmp_path / "dask").glob("*_seg.nii.gz")}
    assert main([*argv, "--dask", "--workers", "1", "--skip-existing"]) == 2
    assert "0 segmented; 4 skipped (outputs already there); 1 failed: broken" in (
        capsys.readouterr().err
    )
    assert {p: p.read_bytes() for p in before} == before
    assert _rows(tmp_path / "dask")["a"]["WT_ml"] == rows["a"]["WT_ml"]  # from its report


def test_single_process_cohort_report(exams, tmp_path, tiny_model):
    out = tmp_path / "out"
    outcome = segment_folders([BRATS, exams / "broken"], out, model=tiny_model, log=str)
    assert outcome.segmented == [BRATS]
    rows = _rows(out)
    a = rows[BRATS.name]  # the whole sample exam: skull-stripped
    seg = nib.load(str(out / f"{BRATS.name}_seg.nii.gz"))
    labels = np.asarray(seg.dataobj)
    voxel_ml = float(np.prod(seg.header.get_zooms())) / 1000
    # Volumes at full precision, from the label map written.
    assert float(a["WT_ml"]) == pytest.approx(np.count_nonzero(labels) * voxel_ml, rel=1e-12)
    assert float(a["ET_ml"]) == pytest.approx(np.count_nonzero(labels == 4) * voxel_ml, rel=1e-12)
    assert a["model"] == tiny_model and a["model_version"] == "1"
    assert a["skull_stripped"] == "True" and a["registered"] == "False"
    assert 0 <= float(a["mean_uncertainty_in_tumour"]) <= 1 and float(a["seconds"]) > 0
    assert rows["broken"]["status"] == "failed"
    # The case's own report is the same row; a resumed batch takes its figures from there.
    report = json.loads((out / f"{BRATS.name}_report.json").read_text())
    assert report["WT_ml"] == float(a["WT_ml"])
    segment_folders([BRATS], out, model=tiny_model, skip_existing=True, log=str)
    again = _rows(out)[BRATS.name]
    assert again["status"] == "skipped" and again["WT_ml"] == a["WT_ml"]


@pytest.fixture
def cluster(tiny_model):
    """A LocalCluster of 2 single-thread workers, started apart from the batch (as one started
    by hand would be), so that a test can act on its workers while the batch runs. Started
    after the test's user-model folder is set: its workers take the environment they start in."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as local:
        yield local


def test_a_worker_killed_mid_exam_loses_nothing(exams, tmp_path, tiny_model, cluster):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a_seg.nii.gz.k1ll3d.nii.gz"  # what a worker killed mid-write leaves
    stale.write_bytes(b"half")
    from napari_tumorseg.cluster import segment_folders_on_dask

    killed = []

    with distributed.Client(cluster.scheduler_address) as client:
        pids = client.run(os.getpid)

    def kill_a_busy_worker():  # as the kernel's OOM killer would: SIGKILL, no clean-up
        with distributed.Client(cluster.scheduler_address) as client:
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys and w in pids]
                if busy:  # a worker with an exam: killed within it
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])
                time.sleep(0.1)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    outcome = segment_folders_on_dask(
        [exams / n for n in "abcd"],
        out,
        model=tiny_model,
        address=cluster.scheduler_address,
        overlap=0.25,
        log=str,
        progress=False,
    )
    killer.join()
    assert killed, "no worker was killed: the test tested nothing"
    assert not outcome.failed and len(outcome.segmented) == 4
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{n}_seg.nii.gz" for n in "abcd"), *(f"{n}_report.json" for n in "abcd")]
        + ["cohort.csv", "cohort.json"]
    )
    for labels in _labels(out).values():
        assert labels.shape == (110, 140, 80)
    # The workers keep the model loaded for their next exams (one started in place of the
    # killed one holds it once it has had an exam).
    with distributed.Client(cluster.scheduler_address) as client:
        held = client.run(_models_held)
    assert [tiny_model] in held.values()
    assert all(names in ([], [tiny_model]) for names in held.values())


def _models_held() -> list[str]:
    from napari_tumorseg.cluster import _MODELS

    return list(_MODELS)


def test_a_worker_that_cannot_see_a_case_is_a_clear_error(tmp_path, tiny_model, cluster):
    from napari_tumorseg.cluster import check_workers

    missing = tmp_path / "elsewhere" / "case"
    job = CaseJob(missing, "case", tmp_path / "case_seg.nii.gz", None, tmp_path / "r.json")
    with distributed.Client(cluster.scheduler_address) as client:
        with pytest.raises(TumorSegError, match="cannot see the case folder") as info:
            check_workers(client, [job], [tmp_path], tiny_model, "cpu")
    assert "tcp://127.0.0.1:" in str(info.value) and "file system" in str(info.value)


def test_dask_missing_says_how_to_install(exams, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["segment", str(exams / "a"), "--out-dir", str(tmp_path), "--dask"]) == 2
    assert 'pip install "napari-tumorseg[dask]"' in capsys.readouterr().err


def test_torch_threads_share_each_hosts_cores_among_the_exams_it_runs_at_once():
    from napari_tumorseg.cluster import torch_threads

    answers = {
        "tcp://a:1": {"host": "a", "cores": 8},
        "tcp://a:2": {"host": "a", "cores": 8},
        "tcp://b:1": {"host": "b", "cores": 4},
    }
    nthreads = {"tcp://a:1": 1, "tcp://a:2": 1, "tcp://b:1": 4}  # b runs 4 exams at once
    assert torch_threads(answers, nthreads) == {"a": 4, "b": 1}
    assert torch_threads(answers, nthreads, fixed=2) == {"a": 2, "b": 2}


def test_a_case_folder_taken_as_the_scheduler_address_is_named(exams, tmp_path, capsys):
    argv = ["segment", "--out-dir", str(tmp_path), "--dask", str(exams / "a"), str(exams / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "took" in err and "as its scheduler's address" in err and "Traceback" not in err
