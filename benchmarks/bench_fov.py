"""Does a model's label map move with where its windows fall?

    python benchmarks/bench_fov.py --model 3d --data ../shared/data/brats2018/train \
        [--exams A,B] [--threads 2] [--no-write]
    python benchmarks/bench_fov.py --recipe 2d-bn [--folds 0] ...

With ``--recipe`` each fold model of that cross-validation recipe (`scripts/cross_validate.py
train`) runs over its own held-out exams: the goal's "every CV exam".

The exam is prepared as `segment` prepares it (brain box, model spacing, z-scores), then the
network runs over the same brain with its windows placed five ways, on the model grid:
(a) over the brain box -- what `segment` does --, (b) over the exam's whole volume, (c) over
the whole volume padded by 20 voxels (of the exam's grid) per side and (c') cropped by 20 per
side, (d) over the brain box with the window grid shifted by half a window, and (fit) as one
window holding the whole brain box. Zeros fill whatever lies outside the brain box, as in the
exam (skull-stripped). WT Dice between every pair of label maps (the card's WT threshold) is
the measure: a model whose labels hold still gives 1 everywhere. Writes "Field of view" in
docs/BENCHMARKS.md.

A recipe's 27 exams take an hour or more on 2 cores: each exam's figures are kept under
runs/fov/<fingerprint of the model and the inference code>/ as they come, and a rerun of the
same command takes them from there (``--fresh`` measures everything again).

A 2D model sees whole axial slices, one at a time: (a)-(c') pad or crop each slice in-plane
(Y, X) as above; it has no window grid to shift, (d), nor a window to fit.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _report import write_section  # noqa: E402
from cross_validate import exam_names, fold_dir, make_folds  # noqa: E402

from napari_tumorseg.core.inference import exam_to_channels, model_grid_spacing, slice_context
from napari_tumorseg.core.io import SEQUENCES, read_exam
from napari_tumorseg.core.jobs import run_to_end
from napari_tumorseg.core.labels import region_thresholds
from napari_tumorseg.core.metrics import region_scores
from napari_tumorseg.core.models import load_model, load_model_folder
from napari_tumorseg.core.preprocess import prepare
from napari_tumorseg.core.slices import slice_inference
from napari_tumorseg.core.sliding import sliding_window

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "fov"
VARIANTS = ("a", "b", "c", "c'", "d", "fit")
NAMES = {
    "a": "(a) brain box",
    "b": "(b) whole volume",
    "c": "(c) padded by 20",
    "c'": "(c') cropped by 20",
    "d": "(d) grid shifted by half a window",
    "fit": "one fitted window",
}


NOTE = (
    "What a user gets does not depend on the exam's field of view: `segment` always lays its "
    "windows over the brain's own box, (a), so the same exam padded or cropped around the "
    "brain gets exactly the same labels (`tests/core/test_inference.py`, with and without "
    "`window='fit'`). The table measures the network itself: its output depends on what else "
    "a window holds (instance normalisation over more or less background), so a grid shifted "
    "by half a window or laid over more background moves WT labels. That is for training to "
    "fix (patches that look like inference windows); `segment(window='fit')` removes the grid "
    "altogether: one window holding the brain box."
)


NOTE_2D = (
    "What a user gets does not depend on the exam's field of view: `segment` always crops the "
    "slices to the brain's own box, (a). The table measures the network itself: each slice's "
    "features are normalised over the whole slice ({norm} normalisation), so more or less "
    "background around the brain can move its labels."
)


NOTE_2D_BATCH = (
    "What a user gets does not depend on the exam's field of view: `segment` always crops the "
    "slices to the brain's own box, (a). The table measures the network itself: batch norm "
    "normalises with statistics fixed at training, so a voxel's output depends only on what "
    "lies within the network's receptive field; each slice is given {context:g} mm of "
    "background on every side (card `context_mm`) whatever its crop, placed so that the "
    "network's down-sampling meets the brain at one phase (the brain's first row and column "
    "on a multiple of the down-sampling, `slice_inference`). What still differs between crops "
    "is how far the slice's edge lies from the brain (zeros at the edge are not the features "
    "of background): {context:g} mm in (a), more in the others."
)


def note(model) -> str:
    if model.card["spatial_dims"] == 3:
        return NOTE
    norm = model.network.config.get("norm", "instance")
    if norm == "batch":
        return NOTE_2D_BATCH.format(context=float(model.card.get("context_mm", 0)))
    return NOTE_2D.format(norm=norm)


def pads(variant: str, prepared, exam_shape, spacing, model_spacing, patch, divisor):
    """Zeros before and after the brain box on each model-grid axis, and the window."""
    scale = [s / m for s, m in zip(spacing, model_spacing)]
    shape = prepared.image.shape[1:]
    # Where the brain box lies in the whole volume, in model voxels.
    before = [round(b.start * f) for b, f in zip(prepared.box, scale)]
    after = [round((n - b.stop) * f) for b, n, f in zip(prepared.box, exam_shape, scale)]
    twenty = [round(20 * f) for f in scale]
    if variant == "a":
        return [0] * 3, [0] * 3, patch
    if variant == "b":
        return before, after, patch
    if variant == "c":
        return (
            [b + t for b, t in zip(before, twenty)],
            [a + t for a, t in zip(after, twenty)],
            patch,
        )
    if variant == "c'":
        return (
            [max(b - t, 0) for b, t in zip(before, twenty)],
            [max(a - t, 0) for a, t in zip(after, twenty)],
            patch,
        )
    if variant == "d":
        return [p // 2 for p in patch], [0] * 3, patch
    if variant == "fit":
        return [0] * 3, [0] * 3, [-(-n // divisor) * divisor for n in shape]
    raise ValueError(variant)


def wt_maps(model, exam) -> dict[str, tuple[np.ndarray, float]]:
    """Each variant's WT mask on the brain box (model grid) and its seconds."""
    channels = exam_to_channels(exam)
    card = model.card
    present = [SEQUENCES.index(s) for s in (channels.channels or SEQUENCES)]
    # As `segment` prepares it: the brain's own box, the model's grid.
    spacing = model_grid_spacing(card, channels.spacing)
    prepared = prepare(channels.array, channels.spacing, spacing, present=present, margin=0)
    threshold = region_thresholds((card.get("postprocess") or {}).get("thresholds", 0.5))[0]
    shape = prepared.image.shape[1:]
    flat = card["spatial_dims"] == 2
    out = {}
    for variant in variants(model):
        lo, hi, patch = pads(
            variant,
            prepared,
            channels.array.shape[1:],
            channels.spacing,
            spacing,
            list(card["patch_size"]),
            model.network.divisor,
        )
        if flat:  # whole slices: pad or crop in-plane only
            lo, hi = [0, *lo[1:]], [0, *hi[1:]]
        width = [(0, 0), *zip(lo, hi)]
        image = np.pad(prepared.image, width)
        mask = np.pad(prepared.mask, width[1:])
        started = time.perf_counter()
        if flat:
            engine = slice_inference(model.network, image, mask=mask, context=slice_context(card))
        else:
            engine = sliding_window(model.network, image, patch, mask=mask, batch_size=1)
        maps = run_to_end(engine)
        seconds = time.perf_counter() - started
        inner = tuple(slice(a, a + n) for a, n in zip(lo, shape))
        out[variant] = ((maps[0][inner] > threshold) & prepared.mask, seconds)
    return out


