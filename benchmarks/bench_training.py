"""Seconds per training iteration and peak memory: our loop beside a MONAI loop, one run.

    python benchmarks/bench_training.py [--iterations 12] [--patch 64] [--batch 2]

Same network (UNet(3, features=(16, 32, 64, 128, 256)), instance norm), same batch of 64^3
patches from the cached training exams, same loss (soft Dice with squared terms + BCE):

- ours, float32: `core.training` (PatchSampler -> JointAugment -> train_steps), autocast off;
  the bundled models' augmentation, more than MONAI's transforms below (see the report);
- ours, bfloat16: the same loop under bfloat16 autocast, run only where the CPU has native
  bfloat16 (`core.training.cpu_bf16_is_fast`; the default there). On AVX2-only CPUs oneDNN's
  bf16 3D convolutions are far slower than float32, so the loop stays in float32 there;
- MONAI: `RandCropByPosNegLabeld` + `RandFlipd` + `RandScaleIntensityd` + `RandShiftIntensityd`
  in a `DataLoader`, `DiceLoss(sigmoid=True, squared_pred=True)` + `BCEWithLogitsLoss`, float32
  (MONAI's tutorials use AMP only on CUDA).

Each case runs in its own process (peak RSS is that process's). Writes the "Training" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import write_section  # noqa: E402

FEATURES = (16, 32, 64, 128, 256)


def _exams(args):
    from napari_tumorseg.core.training import build_cache

    return build_cache(args.data, args.cache, [1.5, 1.5, 1.5], log=lambda m: None)[:4]


def run_case(case: str, args) -> dict:
    import torch

    from napari_tumorseg.core.unet import UNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    exams = _exams(args)
    network = UNet(3, features=FEATURES)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    patch = (args.patch,) * 3
    times = []
    if case.startswith("ours"):
        from napari_tumorseg.core.augment import JointAugment
        from napari_tumorseg.core.training import PatchSampler, train_steps

        sampler = PatchSampler(exams, patch, batch_size=args.batch, seed=0)
        steps = train_steps(
            network,
            iter(sampler),
            optimizer,
            lambda step, elapsed: 1e-3,
            max_steps=args.iterations,
            augment=JointAugment(seed=0),
            bf16=case == "ours-bf16",
        )
        last = time.perf_counter()
        for _ in steps:
            now = time.perf_counter()
            times.append(now - last)
            last = now
    else:
        from monai.data import DataLoader, Dataset
        from monai.losses import DiceLoss
        from monai.transforms import (
            Compose,
            RandCropByPosNegLabeld,
            RandFlipd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        data = [
            {"image": e.image.astype(np.float32), "label": e.target.astype(np.float32)}
            for e in exams
        ]
        transform = Compose(
            [
                RandCropByPosNegLabeld(
                    keys=["image", "label"],
                    label_key="label",
                    spatial_size=patch,
                    pos=2,
                    neg=1,
                    num_samples=args.batch,
                ),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
                RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            ]
        )
        loader = DataLoader(
            Dataset(data * 100, transform), batch_size=1, shuffle=True, num_workers=0
        )
        dice = DiceLoss(sigmoid=True, squared_pred=True, batch=True)
        bce = torch.nn.BCEWithLogitsLoss()
        network.train()
        last = time.perf_counter()
        for i, batch in enumerate(loader):
            if i >= args.iterations:
                break
            image, label = batch["image"], batch["label"]
            logits = network(image)
            loss = dice(logits, label) + bce(logits, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
    steady = times[2:] if len(times) > 4 else times
    return {
        "seconds_per_iteration": float(np.median(steady)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "iterations": len(times),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/brats2018/train")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    from napari_tumorseg.core.training import cpu_bf16_is_fast

    results = {}
    native_bf16 = cpu_bf16_is_fast()
    for case in ("monai", "ours-fp32", "ours-bf16") if native_bf16 else ("monai", "ours-fp32"):
        command = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--data",
            str(args.data),
            "--cache",
            str(args.cache),
            "--iterations",
            str(args.iterations),
            "--patch",
            str(args.patch),
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
        print(case, results[case], flush=True)
    base = results["monai"]["seconds_per_iteration"]
    names = {
        "monai": "MONAI loop (transforms + DataLoader, DiceLoss + BCE, float32)",
        "ours-fp32": "ours, float32 (sampler + joint augmentation + train_steps)",
        "ours-bf16": "ours, bfloat16 autocast (default on CPUs with native bfloat16)",
    }
    lines = [
        f"Command: `python benchmarks/bench_training.py --iterations {args.iterations} "
        f"--patch {args.patch} --batch {args.batch} --threads {args.threads}` (2 CPU cores; "
        f"UNet(3, features={FEATURES}), batch {args.batch} x {args.patch}^3, median s/iteration "
        "after 2 warm-up iterations; each case in its own process). CPU: "
        f"{platform.processor() or platform.machine()}, native bfloat16: "
        f"{'yes' if native_bf16 else 'no (bfloat16 case skipped; training runs in float32)'}.",
        "",
        "Not quite the same work: our loop runs the bundled models' augmentation (`JointAugment`"
        " defaults: flips, on 30 % of batches a resampled rotation and"
        " scaling, on 80 % intensity scale, shift, gamma, bias field and noise) and clips"
        " gradients; MONAI's runs flips, intensity scale and shift only. Our column is therefore"
        " timed with more work per iteration than MONAI's.",
        "",
        "| loop | s / iteration | speed vs MONAI | peak RSS (GB) |",
        "|---|---|---|---|",
        *(
            f"| {names[c]} | {r['seconds_per_iteration']:.2f} | "
            f"{base / r['seconds_per_iteration']:.2f}x | {r['peak_rss_gb']:.2f} |"
            for c, r in results.items()
        ),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("Training", "\n".join(lines))


if __name__ == "__main__":
    main()
