"""Our 3D/2D inference against MONAI's ``sliding_window_inference`` on the full BraTS sample exam.

Run from the repository root (about 3 minutes on 2 CPU cores)::

    python benchmarks/bench_inference.py             # updates docs/BENCHMARKS.md (## Inference)
    python benchmarks/bench_inference.py --no-write  # prints the table only

Every case runs in its own subprocess, so that its peak RSS (``ru_maxrss``) is its own. The 3D
cases use one network (the bundled ``3d`` model by default, ``--weights random`` for a seeded
random ``UNet(3, features=...)``), the same window (the model card's unless ``--patch``), overlap,
Gaussian blending (sigma = patch / 8) and batch size, on ``torch.set_num_threads(2)``:

- ``monai``: the MONAI user's way: the exam z-scored over the brain (zeros outside, the same
  values as our model input), resampled to the model spacing, the whole volume through
  ``sliding_window_inference`` in float32, sigmoid, back to 1 mm, `probabilities_to_labels`.
  Timed: resampling + inference + sigmoid + labels.
- ``ours``: `napari_tumorseg.core.inference.segment` end to end (brain mask, crop, z-score,
  windows without brain skipped, map back on the full grid, labels) with its default precision
  (bfloat16 autocast on CPUs with native bfloat16, else float32). Timed: everything.
- ``ours-fp32``: the same with ``precision="float32"``.
- ``monai-crop``: MONAI, float32, on our cropped model input: the same windows as ours, so it
  separates what the window grid changes from what the arithmetic changes.
- ``ours-2d``: `segment` with the bundled ``2d`` model (random weights with ``--weights
  random``), slice by slice.

Labels are compared with `core.metrics.evaluate_labels` (Dice per region). Our labels are 0
outside the brain by design (``restrict_to_brain``), so MONAI's labels get the same brain mask.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAM = ROOT / "sample_data" / "brats2018"
SECTION = "## Inference"
CASES = ("monai", "ours", "ours-fp32", "monai-crop", "ours-2d")
FEATURES = (16, 32, 64, 128, 256)
WEIGHTS = "3d"


# --------------------------------------------------------------------------- one case per process
def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from napari_tumorseg.core.inference import exam_to_channels
    from napari_tumorseg.core.io import read_exam

    channels = exam_to_channels(read_exam(EXAM))
    return torch, channels


def _network(spatial_dims: int):
    import torch

    from napari_tumorseg.core.unet import UNet

    if spatial_dims == 3 and WEIGHTS != "random":
        from napari_tumorseg.core.models import load_model

        return load_model(WEIGHTS).network
    torch.manual_seed(0)
    return UNet(spatial_dims, features=FEATURES).eval()


def _set_network(features: str | None, weights: str) -> None:
    global FEATURES, WEIGHTS
    if features:
        FEATURES = tuple(int(f) for f in features.split(","))
    WEIGHTS = weights


def _spacing() -> list[float]:
    """The model spacing: the trained model's card, or 1 mm for the random network."""
    if WEIGHTS == "random":
        return [1.0, 1.0, 1.0]
    from napari_tumorseg.core.models import load_model

    return [float(s) for s in load_model(WEIGHTS).card["spacing_mm"]]


def _model(spatial_dims: int, patch: int):
    from napari_tumorseg.core.models import TumorModel, load_model

    if WEIGHTS != "random":
        if spatial_dims == 2:
            return load_model("2d")
        model = load_model(WEIGHTS)
        model.card = {**model.card, "patch_size": [patch] * 3}
        return model

    card = {
        "name": f"random{spatial_dims}d",
        "spatial_dims": spatial_dims,
        "patch_size": [patch] * spatial_dims,
        "spacing_mm": [1.0] * spatial_dims,
    }
    return TumorModel(network=_network(spatial_dims), card=card, path=Path("."))


def _monai_probabilities(torch, image: np.ndarray, network, args) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.from_numpy(image)[None],
            (args.patch,) * 3,
            args.batch_size,
            network,
            overlap=args.overlap,
            mode="gaussian",
        )
        return torch.sigmoid_(logits[0]).numpy()


