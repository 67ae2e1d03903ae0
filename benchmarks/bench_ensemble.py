"""Ensembles against the default model on the two outside checks (issue 23, item 3).

Candidates: the bundled models alone, each fold model of a cross-validation recipe, the mean of
the fold models' probabilities (the 5-fold ensemble), that mean with the bundled 2D model, and
the bundled 2D + 3D mean. Each is scored on the labelled sample exam (expert labels) and on
TCGA-FG-6692 in BraTS space (the six-algorithm fusion), with the default card's thresholds
alone and with its whole ``postprocess`` (islands, the largest tumour). Outside checks only:
the fold models cannot be cross-validated as an ensemble (every exam is in four folds'
training). The rule, fixed by the issue: an ensemble replaces the default only if it beats
it on the outside checks.

    python benchmarks/bench_ensemble.py [--recipe 2d-base] [--no-write]
    python benchmarks/bench_ensemble.py --recipe "" --extra 2d-bn=runs/bundled/2d-bn \
        --mean 2d+2d-bn

``--extra NAME=FOLDER`` adds a model from its folder (e.g. a recipe trained on all the exams by
``train_bundled.py --validation ""``), ``--mean A+B`` the mean of named members; ``--recipe ""``
leaves the fold models out.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_description, write_section  # noqa: E402

SPACE = ROOT.parent / "shared" / "data" / "tcia" / "TCGA-FG-6692" / "brats_space"
REGIONS = ("WT", "TC", "ET")


def outside_exams():
    """(name, exam, reference labels) of the sample exam and TCGA-FG-6692 in BraTS space."""
    from napari_tumorseg.core.io import read_exam, read_volume

    sample = read_exam(ROOT / "sample_data" / "brats2018")
    files = {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "flair"}
    tcga = read_exam(
        {k: SPACE / f"TCGA-FG-6692_{v}_bet.nii.gz" for k, v in files.items()}, read_labels=False
    )
    fusion = read_volume(SPACE / "TCGA-FG-6692_brats2020_algorithm_fusion_seg.nii.gz")
    return [
        ("sample (expert)", sample, sample.labels.array),
        ("TCGA-FG-6692 (fusion)", tcga, fusion.array),
    ]


def probabilities(exam, model) -> tuple[np.ndarray, float]:
    """The model's region probabilities on the exam's grid (no post-processing), seconds."""
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.jobs import run_to_end

    result = run_to_end(segment(exam, model, device="cpu", postprocess=False))
    return result.probabilities.array, result.seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="2d-base", help='fold models\' recipe; "" for none')
    parser.add_argument("--extra", action="append", default=[], help="NAME=FOLDER, a model")
    parser.add_argument("--mean", action="append", default=[], help="A+B, a mean of members")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from napari_tumorseg.core.bundled import DEFAULT_MODEL
    from napari_tumorseg.core.labels import card_labels
    from napari_tumorseg.core.metrics import evaluate_labels
    from napari_tumorseg.core.models import load_model, load_model_folder

    torch.set_num_threads(2)
    began = time.perf_counter()
    folds = []
    if args.recipe:
        folds = sorted((ROOT / "runs" / "cv" / args.recipe).glob("fold*/model/card.json"))
        if not folds:
            sys.exit(f"no fold model of {args.recipe}: run scripts/cross_validate.py train first")
    models = {"2d": load_model("2d"), "3d": load_model("3d")}
    for card in folds:
        models[f"fold {card.parent.parent.name[4:]}"] = load_model_folder(card.parent)
    for extra in args.extra:
        name, _, folder = extra.partition("=")
        if not (Path(folder) / "card.json").is_file():
            sys.exit(f"--extra {extra}: no model card in {folder}")
        models[name] = load_model_folder(Path(folder))
    fold_names = [n for n in models if n.startswith("fold")]
    rules = models[DEFAULT_MODEL].card.get("postprocess", {})
    thresholds = {"thresholds": rules.get("thresholds", 0.5)}
    candidates = {name: [name] for name in models}
    if fold_names:
        candidates[f"mean of the {len(fold_names)} fold models"] = fold_names
        candidates[f"mean of the {len(fold_names)} fold models and 2d"] = [*fold_names, "2d"]
    candidates["mean of 2d and 3d"] = ["2d", "3d"]
    for mean in args.mean:
        members = mean.split("+")
        unknown = [m for m in members if m not in models]
        if unknown:
            sys.exit(f"--mean {mean}: no model named {', '.join(unknown)}")
        candidates[f"mean of {' and '.join(members)}"] = members

    scores: dict[str, dict[str, dict]] = {name: {} for name in candidates}
    seconds: dict[str, float] = {name: 0.0 for name in candidates}
    exams = outside_exams()
    for exam_name, exam, reference in exams:
        maps, took = {}, {}
        for name, model in models.items():
            maps[name], took[name] = probabilities(exam, model)
        spacing = exam.scans["t1"].spacing
        voxel_ml = float(np.prod(spacing)) / 1000.0
        for name, members in candidates.items():
            mean = np.mean([maps[m] for m in members], axis=0)
            seconds[name] += sum(took[m] for m in members) / len(exams)
            for kind, rule in (("thresholds", thresholds), ("card", rules)):
                labels = card_labels(mean, rule, voxel_ml)
                scores[name][(exam_name, kind)] = evaluate_labels(labels, reference, spacing)
            print(exam_name, name, scores[name][(exam_name, "card")]["WT"], flush=True)

    def cell(result):
        return " / ".join(f"{result[r]['dice']:.3f}" for r in REGIONS) + (
            f" ({result['WT']['hd95_mm']:.1f} mm)"
        )

    header = " | ".join(f"{e} {k}" for e, _, _ in exams for k in ("thresholds", "card"))
    command = shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Command: `python benchmarks/bench_ensemble.py {command}` (2 CPU cores of "
        f"{cpu_description()}; {time.perf_counter() - began:.0f} s in all). Outside checks only "
        "(nothing here is cross-validated): Dice WT / TC / ET (HD95 WT) on the labelled sample "
        "against its expert labels and on TCGA-FG-6692 in BraTS space against the six-algorithm "
        "fusion; the mean of the members' probabilities, labelled with the default "
        f"({DEFAULT_MODEL}) card's thresholds alone and with its whole post-processing "
        "(islands, the largest tumour). "
        + (
            f"Fold models: `runs/cv/{args.recipe}` (each trained on 21-22 of the 27 exams). "
            if fold_names
            else ""
        )
        + "".join(f"{e.partition('=')[0]}: `{e.partition('=')[2]}`. " for e in args.extra)
        + "Seconds: the members' `segment` time per exam, one after the other.",
        "",
        f"| candidate | s per exam | {header} |",
        "|---|---|" + "---|" * (2 * len(exams)),
        *(
            f"| {name} | {seconds[name]:.1f} | "
            + " | ".join(
                cell(scores[name][(e, k)]) for e, _, _ in exams for k in ("thresholds", "card")
            )
            + " |"
            for name in candidates
        ),
        "",
        "Rule (issue 23): an ensemble replaces the default model only if it beats it on the "
        "outside checks.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        title = "Ensembles (outside checks)"
        if args.extra:  # the fold models' table stays
            names = ", ".join(e.partition("=")[0] for e in args.extra)
            title = f"Ensembles with {names} (outside checks)"
        write_section(title, "\n".join(lines))


if __name__ == "__main__":
    main()
