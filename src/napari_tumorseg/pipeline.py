"""Headless pipelines used by the CLI and batch scripts (no Qt, no napari)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._sample_data import sample_exam_dir
from .core.io import SEQUENCES, read_exam, write_labels
from .core.metrics import tumour_slice_range, tumour_volumes_ml


def label_map_report(labels, voxel_volume_ml: float, metrics: dict | None = None, **fields) -> dict:
    """A JSON-ready report of a label map: ``fields`` (exam, model, ...), volumes (mL) per
    region, the tumour's axial slice range and, when given, Dice/HD95 per region."""
    span = tumour_slice_range(labels)
    volumes = tumour_volumes_ml(labels, voxel_volume_ml)
    report = {
        **fields,
        "volumes_ml": {k: round(v, 3) for k, v in volumes.items()},
        "tumour_slices_z": None if span is None else list(span),
    }
    if metrics:
        report["metrics"] = {
            region: {k: (None if np.isinf(v) else round(v, 4)) for k, v in scores.items()}
            for region, scores in metrics.items()
        }
    return report


def _atomic_write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_report(base: Path, report: dict) -> list[Path]:
    """Write ``report`` as ``base.json`` and as a one-row ``base.csv``, atomically."""
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
    return [
        _atomic_write_text(base.with_suffix(".json"), json.dumps(report, indent=2)),
        _atomic_write_text(base.with_suffix(".csv"), buffer.getvalue()),
    ]


def run_headless_demo(out_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """The whole pipeline on the labelled sample exam, without a display.

    Reads the four sequences and the expert labels, writes the labels back in the scan geometry
    and a volume report. Returns the files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    exam = read_exam(sample_exam_dir("brats2018"))
    log(f"read {exam.name}: {', '.join(s for s in SEQUENCES if s in exam.scans)} + labels")
    reference = exam.reference
    written = [
        write_labels(out_dir / f"{exam.name}_expert_seg.nii.gz", exam.labels.array, reference)
    ]
    report = label_map_report(
        exam.labels.array, reference.voxel_volume_ml, exam=exam.name, source="expert labels"
    )
    written += write_report(out_dir / f"{exam.name}_report", report)
    return written
