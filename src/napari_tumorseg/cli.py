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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tumorseg",
        description="Brain-tumour segmentation of multi-sequence MRI (NIfTI).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list bundled and user models with their cards")
    models.add_argument("-v", "--verbose", action="store_true", help="print the whole cards")
    models.set_defaults(func=_cmd_models)

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
