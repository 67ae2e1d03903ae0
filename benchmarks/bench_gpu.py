"""GPU figures in one run: inference, training steps and fine-tuning on CUDA, beside MONAI.

    python benchmarks/bench_gpu.py               # updates docs/BENCHMARKS.md (## GPU)
    python benchmarks/bench_gpu.py --no-write    # prints the section only

Needs a CUDA GPU (exits with a message otherwise). Everything runs in this one process, on the
labelled sample exam, with the bundled models:

- Inference (the CPU benchmark's cases, on the GPU): MONAI ``sliding_window_inference`` over the
  whole volume and over our cropped input (the same windows as ours), in float32 and under
  float16 autocast (MONAI's tutorials use AMP on CUDA); ours (`segment`, default float16
  autocast on CUDA), ours in float32, ours with mirroring TTA, ours 2D. Each case is timed from
  the exam's arrays to the label map (as on the CPU), one warm-up call, then the median of
  ``--repeats``; peak GPU memory is ``torch.cuda.max_memory_allocated`` of the timed calls.
- The out-of-memory fallback: with the process limited to a sliver of the GPU
  (``torch.cuda.set_per_process_memory_fraction``) a real CUDA out-of-memory error is raised;
  `segment` must warn, finish on the CPU and give the same labels.
- Training: seconds per iteration of our loop (`train_steps`, float32 and bfloat16 autocast)
  beside a MONAI loop (float32 and float16 AMP with a GradScaler, as MONAI's tutorials), the same
  network, loss and batch (patches of the sample exam).
- Fine-tuning: the simulated user of ``bench_finetune.py`` (expert labels on 3 axial slices of the
  sample) and ``--finetune-seconds`` of "adapt" and "keep" on the GPU; Dice WT/TC/ET on the
  uncorrected slices before and after, and the steps done.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import DOC, write_section  # noqa: E402
from bench_finetune import simulate_user  # noqa: E402
from bench_inference import region_dice  # noqa: E402

EXAM = ROOT / "sample_data" / "brats2018"
REGIONS = ("WT", "TC", "ET")
DEVICE = "cuda"  # --device cpu: a smoke test of this script on a machine without a GPU


def _sync(torch):
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak(torch):
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(torch) -> float:
    return torch.cuda.max_memory_allocated() / 1024**3 if DEVICE == "cuda" else float("nan")


def timed(torch, fn, repeats: int) -> tuple[float, float, object]:
    """(median wall seconds, peak GPU GB, last result) of ``fn()`` after one warm-up call."""
    fn()
    _sync(torch)
    _reset_peak(torch)
    times, result = [], None
    for _ in range(repeats):
        _sync(torch)
        start = time.perf_counter()
        result = fn()
        _sync(torch)
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_gb(torch), result


def fmt(d: dict[str, float], digits: int = 4) -> str:
    return " / ".join(f"{d[r]:.{digits}f}" for r in REGIONS)


# --------------------------------------------------------------------------- inference
def inference_rows(torch, args) -> tuple[list[str], list[str]]:
    from monai.inferers import sliding_window_inference

    from napari_tumorseg.core.inference import exam_to_channels, segment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.labels import probabilities_to_labels
    from napari_tumorseg.core.models import load_model
    from napari_tumorseg.core.preprocess import (
        brain_mask,
        prepare,
        resample_array,
        target_shape,
        zscore,
    )
    from napari_tumorseg.core.windows import plan_windows

    channels = exam_to_channels(read_exam(EXAM))
    model3d, model2d = load_model("3d"), load_model("2d")
    spacing = [float(s) for s in model3d.card["spacing_mm"]]
    patch = int(model3d.card["patch_size"][0])
    network = model3d.network.to(DEVICE).eval()
    brain = brain_mask(channels.array)

    def monai_probabilities(image: np.ndarray, half: bool) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(DEVICE, torch.float16, enabled=half):
            logits = sliding_window_inference(
                torch.from_numpy(image)[None].to(DEVICE),
                (patch,) * 3,
                args.batch_size,
                network,
                overlap=args.overlap,
                mode="gaussian",
            )
            return torch.sigmoid(logits[0].float()).cpu().numpy()

    def monai_whole(half: bool):
        def run():
            mask = brain_mask(channels.array)
            image = zscore(channels.array, mask)
            image = resample_array(image, target_shape(image.shape[1:], channels.spacing, spacing))
            probabilities = resample_array(monai_probabilities(image, half), channels.spatial_shape)
            return probabilities_to_labels(probabilities) * brain

        return run

    def monai_crop(half: bool):
        def run():
            prepared = prepare(channels.array, channels.spacing, spacing)
            crop = monai_probabilities(prepared.image, half) * prepared.mask
            return probabilities_to_labels(prepared.to_input_grid(crop))

        return run

    def ours(model, **kwargs):
        # Labels cut at 0.5 as MONAI's (not at the card's thresholds), to compare them.
        kwargs.setdefault("postprocess", model.card["spatial_dims"] == 2)

        def run():
            return run_to_end(
                segment(
                    channels, model, device=DEVICE, overlap=args.overlap, batch_size=None, **kwargs
                )
            )

        return run

    prepared = prepare(channels.array, channels.spacing, spacing)
    whole_shape = target_shape(channels.spatial_shape, channels.spacing, spacing)
    n_crop = len(plan_windows(prepared.image.shape[1:], patch, args.overlap))
    n_whole = len(plan_windows(tuple(whole_shape), patch, args.overlap))
    cases = [
        ("MONAI `sliding_window_inference`, whole volume", "float32", n_whole, monai_whole(False)),
        ("MONAI, whole volume, AMP", "float16 autocast", n_whole, monai_whole(True)),
        ("MONAI on our cropped input (our windows)", "float32", n_crop, monai_crop(False)),
        ("MONAI on our cropped input, AMP", "float16 autocast", n_crop, monai_crop(True)),
        ("ours: `segment` (default)", None, n_crop, ours(model3d)),
        ('ours, `precision="float32"`', None, n_crop, ours(model3d, precision="float32")),
        ("ours, mirroring TTA", None, f"{n_crop} x 8 flips", ours(model3d, tta=True)),
        ("ours 2D: `segment`, slice by slice", None, "axial slices", ours(model2d)),
    ]
    results = {}
    for name, precision, windows, fn in cases:
        print(f"inference: {name} ...", flush=True)
        seconds, peak, out = timed(torch, fn, args.repeats)
        if precision is None:  # one of ours: a SegmentationResult
            if not out.device.startswith(DEVICE):
                raise SystemExit(f"{name} ended on {out.device}, not on the GPU")
            precision, labels = out.precision, out.labels.array
        else:
            labels = out
        results[name] = (precision, windows, seconds, peak, labels)
        print(f"  {seconds:.3f} s, {peak:.2f} GB", flush=True)

    base = results["MONAI `sliding_window_inference`, whole volume"][2]
    same32 = results["MONAI on our cropped input (our windows)"]
    same16 = results["MONAI on our cropped input, AMP"]
    rows = [
        "| case | arithmetic | windows | wall s (median) | speed vs MONAI float32, whole "
        "volume | speed vs MONAI on our windows, same arithmetic | peak GPU memory (GB) | "
        "Dice WT / TC / ET vs MONAI float32 on our windows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (precision, windows, seconds, peak, labels) in results.items():
        speed_same, dice = "-", "-"
        if name.startswith("ours") and "2D" not in name and "TTA" not in name:
            same = same32 if precision == "float32" else same16
            speed_same = f"{same[2] / seconds:.2f}x"
            dice = fmt(region_dice(labels, same32[4]))
        rows.append(
            f"| {name} | {precision} | {windows} | {seconds:.3f} | {base / seconds:.2f}x | "
            f"{speed_same} | {peak:.2f} | {dice} |"
        )

    if args.profile:  # where the time of one of our runs goes (printed, not written)
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(cases[4][3])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    network.cpu()
    if DEVICE != "cuda":
        return rows, []
    # The out-of-memory fallback, with a real CUDA out-of-memory error.
    reference = results['ours, `precision="float32"`'][4]
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(256 * 1024**2 / total)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            fallback = run_to_end(
                segment(
                    channels,
                    model3d,
                    device="cuda",
                    overlap=args.overlap,
                    precision="float32",
                    postprocess=False,
                )
            )
            fallback_seconds = time.perf_counter() - start
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    oom = [
        "Out-of-memory fallback: the process limited to 256 MB of the GPU "
        "(`torch.cuda.set_per_process_memory_fraction`), `segment(device='cuda', "
        f"precision='float32')`: {len(messages)} warning(s)"
        + (f' ("{messages[0][:140]}")' if messages else "")
        + f", finished on the CPU in {fallback_seconds:.1f} s, Dice WT / TC / ET against the "
        f"float32 GPU run {fmt(region_dice(fallback.labels.array, reference))}.",
    ]
    print(oom[0], flush=True)
    return rows, oom


# --------------------------------------------------------------------------- training
def training_rows(torch, args) -> list[str]:
    from monai.losses import DiceLoss

    from napari_tumorseg.core.augment import JointAugment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.training import PatchSampler, cache_exam, train_steps
    from napari_tumorseg.core.unet import UNet

    cached = cache_exam(read_exam(EXAM), [1.5, 1.5, 1.5])
    patch = (args.train_patch,) * 3
    rows = [
        f"| loop (batch {args.batch} x {args.train_patch}^3) | arithmetic | s / iteration "
        "(median) | speed vs MONAI float32 | peak GPU memory (GB) |",
        "|---|---|---|---|---|",
    ]
    figures = {}
    for case in ("monai", "monai-amp", "ours", "ours-bf16"):
        print(f"training: {case} ...", flush=True)
        torch.manual_seed(0)
        network = UNet(3, features=(16, 32, 64, 128, 256)).to(DEVICE)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        sampler = iter(PatchSampler([cached], patch, batch_size=args.batch, seed=0))
        times = []
        _reset_peak(torch)
        if case.startswith("ours"):
            steps = train_steps(
                network,
                sampler,
                optimizer,
                lambda step, elapsed: 1e-3,
                max_steps=args.iterations,
                augment=JointAugment(seed=0),
                device=DEVICE,
                bf16=case == "ours-bf16",
            )
            last = time.perf_counter()
            for _ in steps:  # each step reads its loss: synchronised
                now = time.perf_counter()
                times.append(now - last)
                last = now
        else:
            dice = DiceLoss(sigmoid=True, squared_pred=True, batch=True)
            bce = torch.nn.BCEWithLogitsLoss()
            amp = case == "monai-amp"
            scaler = torch.amp.GradScaler(DEVICE, enabled=amp and DEVICE == "cuda")
            network.train()
            last = time.perf_counter()
            for _ in range(args.iterations):
                image, label = (t.to(DEVICE).float() for t in next(sampler)[:2])
                flips = [d for d in (2, 3, 4) if torch.rand(()) < 0.5]
                if flips:
                    image, label = image.flip(flips), label.flip(flips)
                with torch.autocast(DEVICE, torch.float16, enabled=amp and DEVICE == "cuda"):
                    logits = network(image)
                    loss = dice(logits, label) + bce(logits, label)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                float(loss)
                now = time.perf_counter()
                times.append(now - last)
                last = now
        figures[case] = (statistics.median(times[min(3, len(times) - 1) :]), _peak_gb(torch))
        print(f"  {figures[case]}", flush=True)
    names = {
        "monai": ("MONAI loop (flips, DiceLoss + BCE)", "float32"),
        "monai-amp": ("MONAI loop, AMP + GradScaler", "float16 autocast"),
        "ours": ("ours: sampler + joint augmentation + `train_steps`", "float32"),
        "ours-bf16": ("ours (default on CUDA with bfloat16)", "bfloat16 autocast"),
    }
    base = figures["monai"][0]
    for case, (seconds, peak) in figures.items():
        name, arithmetic = names[case]
        rows.append(
            f"| {name} | {arithmetic} | {seconds:.3f} | {base / seconds:.2f}x | {peak:.2f} |"
        )
    return rows


# --------------------------------------------------------------------------- fine-tuning
def finetune_rows(torch, args) -> list[str]:
    from napari_tumorseg.core.finetune import finetune
    from napari_tumorseg.core.inference import segment
    from napari_tumorseg.core.io import read_exam
    from napari_tumorseg.core.jobs import run_to_end
    from napari_tumorseg.core.models import load_model

    exam = read_exam(EXAM)
    base = load_model("3d")
    expert = exam.labels.array

    def predict(model):
        return run_to_end(segment(exam, model, device=DEVICE)).labels.array

    before_labels = predict(base)
    corrected, edited, chosen = simulate_user(expert, before_labels)
    keep = np.ones(expert.shape[0], bool)
    keep[chosen] = False

    def dice(pred):
        return region_dice(pred[keep], expert[keep])

    before = dice(before_labels)
    rows = [
        "| mode | steps in the budget | uncorrected slices, before | after | WT change |",
        "|---|---|---|---|---|",
    ]
    for mode in ("adapt", "keep"):
        print(f"fine-tuning: {mode} ...", flush=True)
        result = run_to_end(
            finetune(
                base,
                exam,
                corrected,
                edited,
                mode=mode,
                seconds=args.finetune_seconds,
                device=DEVICE,
                seed=0,
            )
        )
        tuned = result.model(base)
        after = dice(predict(tuned))
        rows.append(
            f"| {mode} | {result.steps} | {fmt(before, 3)} | {fmt(after, 3)} | "
            f"{after['WT'] - before['WT']:+.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2, help="MONAI's windows per batch")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations per loop")
    parser.add_argument("--train-patch", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2, help="training batch")
    parser.add_argument("--finetune-seconds", type=float, default=60.0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "finetune"])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a profile of one run")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":  # smoke test: the figures mean nothing and are not written
        args.no_write = True
        props = None
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA GPU is visible to this torch build; nothing to do")
    else:
        props = torch.cuda.get_device_properties(0)
    device = (
        (f"{props.name}, {props.total_memory / 1024**3:.0f} GB" if props else "CPU smoke test")
        + f", torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"{torch.get_num_threads()} CPU threads, Python {platform.python_version()}"
    )
    print(device, flush=True)
    started = time.perf_counter()
    inference, oom = inference_rows(torch, args)
    training = [] if "train" in args.skip else training_rows(torch, args)
    tuning = [] if "finetune" in args.skip else finetune_rows(torch, args)
    command = "python benchmarks/bench_gpu.py" + (
        f" --skip {' '.join(args.skip)}" if args.skip else ""
    )
    lines = [
        "## GPU",
        "",
        f"Command: `{command}` (defaults: {args.repeats} repeats after a warm-up, overlap "
        f"{args.overlap}, MONAI batch {args.batch_size}, training {args.iterations} iterations, "
        f"fine-tuning {args.finetune_seconds:g} s). Machine: {device}. The whole run took "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "Inference on the labelled sample (4 x 155 x 240 x 240), the bundled `3d` model (window "
        "112^3 at 1.5 mm, Gaussian blending) and `2d` model, timed from the exam's arrays to "
        "the label map:",
        "",
        *inference,
        "",
        *oom,
        "",
    ]
    if training:
        lines += ["Training steps (UNet(3, features=(16, 32, 64, 128, 256))):", "", *training, ""]
    if tuning:
        lines += [
            "Fine-tuning on the sample exam (the simulated user of `bench_finetune.py`: expert "
            f"labels on 3 axial slices), {args.finetune_seconds:g} s on the GPU, Dice WT / TC / ET "
            "on the uncorrected slices:",
            "",
            *tuning,
            "",
        ]
    section = "\n".join(lines)
    print("\n" + section)
    if not args.no_write:
        write_section("GPU", section)
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
