"""Dice of a model on labelled exams, with all sequences and with some missing.

    python scripts/evaluate_models.py --model 3d --data ../shared/data/brats2018/train \
        --exams Brats18_CBICA_ABM_1,Brats18_TCIA10_637_1 [--drop t1ce] [--tta] [--window fit]

Reproduces the validation figures in the bundled models' cards (the full inference pipeline on
the original 1 mm grid, Dice per region against the expert labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_tumorseg.core.devices import precision_label
from napari_tumorseg.core.inference import segment
from napari_tumorseg.core.io import read_exam
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.metrics import evaluate_labels
from napari_tumorseg.core.models import TumorModel, load_model

REGIONS = ("WT", "TC", "ET")
#: HD95 (mm) where one map has a region and the other has none: the BraTS evaluation's
#: convention (the diagonal of its 240 x 240 x 155 mm volume), so that means stay finite.
HD95_OF_A_MISS = 373.13


def validate(
    model: TumorModel,
    folders: list[Path],
    drop: tuple[str, ...] = (),
    tta: bool = False,
    log=print,
    window: str | None = None,
) -> dict:
    """Dice and HD95 (mm) per exam and their means (full inference pipeline, original grid),
    at full precision.

    ``window``: the 3D inference window instead of the card's: a size in voxels (cubic) or
    "fit", one window per exam holding its whole brain box (rounded up to the network's
    divisor).
    """
    per_exam, hd95 = {}, {}
    for folder in folders:
        exam = read_exam(folder)
        for seq in drop:
            exam.scans.pop(seq, None)
        result = run_to_end(segment(exam, model, device="cpu", tta=tta, window=window))
        scores = evaluate_labels(result.labels.array, exam.labels.array, exam.reference.spacing)
        per_exam[exam.name] = {r: s["dice"] for r, s in scores.items()}
        hd95[exam.name] = {r: min(s["hd95_mm"], HD95_OF_A_MISS) for r, s in scores.items()}
        without = f" without {','.join(drop)}" if drop else ""
        shown = ", ".join(
            f"{r} {per_exam[exam.name][r]:.3f} ({hd95[exam.name][r]:.1f} mm)" for r in REGIONS
        )
        log(f"  {exam.name}{without}: Dice (HD95) {shown}")

    def mean(table: dict) -> dict:
        return {r: float(np.mean([e[r] for e in table.values()])) for r in REGIONS}

    return {"per_exam": per_exam, "mean": mean(per_exam), "hd95": hd95, "mean_hd95": mean(hd95)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="3d")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--exams", required=True, help="comma-separated case folders")
    parser.add_argument("--drop", default="", help="sequences to leave out, e.g. t1ce")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument(
        "--window",
        help='3D inference window instead of the card\'s: voxels, or "fit" (one '
        "window per exam holding its brain box)",
    )
    parser.add_argument(
        "--update-card",
        type=Path,
        metavar="TEST_EXAM",
        help="instead: score the exams with all sequences and without t1ce, and TEST_EXAM "
        "(never used to choose anything) likewise, and write it all into the model's card",
    )
    args = parser.parse_args(argv)
    model = load_model(args.model)
    folders = [args.data / name for name in args.exams.split(",") if name]
    if args.update_card:
        update_card(model, folders, args.update_card, args.data)
        return 0
    drop = tuple(s for s in args.drop.split(",") if s)
    result = validate(model, folders, drop, tta=args.tta, window=args.window)
    print(json.dumps(result, indent=2))
    return 0


def update_card(model: TumorModel, folders: list[Path], test: Path, data: Path) -> None:
    """Re-measure the card's metrics with the current inference code and post-processing."""
    metrics = {
        "validation": validate(model, folders),
        "validation_without_t1ce": validate(model, folders, ("t1ce",)),
        "test_sample": validate(model, [test]),
        "test_sample_without_t1ce": validate(model, [test], ("t1ce",)),
    }
    exams = ",".join(f.name for f in folders)
    rules = {k: v for k, v in (model.card.get("postprocess") or {}).items() if k != "why"}
    metrics.update(
        mean=metrics["validation"]["mean"],
        inference=f"cpu, {precision_label('cpu')}, postprocess {rules or 'none'}",
        command=f"python scripts/evaluate_models.py --model {model.card['name']} --data {data} "
        f"--exams {exams} --update-card {test}",
    )
    card_path = model.path / "card.json"
    card = json.loads(card_path.read_text())
    card["metrics"] = metrics
    tmp = card_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    sys.exit(main())
