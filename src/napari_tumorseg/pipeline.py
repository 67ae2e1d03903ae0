"""Headless pipelines used by the CLI and batch scripts (no Qt, no napari)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ._sample_data import sample_exam_dir
from .core.io import SEQUENCES, read_exam, write_labels
from .core.metrics import tumour_slice_range, tumour_volumes_ml


def volume_report(labels, voxel_volume_ml: float, **extra) -> dict:
    """A JSON-ready report of a label map: volumes (mL) per region and tumour slice range."""
    span = tumour_slice_range(labels)
    return {
        **extra,
        "volumes_ml": {
            k: round(v, 3) for k, v in tumour_volumes_ml(labels, voxel_volume_ml).items()
        },
        "tumour_slices_z": None if span is None else list(span),
    }


def write_json(path: Path, data: dict) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path


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
    report = volume_report(
        exam.labels.array, reference.voxel_volume_ml, exam=exam.name, source="expert labels"
    )
    written.append(write_json(out_dir / f"{exam.name}_report.json", report))
    return written
