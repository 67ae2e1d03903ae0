"""Headless pipelines used by the CLI and batch scripts (no Qt, no napari)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._sample_data import sample_exam_dir
from .core.devices import select_device
from .core.dicom import read_case
from .core.errors import TumorSegError
from .core.inference import SegmentationResult, check_overlap, exam_to_channels, segment
from .core.io import (
    REGIONS,
    SEQUENCES,
    Exam,
    OutputFiles,
    check_output_path,
    check_outputs_apart,
    read_exam,
    write_labels,
    write_volume,
)
from .core.jobs import run_to_end
from .core.metrics import evaluate_labels, tumour_slice_range, tumour_volumes_ml
from .core.models import TumorModel, load_model
from .core.volume import Volume


def label_map_report(labels, voxel_volume_ml: float, metrics: dict | None = None, **fields) -> dict:
    """A JSON-ready report of a label map: ``fields`` (exam, model, ...), volumes (mL) per
    region, the tumour's axial slice range and, when given, Dice/HD95 per region -- at full
    precision: statistics are done on reports (round for display only)."""
    span = tumour_slice_range(labels)
    volumes = tumour_volumes_ml(labels, voxel_volume_ml)
    report = {
        **fields,
        "volumes_ml": {k: float(v) for k, v in volumes.items()},
        "tumour_slices_z": None if span is None else list(span),
    }
    if metrics:
        report["metrics"] = {
            region: {k: (None if np.isinf(v) else float(v)) for k, v in scores.items()}
            for region, scores in metrics.items()
        }
    return report


def thresholds_text(thresholds) -> str:
    """``"WT 0.5 / TC 0.65 / ET 0.5"``: the per-region thresholds that made a label map, for
    reports (a string, so that the CSV row holds it too)."""
    return " / ".join(f"{r} {float(t):g}" for r, t in zip(REGIONS, thresholds))


def write_report(base: Path, report: dict, outputs: OutputFiles | None = None) -> list[Path]:
    """Write ``report`` as ``base.json`` and as a one-row ``base.csv`` (UTF-8), atomically and
    together (with ``outputs``: together with that output's other files, e.g. the mask)."""
    if outputs is None:
        with OutputFiles() as outputs:
            return write_report(base, report, outputs)
    flat = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    flat.update({f"{k}_ml": v for k, v in report["volumes_ml"].items()})
    span = report.get("tumour_slices_z")
    flat["tumour_slices_z"] = "" if span is None else f"{span[0]}-{span[1]}"
    for region, scores in (report.get("metrics") or {}).items():
        flat.update({f"{region}_{k}": v for k, v in scores.items()})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat))
    writer.writeheader()
    writer.writerow(flat)
    json_path, csv_path = report_paths(base)
    return [
        outputs.write_text(json_path, json.dumps(report, indent=2)),
        outputs.write_text(csv_path, buffer.getvalue()),
    ]


def report_paths(base: Path) -> tuple[Path, Path]:
    """The JSON and CSV files `write_report` writes for ``base``. Not ``with_suffix``: it
    would cut a name holding a dot ("sub-01.ses-1_report" -> "sub-01.json")."""
    return base.with_name(f"{base.name}.json"), base.with_name(f"{base.name}.csv")


def check_outputs(exam: Exam, *outputs: Path | None) -> None:
    """Refuse outputs that are not NIfTI names, cannot be written (a folder, no permission),
    name one file twice, or would overwrite one of the exam's own files."""
    named = [check_output_path(p) for p in outputs if p is not None]
    volumes = [*exam.scans.values(), exam.labels]
    inputs = [
        v.source.path
        for v in volumes
        if v is not None and v.source is not None and v.source.path is not None
    ]
    inputs += exam.unread_labels
    check_outputs_apart(named, inputs, "this exam's input files")


