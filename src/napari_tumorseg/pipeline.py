"""Headless pipelines used by the CLI and batch scripts (no Qt, no napari)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .core.brain import BrainResult
from .core.devices import select_device
from .core.errors import TumorSegError
from .core.inference import (
    SegmentationResult,
    check_one_grid,
    check_overlap,
    exam_to_channels,
    segment,
)
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
from .core.models import DEFAULT_MODEL, TumorModel, load_model
from .core.preprocess import is_skull_stripped


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
) -> tuple[Exam, dict[str, float]]:
    """The exam with its scans on the reference scan's grid, and the head overlap (foreground
    Dice, 0-1) each registered sequence reached with the reference.

    ``reference`` (a sequence name) is the scan whose geometry the outputs take; default: the
    first given. With ``register`` the other scans are registered to it (rigid, SimpleITK);
    otherwise they must already lie on its grid (no overlaps then).
    """
    if reference is not None:
        if reference not in exam.scans:
            raise TumorSegError(f"--reference {reference} is not among the given sequences")
        exam.scans = {reference: exam.scans[reference], **exam.scans}
    if not register:
        check_one_grid(exam)
        return exam, {}
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
    overlaps = {seq: float(r.quality) for seq, r in stacked.results.items() if seq != ref}
    return Exam(scans=scans, name=exam.name), overlaps


#: ``--brain-extraction`` choices: only when the exam is not skull-stripped, always, never.
BRAIN_EXTRACTION = ("auto", "on", "off")


def check_brain_extraction(mode: str) -> None:
    """A mode that is not one of `BRAIN_EXTRACTION`, or "on" without HD-BET installed, fails
    (before minutes of registration)."""
    if mode not in BRAIN_EXTRACTION:
        raise TumorSegError(f"--brain-extraction {mode}: expected one of {BRAIN_EXTRACTION}")
    if mode == "on":
        from .core.brain import weights_path

        weights_path()  # the error that says how to install it


def extract_brain_if_needed(
    exam: Exam, mode: str = "auto", log: Callable[[str], None] = print
) -> tuple[Exam, BrainResult | None]:
    """``exam`` (its scans on one grid) masked to the brain (`core.brain.exam_in_brain`) when
    ``mode`` is "on", or "auto" and the exam is not skull-stripped; the brain extraction's
    result, or None. "auto" without HD-BET installed logs how to install it and goes on (the
    segmentation then warns that the skull is on); "on" fails."""
    check_brain_extraction(mode)
    scans = [scan.array for scan in exam.scans.values()]
    if mode == "off" or (mode == "auto" and is_skull_stripped(scans)):
        return exam, None
    from .core import brain

    if not brain.available():
        log(
            "warning: the exam is not skull-stripped and brain extraction is not installed: "
            + brain.INSTALL_HINT
        )
        return exam, None
    exam, result = run_to_end(brain.exam_in_brain(exam))
    log(
        f"brain extracted from {result.source} with HD-BET: {result.volume_ml:.0f} mL in "
        f"{result.seconds:.1f} s"
    )
    return exam, result


@dataclass
class ExamOutcome:
    """What `segment_exam` did: the segmentation, the files written, the head overlap each
    registered sequence reached with the reference (empty when not registered), and the brain
    extraction's result (None when the exam was not brain-extracted)."""

    result: SegmentationResult
    written: list[Path]
    registration: dict[str, float] = field(default_factory=dict)
    brain: BrainResult | None = None


