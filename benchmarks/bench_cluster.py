"""The batch on Dask against the single-process batch: the same exams, side by side.

Eight copies of the labelled sample exam are segmented with `tumorseg segment --out-dir`
three ways, each in a fresh process timed from its start (Python, torch and the model load
included): in one process (torch on all cores), on a LocalCluster of 2 workers x 1 thread,
and on a LocalCluster of 1 worker x 2 threads (`--dask`'s default on 2 cores). The labels are
compared with the single process's. Then where the time goes, for an estimate of a cohort of
10,000 exams on N workers: the cluster's start, a task's round trip through the scheduler, the
model load, and one exam's reading, segmentation and writing.

    python benchmarks/bench_cluster.py [--model 3d] [--exams 8]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_description, run_timed, write_section  # noqa: E402

SAMPLE = ROOT / "sample_data" / "brats2018"
SEQUENCES = ("t1", "t1ce", "t2", "flair")


def _exams(root: Path, count: int) -> list[Path]:
    cases = []
    for i in range(count):
        case = root / f"exam{i:02d}"
        case.mkdir(parents=True)
        for seq in SEQUENCES:
            (case / f"exam{i:02d}_{seq}.nii.gz").symlink_to(
                SAMPLE / f"Brats18_TCIA01_378_1_{seq}.nii.gz"
            )
        cases.append(case)
    return cases


def _batch(cases, out: Path, model: str, *extra: str) -> float:
    command = [sys.executable, "-m", "napari_tumorseg.cli", "segment", *map(str, cases)]
    command += ["--out-dir", str(out), "--model", model, *extra]
    return run_timed(command)[0]


def _labels(out: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in out.glob("*_seg.nii.gz")}


def _seconds(out: Path) -> list[float]:
    with open(out / "cohort.csv", newline="") as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def _parts(model_name: str) -> dict[str, float]:
    """One exam's parts in this process (torch on all cores): model load, reading,
    segmentation, writing; a LocalCluster's start and a task's round trip."""
    import torch
    from distributed import Client, LocalCluster

    from napari_tumorseg.core.dicom import read_case
    from napari_tumorseg.core.inference import exam_to_channels, segment
    from napari_tumorseg.core.io import write_labels
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    parts = {}
    started = time.perf_counter()
    model = load_model(model_name)
    parts["model load"] = time.perf_counter() - started
    started = time.perf_counter()
    exam = read_case(SAMPLE, read_labels=False)
    parts["reading one exam (4 x .nii.gz)"] = time.perf_counter() - started
    channels = exam_to_channels(exam)
    started = time.perf_counter()
    result = run_to_end(segment(channels, model))
    parts["segmenting one exam"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        write_labels(Path(folder) / "seg.nii.gz", result.labels.array, exam.reference)
        parts["writing its label map"] = time.perf_counter() - started
    started = time.perf_counter()
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    )
    with cluster, Client(cluster) as client:
        parts[START] = time.perf_counter() - started
        client.submit(int, 0).result()  # the first task warms the scheduler up
        tasks = 200
        started = time.perf_counter()
        for future in client.map(abs, range(tasks), pure=False):
            future.result()
        parts[TRIP] = (time.perf_counter() - started) / tasks
    return parts


START = "LocalCluster start (2 worker processes)"
TRIP = "a task's round trip through the scheduler (200 trivial tasks, one after another)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="3d")
    parser.add_argument("--exams", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tumorseg_bench_cluster_") as tmp:
        root = Path(tmp)
        cases = _exams(root / "exams", args.exams)
        runs = [
            ("one process (torch on 2 threads)", root / "single", ()),
            (
                "LocalCluster, 2 workers x 1 thread",
                root / "dask21",
                ("--dask", "--workers", "2", "--threads-per-worker", "1"),
            ),
            (
                "LocalCluster, 1 worker x 2 threads",
                root / "dask12",
                ("--dask", "--workers", "1", "--threads-per-worker", "2"),
            ),
        ]
        rows = []
        reference = None
        for what, out, extra in runs:
            wall = _batch(cases, out, args.model, *extra)
            labels = _labels(out)
            if reference is None:
                reference, base = labels, wall
                differ = "-"
            else:
                voxels = sum(int((labels[k] != v).sum()) for k, v in reference.items())
                differ = "identical" if voxels == 0 else f"{voxels} voxels differ"
            seconds = _seconds(out)
            at_once = int(extra[extra.index("--workers") + 1]) if extra else 1
            fixed = wall - sum(seconds) / at_once  # start-up: Python, torch, model, cluster
            written = sum(p.stat().st_size for p in out.glob("exam*")) / args.exams
            rows.append(
                (
                    what,
                    wall,
                    wall / args.exams,
                    base / wall,
                    np.median(seconds),
                    differ,
                    written,
                    fixed,
                )
            )
            print(rows[-1], flush=True)
        parts = _parts(args.model)
    total = time.perf_counter() - began

    n = args.exams
    lines = [
        f"Command: `python benchmarks/bench_cluster.py --model {args.model} --exams {n}` "
        f"(2 CPU cores of {cpu_description()}; {total:.0f} s in all). {n} copies of the "
        "labelled sample exam (4 x 155 x 240 x 240), `tumorseg segment --out-dir` in a fresh "
        "process for each row, timed from its start (Python, torch, the model load and, for "
        "Dask, the cluster's start included). Per exam: the median of the cohort report's "
        "`seconds` (reading, segmenting, writing one exam, on its worker).",
        "",
        "| batch | wall s | wall s per exam | speed vs one process | one exam on its worker, s "
        "| start-up s | labels vs one process |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {what} | {wall:.1f} | {per:.2f} | {ratio:.2f}x | {exam:.2f} | {fixed:.1f} "
            f"| {differ} |"
            for what, wall, per, ratio, exam, differ, _, fixed in rows
        ),
        "",
        "Start-up: the wall time less the exams' own (their seconds summed, over the exams run "
        "at once): Python, torch and the model in one process; with Dask also the scheduler "
        "and the worker processes, which import torch and load the model themselves.",
        "",
        "Where the time goes (this process, torch on 2 threads):",
        "",
        *(
            f"- {what}: {seconds * 1000:.1f} ms" if seconds < 0.1 else f"- {what}: {seconds:.2f} s"
            for what, seconds in parts.items()
        ),
        "",
        *_estimate(rows, parts),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("Batch on Dask", "\n".join(lines))


def _estimate(rows, parts) -> list[str]:
    """A 10,000-exam cohort on N workers, from the figures measured above."""
    cohort = 10_000
    exam_2threads = rows[2][4]  # one exam on a 2-thread worker
    exam_1thread = rows[1][4]
    extra_start = rows[2][7] - rows[0][7]
    start, trip = parts[START], parts[TRIP]
    lines = [
        f"Estimate for a cohort of {cohort:,} exams like these. One exam takes "
        f"{exam_2threads:.1f} s on a 2-thread worker and {exam_1thread:.1f} s on a 1-thread "
        f"one; the scheduler adds {trip * 1000:.1f} ms a task, the model loads once per worker "
        f"({parts['model load']:.2f} s), and the cluster starts once ({start:.1f} s here; on "
        f"SLURM, the queue's wait instead); Dask's start-up was {extra_start:.1f} s more than "
        f"one process's, once per batch; an exam took {rows[0][4]:.2f} s in one process. So the "
        "time is the exams' own compute and I/O: with N workers of 2 threads,",
        "",
    ]
    for workers in (1, 10, 50, 200):
        seconds = (cohort / workers) * (exam_2threads + trip)
        took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
        lines.append(f"- N = {workers}: {took}")
    read_mb = sum(
        (SAMPLE / f"Brats18_TCIA01_378_1_{seq}.nii.gz").stat().st_size / 1e6 for seq in SEQUENCES
    )
    written_mb = rows[0][6] / 1e6
    many = 200
    rate = many * (read_mb + written_mb) / exam_2threads  # MB/s at N = 200
    tasks_per_s = many / exam_2threads
    lines += [
        "",
        f"Each exam reads {read_mb:.1f} MB of .nii.gz and writes {written_mb:.2f} MB (label "
        f"map and report): {cohort:,} exams move {cohort * (read_mb + written_mb) / 1e3:.0f} GB "
        f"through the shared file system, {rate:.0f} MB/s at N = {many}. The scheduler then "
        f"sees {tasks_per_s:.0f} tasks finish a second; even if all of a task's "
        f"{trip * 1000:.1f} ms round trip were its own work (an upper bound: most of it is "
        f"the messages' latency), that is {100 * tasks_per_s * trip:.0f} % of its time. Beyond "
        "a few hundred workers the file system, not Dask, is the first limit.",
    ]
    return lines


if __name__ == "__main__":
    main()
