"""Brain extraction (HD-BET) on the raw clinical exam, and what it does to the segmentation.

The raw TCGA-FG-6692 exam (sample_data/tcga_raw: four scans as scanned, skull on) goes through
`pipeline.segment_exam` as `tumorseg segment --register --reference t1ce` would take it, with
``--brain-extraction on`` and ``off``, for each bundled model. The brain mask and the label
maps are brought into BraTS space (the exam's skull-stripped T1c there, affine registration of
the raw T1c to it) and compared with the skull-stripped brain and with the six-algorithm
fusion of ../shared/data/tcia/TCGA-FG-6692/brats_space (an outside check: nothing is chosen on
it).

    python benchmarks/bench_brain.py [--models 2d 3d]

Each step is timed: reading the four files, registration (with writing the outputs: the rest of
`segment_exam`'s time), brain extraction and segmentation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_description, write_section  # noqa: E402

SPACE = ROOT.parent / "shared" / "data" / "tcia" / "TCGA-FG-6692" / "brats_space"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["2d", "3d"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from napari_tumorseg.core.io import read_exam, read_volume
    from napari_tumorseg.core.metrics import evaluate_labels, region_scores
    from napari_tumorseg.core.registration import register, resample_to
    from napari_tumorseg.pipeline import segment_exam

    torch.set_num_threads(2)
    began = time.perf_counter()
    t1c = read_volume(SPACE / "TCGA-FG-6692_t1c_bet.nii.gz")
    fusion = read_volume(SPACE / "TCGA-FG-6692_brats2020_algorithm_fusion_seg.nii.gz")
    brain_ref = t1c.array > 0
    raw = read_exam(ROOT / "sample_data" / "tcga_raw")
    across = register(t1c, raw.scans["t1ce"], transform="affine")

    def to_space(volume):
        return resample_to(volume, t1c, across.transform, interpolation="nearest").array

    rows, brain_line = [], ""
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            for mode in ("on", "off"):
                started = time.perf_counter()
                exam = read_exam(ROOT / "sample_data" / "tcga_raw")
                read = time.perf_counter() - started
                outcome = segment_exam(
                    exam,
                    Path(folder) / f"{model}_{mode}.nii.gz",
                    model=model,
                    register=True,
                    reference="t1ce",
                    brain_extraction=mode,
                    log=lambda _: None,
                )
                extract = outcome.brain.seconds if outcome.brain is not None else 0.0
                segment = outcome.result.seconds
                total = time.perf_counter() - started
                seconds = (read, total - read - extract - segment, extract, segment, total)
                labels = to_space(outcome.result.labels)
                scores = evaluate_labels(labels, fusion.array, t1c.spacing)
                outside = int(np.count_nonzero((labels > 0) & ~brain_ref))
                rows.append((model, mode, seconds, scores, outside * t1c.voxel_volume_ml))
                print(rows[-1], flush=True)
                if outcome.brain is not None and not brain_line:
                    mask = to_space(outcome.brain.mask) > 0
                    dice = region_scores(mask, brain_ref, t1c.spacing)
                    brain_line = (
                        f"Brain mask (from the registered T1c, HD-BET fold 0, no mirroring): "
                        f"{outcome.brain.seconds:.1f} s, {outcome.brain.volume_ml:.0f} mL; "
                        f"against the skull-stripped brain in BraTS space Dice "
                        f"{dice['dice']:.3f}, HD95 {dice['hd95_mm']:.1f} mm (goal: Dice 0.90 "
                        "in 60 s)."
                    )
    lines = [
        f"Command: `python benchmarks/bench_brain.py --models {' '.join(args.models)}` (2 CPU "
        f"cores of {cpu_description()}; {time.perf_counter() - began:.0f} s in all). The raw "
        "TCGA-FG-6692 exam (skull on, sequences at their own positions) segmented as "
        "`tumorseg segment sample_data/tcga_raw --register --reference t1ce "
        "--brain-extraction on|off` does it; maps brought into BraTS space by an affine "
        f"registration of the raw T1c to the skull-stripped one (head overlap "
        f"{across.quality:.2f}). Reference: the six-algorithm fusion there (an outside check).",
        "",
        brain_line,
        "",
        "| model | brain extraction | read s | register (and write) s | extract s | segment s "
        "| total s | WT Dice | TC Dice | ET Dice | WT HD95 mm | tumour outside the brain, mL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {model} | {mode} | "
            + " | ".join(f"{t:.1f}" for t in seconds)
            + f" | {s['WT']['dice']:.3f} | {s['TC']['dice']:.3f} "
            f"| {s['ET']['dice']:.3f} | {s['WT']['hd95_mm']:.1f} | {outside:.1f} |"
            for model, mode, seconds, s, outside in rows
        ),
        "",
        "Goal (issue 24): WT Dice >= 0.75 against the fusion with brain extraction.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("Brain extraction", "\n".join(lines))


if __name__ == "__main__":
    main()
