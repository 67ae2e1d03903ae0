"""Time and effect of "adapt to this exam" (the exam head) with each bundled model.

    python benchmarks/bench_adapt.py [--threads 2]

The labelled sample; the simulated user of bench_finetune.py corrects 3 axial slices with the
expert labels. Prints, per model: the segmentation time, the time of ``finetune(mode="adapt")``
(the parent's segmentation, the head's features and fit), the time of the re-segmentation with
the head, and WT / TC / ET Dice and HD95 on the uncorrected slices before and after. Quoted in the
"Fine-tuning" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_finetune import EXAMS, simulate_user  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from napari_tumorseg.core.finetune import finetune
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.metrics import evaluate_labels
    from napari_tumorseg.core.models import load_model

    torch.set_num_threads(args.threads)
    exam = read_exam(EXAMS["Brats18_TCIA01_378_1"])

    def timed(generator):
        started = time.perf_counter()
        return run_to_end(generator), time.perf_counter() - started

    for name in ("3d", "2d"):
        model = load_model(name)
        before, t_segment = timed(segment(exam, model, device="cpu"))
        corrected, edited, chosen = simulate_user(exam.labels.array, before.labels.array)
        keep = np.ones(edited.shape[0], bool)
        keep[chosen] = False
        adapted, t_adapt = timed(finetune(model, exam, corrected, edited, mode="adapt"))
        after, t_again = timed(segment(exam, adapted.model(model), device="cpu"))

        def scores(labels, keep=keep):
            found = evaluate_labels(labels[keep], exam.labels.array[keep], exam.reference.spacing)
            dice = " / ".join(f"{s['dice']:.3f}" for s in found.values())
            hd95 = " / ".join(f"{s['hd95_mm']:.1f}" for s in found.values())
            return f"Dice {dice}, HD95 {hd95} mm"

        print(
            f"{name}: segment {t_segment:.1f} s; adapt {t_adapt:.1f} s; re-segment with the "
            f"head {t_again:.1f} s; uncorrected slices, WT / TC / ET: before "
            f"{scores(before.labels.array)}; after {scores(after.labels.array)}"
        )


if __name__ == "__main__":
    main()