def segment_exam(
    exam: Exam,
    out: Path | None,
    model: str | TumorModel = DEFAULT_MODEL,
    prob_out: Path | None = None,
    device: str = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    views: tuple[str, ...] | None = None,
    register: bool = False,
    reference: str | None = None,
    log: Callable[[str], None] = print,
    precision: str = "auto",
    outputs: OutputFiles | None = None,
    brain_extraction: str = "auto",
) -> ExamOutcome:
    """Segment one exam and write the label map (and probabilities) in the reference geometry.

    The outputs and ``overlap`` are checked first, so that a bad name fails before minutes of
    registration and inference, and written together: the label map replaces an existing
    file only once the probabilities were written too. ``model``: a name or a loaded model;
    ``out`` None: the probabilities only. With ``outputs`` the files are staged there, to be
    renamed into place with the caller's other files (a report) when it commits.
    ``brain_extraction``: `extract_brain_if_needed`'s mode, after registration. ``views``:
    a 2D model's slices (`segment`'s ``views``; None: the card's).
    """
    if out is None and prob_out is None:
        raise TumorSegError("no output given")
    check_outputs(exam, out, prob_out)
    check_overlap(overlap)
    select_device(device)  # an unavailable device fails before registration
    tumour_model = load_model(model) if isinstance(model, str) else model  # so does a model
    if views is not None and tumour_model.card.get("spatial_dims") != 2:
        raise TumorSegError(f"views are for 2D models; {tumour_model.label} is a 3D model")
    check_brain_extraction(brain_extraction)  # so does a brain extraction not installed
    on_grid, overlaps = prepare_exam(exam, register=register, reference=reference, log=log)
    on_grid, brain = extract_brain_if_needed(on_grid, brain_extraction, log)
    channels = exam_to_channels(on_grid)
    missing = [s for s in SEQUENCES if s not in channels.channels]
    log(
        f"segmenting {exam.name} with {tumour_model.label} on {', '.join(channels.channels)}"
        + (f" (missing: {', '.join(missing)}; filled as the model card says)" if missing else "")
    )
    shown = [-1]
    unit = "windows" if tumour_model.card.get("spatial_dims") == 3 else "slices"

    def report(event) -> None:
        tenth = 10 * event.done // max(event.total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            log(f"  {event.done}/{event.total} {unit}" if event.total else "  ...")

    result = run_to_end(
        segment(
            channels,
            tumour_model,
            device=device,
            overlap=overlap,
            tta=tta,
            precision=precision,
            views=views,
        ),
        report,
    )
    like = exam.reference
    written = []
    with nullcontext(outputs) if outputs is not None else OutputFiles() as staged:
        if out is not None:
            written.append(write_labels(out, result.labels.array, like, outputs=staged))
        if prob_out is not None:
            written.append(write_volume(prob_out, result.probabilities.array, like, outputs=staged))
    log(f"done in {result.seconds:.1f} s on {result.device} ({result.precision})")
    for note in result.notes:
        log(note)
    for warning in result.warnings:
        log(f"warning: {warning}")
    return ExamOutcome(result, written, overlaps, brain)


def run_headless_demo(
    out_dir: Path, model: str = DEFAULT_MODEL, log: Callable[[str], None] = print
) -> list[Path]:
    """The whole pipeline on the sample exams, without a display.

    1. The labelled BraTS sample: segment it, write the label map and probabilities in the scan
       geometry, and a report with volumes and Dice/HD95 against the expert labels.
    2. The raw clinical exam TCGA-FG-6692: register its sequences to the post-contrast T1,
       mask them to the brain (HD-BET, when installed: the exam has its skull), segment,
       write the label map in the T1c geometry with a volume report.

    Returns the files written.
    """
    # The napari sample module (and its readers) only here: `tumorseg segment` starts faster.
    from ._sample_data import sample_exam_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    exam = read_exam(sample_exam_dir("brats2018"))
    log(f"read {exam.name}: {', '.join(exam.scans)} + expert labels")
    outcome = segment_exam(
        exam,
        out_dir / f"{exam.name}_seg.nii.gz",
        model=model,
        prob_out=out_dir / f"{exam.name}_prob.nii.gz",
        log=log,
    )
    result = outcome.result
    written += outcome.written
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
    outcome = segment_exam(
        raw,
        out_dir / f"{raw.name}_seg.nii.gz",
        model=model,
        register=True,
        reference="t1ce",
        log=log,
    )
    result = outcome.result
    written += outcome.written
    t1ce = raw.scans["t1ce"]
    report = label_map_report(
        result.labels.array,
        t1ce.voxel_volume_ml,
        exam=raw.name,
        model=model,
        thresholds=thresholds_text(result.postprocess["thresholds"]),
        registered_to="t1ce",
        brain_extracted=outcome.brain is not None,
        brain_ml=None if outcome.brain is None else outcome.brain.volume_ml,
        warnings="; ".join(result.warnings),
    )
    written += write_report(out_dir / f"{raw.name}_report", report)
    return written
