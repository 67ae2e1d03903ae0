"""The ``tumorseg`` command (contract 2.3).

Expected input errors (`TumorSegError`) print one line naming the file and the problem on stderr
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.errors import TumorSegError


def _cmd_models(args: argparse.Namespace) -> int:
    from .core.models import list_models, user_models_dir

    cards = list_models()
    if not cards:
        print("no models installed")
    for card in cards:
        metrics = card.get("metrics") or {}
        mean = metrics.get("mean") if isinstance(metrics, dict) else None
        dice = ""
        if isinstance(mean, dict):
            dice = "  Dice " + " ".join(
                f"{k} {v:.3f}" for k, v in mean.items() if isinstance(v, (int, float))
            )
        parent = f"  parent {card['parent']}" if card.get("parent") else ""
        print(
            f"{card['label']:<20} {card['spatial_dims']}D  patch {card['patch_size']}  "
            f"spacing {card['spacing_mm']} mm{parent}{dice}"
        )
        if args.verbose:
            print(json.dumps({k: v for k, v in card.items() if k != "label"}, indent=2))
    print(f"user models folder: {user_models_dir()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.headless is not None:
        from .pipeline import run_headless_demo

        outputs = run_headless_demo(Path(args.headless), log=print)
        for path in outputs:
            print(f"wrote {path}")
        return 0
    import napari

    from .widgets import DOCK_WIDGETS

    viewer = napari.Viewer(title="napari-tumorseg demo")
    viewer.open_sample("napari-tumorseg", "brats2018")
    for name in DOCK_WIDGETS:
        viewer.window.add_plugin_dock_widget("napari-tumorseg", name)
    napari.run()
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .core.registration import register_files

    result = register_files(
        args.fixed,
        args.moving,
        args.out,
        transform=args.transform,
        transform_out=args.transform_out,
    )
    print(
        f"registered {args.moving} to {args.fixed} ({args.transform}): Mattes MI "
        f"{result.metric:.4f}, head overlap {result.quality:.3f} "
        f"(before {result.quality_before:.3f}), {result.seconds:.1f} s"
    )
    print(f"wrote {args.out}" + (f" and {args.transform_out}" if args.transform_out else ""))
    if result.warning:
        print(f"tumorseg register: warning: {result.warning}", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .core.io import read_volume
    from .core.metrics import evaluate_labels

    pred = read_volume(args.pred, kind="labels")
    ref = read_volume(args.ref, kind="labels")
    if not pred.same_grid(ref):
        raise TumorSegError(
            f"lies on another grid than the reference {args.ref} "
            f"({pred.spatial_shape} vs {ref.spatial_shape} voxels); resample it first",
            args.pred,
        )
    scores = evaluate_labels(pred.array, ref.array, ref.spacing)
    if args.json:
        clean = {
            r: {k: (None if v == float("inf") else round(v, 4)) for k, v in s.items()}
            for r, s in scores.items()
        }
        print(json.dumps({"pred": str(args.pred), "ref": str(args.ref), "regions": clean}))
    else:
        print(f"{'region':<8}{'Dice':>8}{'HD95 (mm)':>12}")
        for region, s in scores.items():
            print(f"{region:<8}{s['dice']:>8.4f}{s['hd95_mm']:>12.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tumorseg",
        description="Brain-tumour segmentation of multi-sequence MRI (NIfTI).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list bundled and user models with their cards")
    models.add_argument("-v", "--verbose", action="store_true", help="print the whole cards")
    models.set_defaults(func=_cmd_models)

    register = sub.add_parser("register", help="register one scan to another (SimpleITK)")
    register.add_argument("--fixed", required=True, type=Path, help="reference scan")
    register.add_argument("--moving", required=True, type=Path, help="scan to align")
    register.add_argument("--out", required=True, type=Path, help="moved scan (fixed grid)")
    register.add_argument("--transform", choices=("rigid", "affine"), default="rigid")
    register.add_argument(
        "--transform-out",
        type=Path,
        metavar="T.tfm",
        help="write the transform (ITK: fixed space -> moving space)",
    )
    register.set_defaults(func=_cmd_register)

    evaluate = sub.add_parser("evaluate", help="Dice and HD95 of a label map against a reference")
    evaluate.add_argument("--pred", required=True, type=Path, help="label map to score")
    evaluate.add_argument("--ref", required=True, type=Path, help="reference label map")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=_cmd_evaluate)

    demo = sub.add_parser("demo", help="open napari with the labelled sample exam")
    demo.add_argument(
        "--headless",
        metavar="OUT_DIR",
        help="no display: run the whole pipeline on the sample, write outputs here",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except TumorSegError as exc:
        print(f"tumorseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output folder, full disk, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"tumorseg {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tumorseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