def prepare_exam(
    exam: Exam,
    register: bool = False,
    reference: str | None = None,
    log: Callable[[str], None] = print,
) -> Volume:
    """The exam's scans as one (4, Z, Y, X) Volume on the reference scan's grid.

    ``reference`` (a sequence name) is the scan whose geometry the outputs take; default: the
    first given. With ``register`` the other scans are registered to it (rigid, SimpleITK);
    otherwise they must already lie on its grid.
    """
    if reference is not None:
        if reference not in exam.scans:
            raise TumorSegError(f"--reference {reference} is not among the given sequences")
        exam.scans = {reference: exam.scans[reference], **exam.scans}
    if not register:
        return exam_to_channels(exam)
    from .core.registration import stack_sequences

    ref = next(iter(exam.scans))
    stacked = run_to_end(stack_sequences(exam.scans, reference=ref))
    for seq, result in stacked.results.items():
        if seq != ref:
            log(
                f"registered {seq} to {ref}: head overlap {result.quality:.3f} "
                f"(before {result.quality_before:.3f}), {result.seconds:.1f} s"
            )
    for warning in stacked.warnings:
        log(f"warning: {warning}")
    volume = stacked.volume
    order = [ref, *(seq for seq in volume.channels if seq != ref)]
    scans = {
        seq: volume.with_array(
            volume.array[list(volume.channels).index(seq)], name=seq, channels=()
        )
        for seq in order
    }
    return exam_to_channels(Exam(scans=scans, name=exam.name))


def segment_exam(
    exam: Exam,
    out: Path | None,
    model: str | TumorModel = "3d",
    prob_out: Path | None = None,
    device: str = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    register: bool = False,
    reference: str | None = None,
    log: Callable[[str], None] = print,
    precision: str = "auto",
) -> tuple[SegmentationResult, list[Path]]:
    """Segment one exam and write the label map (and probabilities) in the reference geometry.

    The outputs and ``overlap`` are checked first, so that a bad name fails before minutes of
    registration and inference, and written together: the label map replaces an existing
    file only once the probabilities were written too. ``model``: a name or a loaded model;
    ``out`` None: the probabilities only.
    """
    if out is None and prob_out is None:
        raise TumorSegError("no output given")
    check_outputs(exam, out, prob_out)
    check_overlap(overlap)
    select_device(device)  # an unavailable device fails before registration
    tumour_model = load_model(model) if isinstance(model, str) else model  # so does a model
    channels = prepare_exam(exam, register=register, reference=reference, log=log)
    missing = [s for s in SEQUENCES if s not in channels.channels]
    log(
        f"segmenting {exam.name} with {tumour_model.label} on {', '.join(channels.channels)}"
        + (f" (missing: {', '.join(missing)}; filled as the model card says)" if missing else "")
    )
    shown = [-1]

    def report(event) -> None:
        tenth = 10 * event.done // max(event.total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            log(f"  {event.done}/{event.total} windows" if event.total else "  ...")

    result = run_to_end(
        segment(
            channels, tumour_model, device=device, overlap=overlap, tta=tta, precision=precision
        ),
        report,
    )
    like = exam.reference
    written = []
    with OutputFiles() as outputs:
        if out is not None:
            written.append(write_labels(out, result.labels.array, like, outputs=outputs))
        if prob_out is not None:
            written.append(
                write_volume(prob_out, result.probabilities.array, like, outputs=outputs)
            )
    log(f"done in {result.seconds:.1f} s on {result.device} ({result.precision})")
    for note in result.notes:
        log(note)
    for warning in result.warnings:
        log(f"warning: {warning}")
    return result, written


