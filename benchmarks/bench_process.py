"""The whole process: `tumorseg segment` on one exam against a MONAI user's script.

    python benchmarks/bench_process.py [--models 2d,3d] [--repeats 3] [--threads 2] [--no-write]

Each case is a fresh Python process, timed from its start to its exit (wall seconds, the
median of ``--repeats`` runs, cases interleaved so that the machine's drift falls on all of
them alike; CPU seconds are the children's user + system time): interpreter start, imports,
reading the four NIfTI scans of the sample exam, inference, writing the label map.

- ``tumorseg segment``: the CLI as a user runs it (`--model M`, its default precision: bfloat16
  autocast where the CPU has it natively, float32 elsewhere; the card's post-processing).
- ``MONAI, whole volume`` and ``MONAI, cropped``: `benchmarks/_monai_segment.py`, the script a
  MONAI user would write with the same network, weights, spacing and thresholds (MONAI's
  `SliceInferer` for a 2D model, `sliding_window_inference` for a 3D one; float32, MONAI's
  default), over the whole volume or over the box of its non-zero voxels (``--crop``).
- ``imports``: `python -c "import ..."` of what each side loads before any work, for scale.

The label maps of each MONAI case are compared with ours (Dice per region): they differ by our
post-processing and, for networks with instance normalisation, by how much background each
slice or window holds. Writes "Whole process" in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_description, run_timed, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAM = ROOT / "sample_data" / "brats2018"
MONAI_SCRIPT = Path(__file__).resolve().parent / "_monai_segment.py"
IMPORTS = {
    "ours": "import napari_tumorseg.cli, napari_tumorseg.pipeline",
    "monai": "import torch, nibabel, monai.inferers, monai.transforms, safetensors.torch",
}


def commands(model: str, threads: int, out: Path) -> dict[str, tuple[list[str], Path]]:
    """The cases of one model: name -> (command line, the label map it writes under ``out``)."""
    python = sys.executable
    ours = [python, "-m", "napari_tumorseg.cli", "segment", str(EXAM), "--model", model]
    monai = [python, str(MONAI_SCRIPT), str(EXAM)]
    options = ["--model", model, "--threads", str(threads)]
    mine, whole, cropped = (out / f"{kind}_{model}.nii.gz" for kind in ("ours", "monai", "crop"))
    return {
        "tumorseg segment": ([*ours, "--out", str(mine)], mine),
        "MONAI, whole volume": ([*monai, str(whole), *options], whole),
        "MONAI, cropped": ([*monai, str(cropped), *options, "--crop"], cropped),
    }


def agreement(ours: Path, theirs: Path) -> str:
    """Dice WT / TC / ET between two label maps on disk."""
    import nibabel as nib

    from napari_tumorseg.core.metrics import evaluate_labels

    a = np.asarray(nib.load(ours).dataobj)
    b = np.asarray(nib.load(theirs).dataobj)
    scores = evaluate_labels(a, b, (1.0, 1.0, 1.0))
    return " / ".join(f"{scores[r]['dice']:.3f}" for r in ("WT", "TC", "ET"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="2d,3d", help="comma-separated bundled models")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    # torch takes its thread count from OMP_NUM_THREADS: the same on both sides.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        outputs = {m: commands(m, args.threads, out) for m in models}
        cases = {(m, name): c for m, named in outputs.items() for name, (c, _) in named.items()}
        cases.update(
            {
                ("-", f"imports ({side})"): [sys.executable, "-c", code]
                for side, code in IMPORTS.items()
            }
        )
        walls: dict = {key: [] for key in cases}
        cpus: dict = {key: [] for key in cases}
        for repeat in range(args.repeats):
            for key, command in cases.items():
                wall, cpu = run_timed(command, env)
                walls[key].append(wall)
                cpus[key].append(cpu)
                print(
                    f"[{repeat + 1}/{args.repeats}] {key[0]} {key[1]}: {wall:.2f} s wall",
                    flush=True,
                )
        rows = []
        for model, named in outputs.items():
            ours = statistics.median(walls[(model, "tumorseg segment")])
            mine = named["tumorseg segment"][1]
            for name, (_, written) in named.items():
                wall = statistics.median(walls[(model, name)])
                cpu = statistics.median(cpus[(model, name)])
                labels = "-" if written == mine else agreement(mine, written)
                rows.append(
                    f"| {model} | {name} | {wall:.2f} | {cpu:.2f} | {wall / ours:.2f}x | {labels} |"
                )
        for side in IMPORTS:
            key = ("-", f"imports ({side})")
            rows.append(
                f"| - | {key[1]} | {statistics.median(walls[key]):.2f} | "
                f"{statistics.median(cpus[key]):.2f} | - | - |"
            )
    body = "\n".join(
        [
            f"`python benchmarks/bench_process.py --models {args.models} --repeats "
            f"{args.repeats} --threads {args.threads}` on the sample exam (4 x 155 x 240 x 240, "
            f"1 mm), {args.threads} threads ({cpu_description()}); median of {args.repeats} "
            "runs, each a fresh process timed from start to exit (see the script's docstring).",
            "",
            "| model | case | wall s | CPU s | our speed-up (its wall / ours) | Dice WT / TC / ET "
            "against ours |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("Whole process", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