def variants(model) -> tuple[str, ...]:
    """The placements a model has: a 2D model has no window grid to shift or fit."""
    return VARIANTS if model.card["spatial_dims"] == 3 else ("a", "b", "c", "c'")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return region_scores(a, b, (1, 1, 1), hd95=False)["dice"]


#: The code whose change moves the figures: cached figures of older code are not reused.
ENGINE = ("inference", "predictor", "preprocess", "slices", "sliding", "unet", "windows")


def fingerprint(model) -> str:
    """The model's card and weights and the inference code, hashed: cached figures belong to
    this model run by this code."""
    digest = hashlib.sha256(json.dumps(model.card, sort_keys=True, default=str).encode())
    for weights in sorted(model.path.glob("*.safetensors")):
        digest.update(weights.read_bytes())
    core = Path(slice_inference.__code__.co_filename).parent
    for name in ENGINE:
        digest.update((core / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def measure(model, exam_dir: Path, cache: Path, reuse: bool = True) -> tuple[dict, dict]:
    """WT Dice of every pair of placements (keys "a|b"; "a|fit" too) and each placement's
    seconds, from ``cache`` when it holds them (and ``reuse``), else measured and stored."""
    stored = cache / f"{exam_dir.name}.json"
    if reuse and stored.is_file():
        figures = json.loads(stored.read_text())
        return figures["scores"], figures["seconds"]
    maps = wt_maps(model, read_exam(exam_dir))
    placed = list(maps)
    compared = [v for v in placed if v != "fit"]
    pairs = list(itertools.combinations(compared, 2)) + [("a", "fit")] * ("fit" in placed)
    scores = {f"{a}|{b}": dice(maps[a][0], maps[b][0]) for a, b in pairs}
    seconds = {v: maps[v][1] for v in placed}
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps({"scores": scores, "seconds": seconds}, indent=1))
    return scores, seconds


def _what(args: argparse.Namespace) -> str:
    if not args.recipe:
        return f"--model {args.model}"
    return f"--recipe {args.recipe}" + (f" --folds {args.folds}" if args.folds else "")


def _runs(args: argparse.Namespace):
    """(exam name, model) pairs: ``--model`` over ``--exams`` (default: every exam), or each
    finished fold model of ``--recipe`` over its held-out exams."""
    wanted = [n for n in args.exams.split(",") if n]
    if not args.recipe:
        model = load_model(args.model)
        for name in wanted or sorted(f.name for f in args.data.iterdir() if f.is_dir()):
            yield name, model
        return
    folds = make_folds(exam_names(args.data))
    chosen = [int(k) for k in args.folds.split(",")] if args.folds else range(len(folds))
    for k in chosen:
        folder = fold_dir(args.recipe, k) / "model"
        if not (folder / "card.json").is_file():
            print(f"fold {k} of {args.recipe} has no model yet: left out")
            continue
        model = load_model_folder(folder)
        for name in folds[k]:
            if not wanted or name in wanted:
                yield name, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="3d")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/brats2018/train")
    p.add_argument("--exams", default="", help="comma-separated case folders (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe", default="", help="each fold model on its held-out exams")
    p.add_argument("--folds", default="", help="with --recipe: e.g. 0,1 (default: all finished)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--fresh", action="store_true", help="measure again what runs/fov holds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = list(_runs(args))
    if not runs:
        sys.exit(
            f"no finished fold model of {args.recipe}: run scripts/cross_validate.py first"
            if args.recipe
            else f"no exam to measure in {args.data}"
        )
    placed = variants(runs[0][1])
    compared = [v for v in placed if v != "fit"]
    pairs = list(itertools.combinations(compared, 2))
    rows, worst, seconds = [], {}, {v: [] for v in placed}
    for name, model in runs:
        figures, times = measure(
            model, args.data / name, CACHE / fingerprint(model), reuse=not args.fresh
        )
        scores = {pair: figures[f"{pair[0]}|{pair[1]}"] for pair in pairs}
        for v in placed:
            seconds[v].append(times[v])
        low = min(scores, key=scores.get)
        worst[name] = scores[low]
        rows.append(
            f"| {name} | {scores[low]:.4f} ({low[0]} vs {low[1]}) | "
            + " | ".join(f"{scores[('a', v)]:.4f}" for v in compared[1:])
            + (f" | {figures['a|fit']:.4f}" if "fit" in placed else "")
            + " |"
        )
        print(rows[-1], flush=True)
    mean_s = {v: float(np.mean(s)) for v, s in seconds.items()}
    body = "\n".join(
        [
            f"`python benchmarks/bench_fov.py {_what(args)} --data {args.data} "
            f"--threads {args.threads}"
            + (f" --exams {args.exams}" if args.exams else "")
            + f"` ({len(worst)} exams, {torch.get_num_threads()} threads). "
            "WT Dice between the label maps of the same network run with its windows placed in "
            "different ways (see the script's docstring); goal: at least 0.98 between every "
            "pair of (a)-(d), on every exam.",
            "",
            "| exam | lowest pair | "
            + " | ".join(f"(a) vs ({v})" for v in compared[1:])
            + (" | (a) vs one fitted window" if "fit" in placed else "")
            + " |",
            "|---|---|" + "---|" * (len(compared) - 1 + ("fit" in placed)),
            *rows,
            "",
            f"Lowest pair over all exams: {min(worst.values()):.4f}; exams under 0.98: "
            f"{sum(v < 0.98 for v in worst.values())} of {len(worst)}. Mean seconds of the "
            "network per exam: " + ", ".join(f"{NAMES[v]} {mean_s[v]:.1f}" for v in placed) + ".",
            "",
            note(runs[0][1]),
        ]
    )
    if not args.no_write:
        title = f"{args.recipe} fold models" if args.recipe else f"{args.model} model"
        write_section(f"Field of view ({title})", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