def run_case(case: str, args, out: Path) -> dict:
    """Run one case; write its labels (and probabilities) under ``out``; return its figures."""
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.labels import probabilities_to_labels
    from napari_tumorseg.core.windows import plan_windows

    torch, channels = _setup(args)
    info: dict = {"case": case}
    if case.startswith("monai"):  # the model is loaded before the timer, as for ours
        spacing, network = _spacing(), _network(3)
    if case == "monai":
        # The whole volume, normalised as ours (z-score over the brain), at the model spacing.
        from napari_tumorseg.core.preprocess import (
            brain_mask,
            resample_array,
            target_shape,
            zscore,
        )

        start, cpu = time.perf_counter(), time.process_time()
        mask = brain_mask(channels.array)
        image = zscore(channels.array, mask)
        shape = target_shape(image.shape[1:], channels.spacing, spacing)
        image = resample_array(image, shape)
        probabilities = _monai_probabilities(torch, image, network, args)
        probabilities = resample_array(probabilities, channels.spatial_shape)
        labels = probabilities_to_labels(probabilities)
        info["seconds"] = time.perf_counter() - start
        info["cpu_seconds"] = time.process_time() - cpu
        info["windows"] = len(plan_windows(image.shape[1:], args.patch, args.overlap))
    elif case == "monai-crop":
        start, cpu = time.perf_counter(), time.process_time()
        from napari_tumorseg.core.preprocess import prepare

        prepared = prepare(channels.array, channels.spacing, spacing)
        crop = _monai_probabilities(torch, prepared.image, network, args) * prepared.mask
        probabilities = prepared.to_input_grid(crop)
        labels = probabilities_to_labels(probabilities)
        info["seconds"] = time.perf_counter() - start
        info["cpu_seconds"] = time.process_time() - cpu
        info["windows"] = len(plan_windows(prepared.image.shape[1:], args.patch, args.overlap))
        np.save(out / f"{case}_prob.npy", probabilities)
    elif case in ("ours", "ours-fp32", "ours-2d"):
        spatial_dims = 2 if case == "ours-2d" else 3
        model = _model(spatial_dims, args.patch)
        start, cpu = time.perf_counter(), time.process_time()
        generator = segment(
            channels,
            model,
            device="cpu",
            overlap=args.overlap,
            batch_size=args.batch_size if spatial_dims == 3 else None,
            precision="float32" if case == "ours-fp32" else "auto",
            # The 3D labels are compared with MONAI's, cut at 0.5: not at the card's thresholds.
            postprocess=spatial_dims == 2,
        )
        events = 0
        while True:
            try:
                event = next(generator)
                events += 1
            except StopIteration as stop:
                result = stop.value
                break
        info["seconds"] = time.perf_counter() - start
        info["cpu_seconds"] = time.process_time() - cpu
        info["windows"] = event.total
        info["events"] = events
        info["precision"] = result.precision
        labels = result.labels.array
        if spatial_dims == 3:
            np.save(out / f"{case}_prob.npy", result.probabilities.array)
    else:
        raise SystemExit(f"unknown case {case}")
    np.save(out / f"{case}_labels.npy", labels)
    info.setdefault("precision", "float32")
    info["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return info


# --------------------------------------------------------------------------- driver
def _spawn(case: str, args, out: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--tmp",
        str(out),
        "--patch",
        str(args.patch),
        "--overlap",
        str(args.overlap),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--features",
        ",".join(map(str, FEATURES)),
        "--weights",
        args.weights,
    ]
    print(f"running {case} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
    info = json.loads((out / f"{case}.json").read_text())
    print(f"  {info}", flush=True)
    return info


def region_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice of the WT, TC and ET regions of two label maps."""
    from napari_tumorseg.core.metrics import evaluate_labels

    scores = evaluate_labels(pred, ref, (1, 1, 1), hd95=False)
    return {region: s["dice"] for region, s in scores.items()}


def _fmt_dice(d: dict[str, float]) -> str:
    return " / ".join(f"{d[k]:.4f}" for k in ("WT", "TC", "ET"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, help="window edge (default: the model card's, or 96)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--features", help="U-Net widths, e.g. 4,8 for a smoke test")
    parser.add_argument(
        "--weights",
        default="3d",
        help="a 3D model name for load_model (default 3d) or 'random' (seeded random weights)",
    )
    parser.add_argument("--quick", action="store_true", help="skip the MONAI-on-our-crop check")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _set_network(args.features, args.weights)
    if args.patch is None:
        args.patch = 96
        if args.weights != "random":
            from napari_tumorseg.core.models import load_model

            args.patch = int(load_model(args.weights).card["patch_size"][0])

    if args.case:  # child process
        info = run_case(args.case, args, args.tmp)
        (args.tmp / f"{args.case}.json").write_text(json.dumps(info))
        return 0

    from napari_tumorseg.core.inference import exam_to_channels
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.preprocess import brain_mask

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        out = Path(tmp)
        cases = [c for c in CASES if not (args.quick and c == "monai-crop")]
        infos = {case: _spawn(case, args, out) for case in cases}
        labels = {case: np.load(out / f"{case}_labels.npy") for case in cases}
        # Ours are 0 outside the brain on the exam's grid (``restrict_to_brain``): MONAI's get
        # the same mask, on the whole volume and on our cropped input alike.
        brain = brain_mask(exam_to_channels(read_exam(EXAM)).array)
        for case in ("monai", "monai-crop"):
            if case in labels:
                labels[case] = labels[case] * brain
        differences = {}
        if "monai-crop" in cases:
            theirs = np.load(out / "monai-crop_prob.npy") * brain
            for case in ("ours", "ours-fp32"):
                differences[case] = float(np.abs(np.load(out / f"{case}_prob.npy") - theirs).max())
            del theirs
    load_after = os.getloadavg()[0]

    def row(name: str, case: str) -> str:
        info = infos[case]
        windows = f"{info['windows']} slices" if case == "ours-2d" else info["windows"]
        full = same = "-"
        if case in ("ours", "ours-fp32"):
            full = _fmt_dice(region_dice(labels[case], labels["monai"]))
        if case in ("ours", "ours-fp32") and "monai-crop" in infos:
            same = (
                f"{_fmt_dice(region_dice(labels[case], labels['monai-crop']))} "
                f"(max abs p difference {differences[case]:.1e})"
            )
        crop = infos.get("monai-crop")
        speed_same = f"{crop['cpu_seconds'] / info['cpu_seconds']:.2f}x" if crop else "-"
        return (
            f"| {name} | {info['precision']} | {windows} | {info['cpu_seconds']:.1f} | "
            f"{base_cpu / info['cpu_seconds']:.2f}x | {speed_same} | {info['seconds']:.1f} | "
            f"{info['peak_rss_gb']:.2f} | {full} | {same} |"
        )

    base_cpu = infos["monai"]["cpu_seconds"]
    shape = "x".join(map(str, labels["monai"].shape))
    network = (
        f"seeded random `UNet(3, features={FEATURES})`"
        if args.weights == "random"
        else f"the bundled `{args.weights}` model"
    )
    lines = [
        SECTION,
        "",
        "Command (repository root, 2 CPU cores, no GPU):",
        "",
        "```",
        f"python benchmarks/bench_inference.py --weights {args.weights} --patch {args.patch} "
        f"--overlap {args.overlap} --batch-size {args.batch_size} --threads {args.threads}"
        + (" --quick" if args.quick else ""),
        "```",
        "",
        f"Sample exam `sample_data/brats2018` (4 x {shape}, 1 mm). 3D rows: {network} at "
        f"{_spacing()[0]:g} mm, window {args.patch}^3, overlap {args.overlap}, Gaussian "
        f"blending (sigma = patch/8), batch {args.batch_size}, "
        f"`torch.set_num_threads({args.threads})`, CPU "
        f"({platform.processor() or platform.machine()}; native bfloat16: "
        f"{'yes' if _native_bf16() else 'no'}). Each case runs in its own process; peak RSS "
        "is that process's `ru_maxrss` (Python, torch, the exam and all). Every case is timed "
        "from the exam's arrays to the label map, preprocessing included (brain mask, "
        "z-score, crop where it crops, resampling both ways). CPU seconds "
        "(`time.process_time()` of the timed part, all threads) give the speed ratios; load "
        f"average {load_before:.1f} before, {load_after:.1f} after.",
        "",
        "| case | arithmetic | windows | CPU s | speed vs MONAI, whole volume | "
        "speed vs MONAI, same windows | wall s | peak RSS (GB) | "
        "Dice WT / TC / ET vs MONAI, whole volume | Dice WT / TC / ET vs MONAI, same windows |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row("MONAI `sliding_window_inference`, whole volume", "monai"),
        row("ours: `segment` (brain box, windows without brain skipped)", "ours"),
        row('ours, `precision="float32"`', "ours-fp32"),
    ]
    if "monai-crop" in infos:
        lines.append(row("MONAI on our cropped input (our windows)", "monai-crop"))
    lines += [
        row("ours 2D: `segment`, slice by slice", "ours-2d"),
        "",
        f"- Windows: the brain box ({'x'.join(map(str, _brain_box_shape(brain)))} voxels at "
        f"1 mm) needs {infos['ours']['windows']} windows where the whole volume needs "
        f"{infos['monai']['windows']}. A window's output depends on everything it sees "
        "(instance normalisation, receptive field), so a different window grid changes some "
        "labels even in float32 (the whole-volume Dice column); on the same windows our blend "
        "is MONAI's (`tests/core/test_inference.py`: within 1e-4).",
        "- Arithmetic: bfloat16 autocast where the CPU has native bfloat16 (the 2D model was "
        "trained in it, the 3D model partly); elsewhere `segment` runs float32 and the "
        "bfloat16 row equals the float32 one. Every case loads its model before its timer.",
        "",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        write_section("Inference", table)
        print(f"updated {DOC}")
    print(f"({platform.processor() or platform.machine()}, python {platform.python_version()})")
    return 0


def _native_bf16() -> bool:
    from napari_tumorseg.core.devices import cpu_bf16_is_fast

    return cpu_bf16_is_fast()


def _brain_box_shape(mask: np.ndarray) -> tuple[int, ...]:
    from napari_tumorseg.core.preprocess import bounding_box

    return tuple(s.stop - s.start for s in bounding_box(mask))


if __name__ == "__main__":
    sys.exit(main())