@dataclass
class BatchOutcome:
    """What `segment_folders` did with each case folder."""

    segmented: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # outputs already there (skip_existing)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (case folder, why)

    def summary(self) -> str:
        parts = [f"{len(self.segmented)} segmented"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (outputs already there)")
        if self.failed:
            names = ", ".join(case.name for case, _ in self.failed)
            parts.append(f"{len(self.failed)} failed: {names}")
        return "; ".join(parts)


def segment_folders(
    cases: Sequence[Path],
    out_dir: Path,
    prob_dir: Path | None = None,
    skip_existing: bool = False,
    model: str = "3d",
    log: Callable[[str], None] = print,
    on_written: Callable[[Path], None] | None = None,
    **options,
) -> BatchOutcome:
    """Segment a batch of case folders, one model load for all: ``out_dir/<case>_seg.nii.gz``
    (and ``prob_dir/<case>_prob.nii.gz``) for each, ``options`` as `segment_exam`'s;
    ``on_written(path)`` as each file is written.

    Everything that would fail for every case (a case that is not a folder, two cases of one
    name, an output folder that is a file or not writable, the model, the device, the overlap)
    is checked before the first exam. A case folder given twice counts once; an output folder
    given among the cases (``exams/*`` with ``--out-dir exams/seg``) is left out. A case that
    fails (unreadable scans, no common grid, ...) is logged with its reason and the batch goes
    on; its earlier outputs, if any, stay as they were. ``skip_existing`` never replaces an
    output that is there: a case whose outputs are all there is skipped, one with some of them
    there gets only the missing ones (an interrupted batch resumes; ``--prob-dir`` added later
    fills in what is missing).
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
    check_overlap(options.get("overlap", 0.5))
    select_device(options.get("device", "auto"))
    tumour_model = load_model(model)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TumorSegError("cannot be written to (permission denied)", folder)
    for case in left_out:
        log(f"{case}: the output folder, not a case: left out")
    outcome = BatchOutcome()
    for index, case in enumerate(by_name.values(), start=1):
        name = Path(os.path.abspath(case)).name
        out = out_dir / f"{name}_seg.nii.gz"
        prob = prob_dir / f"{name}_prob.nii.gz" if prob_dir is not None else None
        log(f"[{index}/{len(by_name)}] {case}")
        if skip_existing:  # an output that is there is never replaced, whichever it is
            there = [p for p in (out, prob) if p is not None and p.exists()]
            if len(there) == len([p for p in (out, prob) if p is not None]):
                log(f"  skipped: {' and '.join(p.name for p in there)} already there")
                outcome.skipped.append(case)
                continue
            for path in there:
                log(f"  {path.name} is already there and is left as it is")
            out = None if out in there else out
            prob = None if prob in there else prob
        try:
            exam = read_case(case, read_labels=False)  # NIfTI files or a DICOM study
            for message in exam.warnings:
                log(f"  warning: {message}")
            _, written = segment_exam(
                exam, out, model=tumour_model, prob_out=prob, log=lambda m: log(f"  {m}"), **options
            )
        except Exception as exc:  # one case never stops the batch
            reason = str(exc)
            if isinstance(exc, OSError):  # a full disk, a folder that became unwritable
                reason = f"{exc.filename}: {exc.strerror or exc}" if exc.filename else reason
            elif isinstance(exc, MemoryError):
                reason = "not enough memory for this exam"
            elif not isinstance(exc, TumorSegError):  # a bug of ours: say what it was
                reason = f"unexpected {type(exc).__name__}: {exc}"
            log(f"  error: {reason}")
            outcome.failed.append((case, reason))
            continue
        for path in written:
            if on_written is not None:
                on_written(path)
        outcome.written += written
        outcome.segmented.append(case)
    return outcome


def run_headless_demo(
    out_dir: Path, model: str = "3d", log: Callable[[str], None] = print
) -> list[Path]:
    """The whole pipeline on the sample exams, without a display.

    1. The labelled BraTS sample: segment it, write the label map and probabilities in the scan
       geometry, and a report with volumes and Dice/HD95 against the expert labels.
    2. The raw clinical exam TCGA-FG-6692: register its sequences to the post-contrast T1,
       segment, write the label map in the T1c geometry with a volume report.

    Returns the files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    exam = read_exam(sample_exam_dir("brats2018"))
    log(f"read {exam.name}: {', '.join(exam.scans)} + expert labels")
    result, files = segment_exam(
        exam,
        out_dir / f"{exam.name}_seg.nii.gz",
        model=model,
        prob_out=out_dir / f"{exam.name}_prob.nii.gz",
        log=log,
    )
    written += files
    reference = exam.reference
    metrics = evaluate_labels(result.labels.array, exam.labels.array, reference.spacing)
    log(
        "against the expert labels: "
        + ", ".join(
            f"{r} Dice {m['dice']:.3f} HD95 {m['hd95_mm']:.1f} mm" for r, m in metrics.items()
        )
    )
    report = label_map_report(
        result.labels.array,
        reference.voxel_volume_ml,
        metrics=metrics,
        exam=exam.name,
        model=model,
        thresholds=thresholds_text(result.postprocess["thresholds"]),
        reference="expert labels",
        expert_volumes_ml=label_map_report(exam.labels.array, reference.voxel_volume_ml)[
            "volumes_ml"
        ],
    )
    written += write_report(out_dir / f"{exam.name}_report", report)

    raw = read_exam(sample_exam_dir("tcga_raw"))
    log(f"read {raw.name}: {', '.join(raw.scans)} as scanned (not registered)")
    result, files = segment_exam(
        raw,
        out_dir / f"{raw.name}_seg.nii.gz",
        model=model,
        register=True,
        reference="t1ce",
        log=log,
    )
    written += files
    t1ce = raw.scans["t1ce"]
    report = label_map_report(
        result.labels.array,
        t1ce.voxel_volume_ml,
        exam=raw.name,
        model=model,
        thresholds=thresholds_text(result.postprocess["thresholds"]),
        registered_to="t1ce",
        warnings="; ".join(result.warnings),
    )
    written += write_report(out_dir / f"{raw.name}_report", report)
    return written
