"""A batch of case folders: planning, one case at a time, and the cohort report (no Qt).

The single-process batch (`segment_folders`) and the Dask batch (`cluster`) share every piece
here, so they check the same things, write the same files and report alike:

- `plan_batch` checks what would fail for every case before the first exam and says, for
  each case, which outputs to write (``--skip-existing`` leaves what is there);
- `run_case` segments one case and returns its cohort row; it never raises;
- `write_cohort` writes ``cohort.csv`` and ``cohort.json`` beside the label maps.

Each case's outputs -- label map, probabilities, ``<case>_report.json`` -- are staged and
renamed into place together (`core.io.OutputFiles`): a process killed mid-case leaves the
targets as they were, only a hidden staging file, which `remove_stale_staging` deletes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core.devices import select_device
from .core.dicom import read_case
from .core.errors import TumorSegError
from .core.inference import check_overlap
from .core.io import REGIONS, OutputFiles
from .core.metrics import tumour_volumes_ml
from .core.models import DEFAULT_MODEL, TumorModel, load_model
from .core.postprocess import entropy_map
from .pipeline import segment_exam

#: The cohort report's columns, in order (`cohort_row`); the JSON holds the same keys.
COLUMNS = (
    "case",
    "status",
    "reason",
    "model",
    "model_version",
    "NCR/NET_ml",
    "ED_ml",
    "ET_ml",
    "TC_ml",
    "WT_ml",
    "registered",
    "registration_overlap_min",
    "skull_stripped",
    "brain_extracted",
    "mean_uncertainty_in_tumour",
    "seconds",
    "worker",
    "warnings",
    "label_map",
    "probabilities",
    "case_dir",
)
COHORT_FILES = ("cohort.csv", "cohort.json")


@dataclass(frozen=True)
class CaseJob:
    """One case of a batch and the outputs to write for it (None: not asked, or already
    there and left as it is)."""

    case: Path
    name: str
    out: Path | None
    prob: Path | None
    report: Path
    kept: tuple[Path, ...] = ()  # outputs already there, left as they are (--skip-existing)


@dataclass
class BatchPlan:
    """`plan_batch`'s answer: the jobs to run, the cases skipped whole, notes for the log."""

    jobs: list[CaseJob] = field(default_factory=list)
    skipped: list[CaseJob] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class BatchOutcome:
    """What a batch did with each case folder."""

    segmented: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # outputs already there (skip_existing)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (case folder, why)
    rows: list[dict] = field(default_factory=list)  # the cohort report, one row per case

    def add(self, row: dict) -> None:
        """Count a case's cohort row in."""
        self.rows.append(row)
        case = Path(row["case_dir"])
        if row["status"] == "segmented":
            self.segmented.append(case)
            self.written += [Path(p) for p in row.get("written", ())]
        elif row["status"] == "skipped":
            self.skipped.append(case)
        else:
            self.failed.append((case, row["reason"]))

    def summary(self) -> str:
        parts = [f"{len(self.segmented)} segmented"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (outputs already there)")
        if self.failed:
            names = ", ".join(case.name for case, _ in self.failed)
            parts.append(f"{len(self.failed)} failed: {names}")
        return "; ".join(parts)


def plan_batch(
    cases: Sequence[Path],
    out_dir: Path,
    prob_dir: Path | None = None,
    skip_existing: bool = False,
) -> BatchPlan:
    """Check the case folders and output folders, and say what to write for each case.

    Fails (`TumorSegError`) on what would fail for every case: a case that is not a folder,
    two cases of one name, an output folder that is a NIfTI name or a file. A case folder
    given twice counts once; an output folder given among the cases (``exams/*`` with
    ``--out-dir exams/seg``) is left out with a note. ``skip_existing`` never replaces an
    output that is there: a case whose outputs are all there is skipped, one with some of
    them there gets only the missing ones.
    """
    out_dir = Path(out_dir)
    prob_dir = Path(prob_dir) if prob_dir is not None else None
    folders = [d for d in (out_dir, prob_dir) if d is not None]
    for folder in folders:
        if folder.name.lower().endswith((".nii", ".nii.gz")):
            raise TumorSegError("is a NIfTI file name, not a folder for the outputs", folder)
        if folder.exists() and not folder.is_dir():
            raise TumorSegError("is not a folder", folder)
    outputs = {os.path.realpath(folder) for folder in folders}
    by_name: dict[str, Path] = {}
    seen: set[str] = set()
    plan = BatchPlan()
    left_out = []
    for case in map(Path, cases):
        real = os.path.realpath(case)
        if real in seen:
            continue
        seen.add(real)
        if real in outputs:
            left_out.append(case)
            continue
        if not case.is_dir():
            raise TumorSegError(
                "is not a folder: a batch takes case folders (one exam's files: segment it alone)",
                case,
            )
        # Named as given (a link keeps its own name); "." and ".." by the folder they mean.
        name = Path(os.path.abspath(case)).name
        key = name.casefold()  # one file on case-insensitive disks
        if key in by_name:
            raise TumorSegError(
                f"two case folders are named {name!r} ({by_name[key]} and {case}): their "
                "outputs would take one name"
            )
        by_name[key] = case
    if not by_name:
        also = f" ({left_out[0]} is the output folder)" if left_out else ""
        raise TumorSegError(f"no case folder given{also}")
    plan.notes += [f"{case}: the output folder, not a case: left out" for case in left_out]
    for case in by_name.values():
        name = Path(os.path.abspath(case)).name
        out = out_dir / f"{name}_seg.nii.gz"
        prob = prob_dir / f"{name}_prob.nii.gz" if prob_dir is not None else None
        report = out_dir / f"{name}_report.json"
        asked = [p for p in (out, prob) if p is not None]
        there = tuple(p for p in asked if skip_existing and p.exists())
        job = CaseJob(
            case=case,
            name=name,
            out=None if out in there else out,
            prob=None if prob in there else prob,
            report=report,
            kept=there,
        )
        (plan.skipped if len(there) == len(asked) else plan.jobs).append(job)
    return plan


def check_batch_outputs(out_dir: Path, prob_dir: Path | None = None) -> None:
    """Create the output folders and check that they can be written to."""
    for folder in (d for d in (out_dir, prob_dir) if d is not None):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TumorSegError("cannot be written to (permission denied)", folder)


def failure_reason(exc: BaseException) -> str:
    """One line saying why a case failed, for the log and the cohort report."""
    if isinstance(exc, OSError):  # a full disk, a folder that became unwritable
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc)
    if isinstance(exc, MemoryError):
        return "not enough memory for this exam"
    if isinstance(exc, TumorSegError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"  # a bug of ours: say what it was


def _row(job: CaseJob, status: str, **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(case=job.name, case_dir=str(job.case), status=status, reason="")
    row.update(values)
    return row


def skipped_row(job: CaseJob) -> dict:
    """The cohort row of a case skipped whole: its earlier report's figures, if it has one."""
    row = _row(job, "skipped")
    try:
        earlier = json.loads(job.report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = {}
    if isinstance(earlier, dict):
        row.update({k: earlier[k] for k in COLUMNS if k in earlier and k not in ("status",)})
    row["reason"] = "outputs already there: " + " and ".join(p.name for p in job.kept)
    return row


def failed_row(job: CaseJob, reason: str, seconds: float | None = None, worker: str = "") -> dict:
    """The cohort row of a case that failed."""
    return _row(job, "failed", reason=reason, seconds=seconds, worker=worker or None)


def run_case(
    job: CaseJob,
    model: TumorModel,
    log: Callable[[str], None] = print,
    worker: str | None = None,
    **options,
) -> dict:
    """Segment one case, write its outputs and report together; returns its cohort row (with
    ``written``: the files written). Never raises: a failure is a row with its reason."""
    started = time.perf_counter()
    worker = worker or socket.gethostname()
    for path in job.kept:
        log(f"{path.name} is already there and is left as it is")
    try:
        exam = read_case(job.case, read_labels=False)  # NIfTI files or a DICOM study
        for message in exam.warnings:
            log(f"warning: {message}")
        outputs = OutputFiles()
        with outputs:
            outcome = segment_exam(
                exam, job.out, model=model, prob_out=job.prob, log=log, outputs=outputs, **options
            )
            row = cohort_row(job, outcome, model, time.perf_counter() - started, worker)
            outputs.write_text(job.report, json.dumps(row, indent=2))
    except Exception as exc:  # one case never stops the batch
        reason = failure_reason(exc)
        log(f"error: {reason}")
        return failed_row(job, reason, time.perf_counter() - started, worker)
    row["written"] = [str(p) for p in (*outcome.written, job.report)]
    return row


def cohort_row(job: CaseJob, outcome, model: TumorModel, seconds: float, worker: str) -> dict:
    """A segmented case's cohort row: volumes per label and region (mL), the model, how well
    the sequences were registered, whether the exam was skull-stripped (as segmented: after
    the brain extraction, if it had one) and brain-extracted here, the mean uncertainty
    (entropy, bits) of the probabilities inside the whole tumour, seconds, worker."""
    result = outcome.result
    labels = result.labels
    volumes = tumour_volumes_ml(labels.array, labels.voxel_volume_ml)
    tumour = labels.array > 0
    uncertainty = None
    if tumour.any():
        probabilities = result.probabilities.array[:, tumour]  # (regions, tumour voxels)
        uncertainty = float(entropy_map(probabilities[..., None, None]).mean())
    overlaps = outcome.registration
    return _row(
        job,
        "segmented",
        model=model.label,
        model_version=model.card.get("version"),
        **{f"{k}_ml": v for k, v in volumes.items()},
        registered=bool(overlaps),
        registration_overlap_min=min(overlaps.values()) if overlaps else None,
        skull_stripped=bool(result.skull_stripped),
        brain_extracted=outcome.brain is not None,
        mean_uncertainty_in_tumour=uncertainty,
        seconds=seconds,
        worker=worker,
        warnings="; ".join(result.warnings),
        label_map=_output(job, job.out, "_seg.nii.gz"),
        probabilities=_output(job, job.prob, "_prob.nii.gz"),
    )


def _output(job: CaseJob, written: Path | None, suffix: str) -> str | None:
    """The case's output ending in ``suffix``: written now, or already there and kept."""
    path = written or next((p for p in job.kept if p.name.endswith(suffix)), None)
    return None if path is None else str(path)


def write_cohort(out_dir: Path, rows: Sequence[dict], about: dict | None = None) -> list[Path]:
    """``out_dir/cohort.csv`` (one row per case, `COLUMNS`) and ``cohort.json`` (the same rows
    under ``cases``, with ``about`` the batch), written together and atomically, at full
    precision. Rows are sorted by case name: the same cohort gives the same file whatever the
    order the cases finished in."""
    rows = sorted(rows, key=lambda r: r["case"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    counts = {s: sum(r["status"] == s for r in rows) for s in ("segmented", "skipped", "failed")}
    document = {
        **(about or {}),
        "counts": counts,
        "regions": list(REGIONS),
        "cases": [{k: row.get(k) for k in COLUMNS} for row in rows],
    }
    csv_path, json_path = (Path(out_dir) / name for name in COHORT_FILES)
    with OutputFiles() as outputs:
        outputs.write_text(csv_path, buffer.getvalue())
        outputs.write_text(json_path, json.dumps(document, indent=2, default=_json_default))
    return [csv_path, json_path]


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def staging_files(jobs: Sequence[CaseJob]) -> list[Path]:
    """Hidden staging files (`OutputFiles.leftovers`) left beside the jobs' outputs by a
    process that was killed while writing them."""
    targets = (t for job in jobs for t in (job.out, job.prob, job.report) if t is not None)
    return [path for target in targets for path in OutputFiles.leftovers(target)]


def remove_stale_staging(jobs: Sequence[CaseJob]) -> int:
    """Delete `staging_files` once no task of the batch is running; returns how many."""
    removed = 0
    for path in staging_files(jobs):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def segment_folders(
    cases: Sequence[Path],
    out_dir: Path,
    prob_dir: Path | None = None,
    skip_existing: bool = False,
    model: str = DEFAULT_MODEL,
    log: Callable[[str], None] = print,
    on_written: Callable[[Path], None] | None = None,
    **options,
) -> BatchOutcome:
    """Segment a batch of case folders in this process, one model load for all:
    ``out_dir/<case>_seg.nii.gz`` (and ``prob_dir/<case>_prob.nii.gz``), each case's
    ``<case>_report.json``, and the cohort report ``out_dir/cohort.csv`` / ``cohort.json``;
    ``options`` as `segment_exam`'s; ``on_written(path)`` as each file is written.

    Everything that would fail for every case (`plan_batch`, the model, the device, the
    overlap) is checked before the first exam. A case that fails (unreadable scans, no common
    grid, ...) is logged with its reason and the batch goes on; its earlier outputs, if any,
    stay as they were. The cohort report is rewritten as the batch goes (at most every
    `COHORT_EVERY_S` seconds) and at its end, an interrupted batch included.
    """
    plan = plan_batch(cases, out_dir, prob_dir, skip_existing)
    check_overlap(options.get("overlap", 0.5))
    select_device(options.get("device", "auto"))
    tumour_model = load_model(model)
    check_batch_outputs(out_dir, prob_dir)
    outcome = start_outcome(plan, log)
    total = len(plan.jobs) + len(plan.skipped)
    about = batch_about(tumour_model, options, engine="single process")
    written_at = time.monotonic()
    try:
        for index, job in enumerate(plan.jobs, start=len(plan.skipped) + 1):
            log(f"[{index}/{total}] {job.case}")
            row = run_case(job, tumour_model, log=lambda m: log(f"  {m}"), **options)
            outcome.add(row)
            for path in row.get("written", ()):
                if on_written is not None:
                    on_written(Path(path))
            if time.monotonic() - written_at > COHORT_EVERY_S:
                write_cohort(out_dir, outcome.rows, about)
                written_at = time.monotonic()
    finally:
        write_cohort(out_dir, outcome.rows, about)
    return outcome


def start_outcome(plan: BatchPlan, log: Callable[[str], None]) -> BatchOutcome:
    """A batch's outcome before its first case: the notes logged, the skipped cases in."""
    for note in plan.notes:
        log(note)
    outcome = BatchOutcome()
    for job in plan.skipped:
        log(f"{job.case}: skipped: {' and '.join(p.name for p in job.kept)} already there")
        outcome.add(skipped_row(job))
    return outcome


#: How often a running batch rewrites its cohort report at most (seconds).
COHORT_EVERY_S = 30.0


def batch_about(model: TumorModel, options: dict, engine: str) -> dict:
    """What the cohort report says about the batch as a whole."""
    return {
        "model": model.label,
        "model_version": model.card.get("version"),
        "engine": engine,
        "options": {k: v for k, v in options.items() if k != "log" and not callable(v)},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
