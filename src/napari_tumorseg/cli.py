"""The ``tumorseg`` command (contract 2.3).

Expected input errors (`TumorSegError`) print one line naming the file and the problem on stderr
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .core.bundled import DEFAULT_MODEL
from .core.errors import TumorSegError


def _cmd_models(args: argparse.Namespace) -> int:
    from .core.models import learnt_from, list_models, user_models_dir

    problems: list[str] = []
    cards = list_models(problems)
    for problem in problems:
        print(f"tumorseg: skipped a model: {problem}", file=sys.stderr)
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
        head = card.get("exam_head")
        adapted = f"  adapted to {head.get('exam')}" if isinstance(head, dict) else ""
        print(
            f"{card['label']:<20} {card['spatial_dims']}D  patch {card['patch_size']}  "
            f"spacing {card['spacing_mm']} mm{parent}{adapted}{dice}"
        )
        if card.get("lineage"):
            print(f"{'':<20} {learnt_from(card)}")
        if args.verbose:
            print(json.dumps({k: v for k, v in card.items() if k != "label"}, indent=2))
    print(f"user models folder: {user_models_dir()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.headless is not None:
        from .pipeline import run_headless_demo

        outputs = run_headless_demo(Path(args.headless), model=args.model, log=print)
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


def _exam_from_args(args: argparse.Namespace):
    """The exam's scans from the command line (a label map among them is not read: `segment`
    needs none and `finetune` takes its own, ``--labels``); its warnings printed on stderr."""
    exam = _read_exam_from_args(args)
    for message in exam.warnings:
        print(f"tumorseg {args.command}: warning: {message}", file=sys.stderr)
    return exam


def _read_exam_from_args(args: argparse.Namespace):
    from .core.io import read_exam

    # In the order given: the first is the reference whose geometry the outputs take.
    order = dict.fromkeys(getattr(args, "sequence_order", []))
    explicit = {s: getattr(args, s) for s in order if getattr(args, s)}
    if explicit and args.inputs:
        raise TumorSegError("give either CASE_DIR_OR_FILES or --t1/--t1ce/--t2/--flair, not both")
    if explicit:
        return read_exam(explicit, read_labels=False)
    if not args.inputs:
        raise TumorSegError("no input: give a case folder, files, or --t1/--t1ce/--t2/--flair")
    if len(args.inputs) == 1 and args.inputs[0].is_dir():
        from .core.dicom import read_case

        return read_case(args.inputs[0], read_labels=False)  # NIfTI files or a DICOM study
    if all(path.is_dir() for path in args.inputs):
        batch = "; for a batch give --out-dir DIR" if args.command == "segment" else ""
        raise TumorSegError(f"{len(args.inputs)} case folders: give one exam{batch}")
    return read_exam(args.inputs, read_labels=False)


class _SequenceFile(argparse.Action):
    """Stores a --t1/--t1ce/--t2/--flair file and the order the sequences were given in."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.sequence_order = [*getattr(namespace, "sequence_order", []), self.dest]


def _add_exam_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="CASE_DIR_OR_FILES",
        help="a case folder, or NIfTI files named by sequence (*_t1ce.nii.gz)",
    )
    for seq in ("t1", "t1ce", "t2", "flair"):
        parser.add_argument(f"--{seq}", type=Path, action=_SequenceFile, help=f"the {seq} scan")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"2d, 3d or a user model NAME[@vK] (default {DEFAULT_MODEL})",
    )


def _views_option(text: str) -> tuple[str, ...]:
    """``--views``: comma-separated views of `core.slices.VIEWS`."""
    from .core.slices import VIEWS

    views = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown view(s) {', '.join(unknown) or repr(text)}: use some of {', '.join(VIEWS)}"
        )
    return views


def _segment_options(args: argparse.Namespace) -> dict:
    """`segment_exam`'s options from the command line (all but the exam and the outputs)."""
    return {
        "model": args.model,
        "device": args.device,
        "overlap": args.overlap,
        "tta": args.tta,
        "views": args.views,
        "precision": args.precision,
        "register": args.register,
        "reference": args.reference,
        "brain_extraction": args.brain_extraction,
        "log": lambda m: print(m, file=sys.stderr),
    }


def _cmd_segment(args: argparse.Namespace) -> int:
    from .pipeline import segment_exam

    if args.out_dir is not None:
        return _segment_batch(args)
    for option, value in (
        ("--prob-dir", args.prob_dir),
        ("--skip-existing", args.skip_existing),
        ("--dask", args.dask),
        ("--workers", args.workers),
        ("--threads-per-worker", args.threads_per_worker),
    ):
        if value:
            raise TumorSegError(f"{option} goes with --out-dir (a batch of case folders)")
    exam = _exam_from_args(args)
    outcome = segment_exam(exam, args.out, prob_out=args.prob, **_segment_options(args))
    for path in outcome.written:
        print(f"wrote {path}")
    return 0


def _segment_batch(args: argparse.Namespace) -> int:
    from .batch import segment_folders

    if getattr(args, "sequence_order", None):
        raise TumorSegError("--t1/--t1ce/--t2/--flair name one exam's files: use --out")
    if args.prob is not None:
        raise TumorSegError("--prob names one file: with --out-dir use --prob-dir")
    common = {
        "prob_dir": args.prob_dir,
        "skip_existing": args.skip_existing,
        "on_written": lambda path: print(f"wrote {path}", flush=True),
        **_segment_options(args),
    }
    if args.dask is not None:
        from .cluster import segment_folders_on_dask

        if args.dask != LOCAL_CLUSTER and "://" not in args.dask and Path(args.dask).exists():
            raise TumorSegError(
                f"--dask took {args.dask!r} as its scheduler's address: give the address as "
                "tcp://host:port, or put --dask after the case folders"
            )

        outcome = segment_folders_on_dask(
            args.inputs,
            args.out_dir,
            address=None if args.dask == LOCAL_CLUSTER else args.dask,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            **common,
        )
    else:
        for option, value in (
            ("--workers", args.workers),
            ("--threads-per-worker", args.threads_per_worker),
        ):
            if value is not None:
                raise TumorSegError(f"{option} goes with --dask")
        outcome = segment_folders(args.inputs, args.out_dir, **common)
    print(f"tumorseg segment: {outcome.summary()}", file=sys.stderr)
    return 2 if outcome.failed else 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import numpy as np

    from .core.finetune import finetune_and_save
    from .core.inference import exam_to_channels
    from .core.io import read_volume
    from .core.jobs import run_to_end
    from .core.models import load_model
    from .core.volume import check_grid_match

    exam = _exam_from_args(args)
    exam_to_channels(exam)  # the scans must lie on one grid, as they were segmented
    labels = read_volume(args.labels, kind="labels")
    check_grid_match(labels, [exam.reference], args.labels)
    edited = None
    if args.edited is not None:
        mask = read_volume(args.edited, kind="scan")
        check_grid_match(mask, [exam.reference], args.edited)
        edited = np.asarray(mask.array) != 0
        if not edited.any():
            raise TumorSegError("marks no corrected voxel (it is all zeros)", args.edited)
    model = load_model(args.model)
    if args.mode == "adapt" and (args.seconds is not None or args.steps is not None):
        print(
            "tumorseg finetune: note: --seconds and --steps budget --mode keep; adapt fits its "
            "exam head in a fixed number of iterations (seconds)",
            file=sys.stderr,
        )
    last = [0.0]

    def report(progress) -> None:
        if progress.loss is None:
            return
        if progress.elapsed - last[0] >= 10 or progress.step <= 1:
            last[0] = progress.elapsed
            print(
                f"  step {progress.step} loss {progress.loss:.4f} {progress.elapsed:.0f} s",
                file=sys.stderr,
            )

    folder, result = run_to_end(
        finetune_and_save(
            model,
            exam,
            labels.array,
            edited,
            name=args.name,
            mode=args.mode,
            seconds=60.0 if args.seconds is None and args.steps is None else args.seconds,
            steps=args.steps,
            device="auto",  # as `tumorseg segment` runs by default
        ),
        report,
    )
    entry = result.card["finetune"]
    print(
        f"fine-tuned {model.label} on {entry['corrected_voxels']} corrected voxels of "
        f"{exam.name}: "
        + (
            f"an exam head, {result.steps} iterations in {result.seconds:.0f} s, loss "
            f"{result.losses[-1]:.4f} (adapt: applied to this exam only)"
            if result.head is not None
            else f"{result.steps} steps in {result.seconds:.0f} s ({args.mode})"
        )
    )
    print(f"saved {folder.parent.name}@{folder.name} in {folder}; use it with --model {args.name}")
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
        # Full precision (statistics are done on these); rounded for display only, below.
        clean = {
            r: {k: (None if v == float("inf") else float(v)) for k, v in s.items()}
            for r, s in scores.items()
        }
        print(json.dumps({"pred": str(args.pred), "ref": str(args.ref), "regions": clean}))
    else:
        print(f"{'region':<8}{'Dice':>8}{'HD95 (mm)':>12}")
        for region, s in scores.items():
            print(f"{region:<8}{s['dice']:>8.4f}{s['hd95_mm']:>12.2f}")
    return 0


#: ``--dask`` without an address: a LocalCluster on this machine.
LOCAL_CLUSTER = "local"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tumorseg",
        description="Brain-tumour segmentation of multi-sequence MRI (NIfTI).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list bundled and user models with their cards")
    models.add_argument("-v", "--verbose", action="store_true", help="print the whole cards")
    models.set_defaults(func=_cmd_models)

    seg = sub.add_parser("segment", help="segment a tumour (bundled or user model)")
    _add_exam_arguments(seg)
    outputs = seg.add_mutually_exclusive_group(required=True)
    outputs.add_argument(
        "--out",
        type=Path,
        metavar="SEG.nii.gz",
        help="BraTS label map, in the geometry of the first given sequence",
    )
    outputs.add_argument(
        "--out-dir",
        type=Path,
        metavar="DIR",
        help="a batch: each CASE_DIR's label map as DIR/<case>_seg.nii.gz (one model load for "
        "all; a case that fails is reported and the batch goes on; exit status 2 if any failed)",
    )
    seg.add_argument(
        "--prob",
        type=Path,
        metavar="PROB.nii.gz",
        help="also write the WT/TC/ET probabilities (4D NIfTI)",
    )
    seg.add_argument(
        "--prob-dir",
        type=Path,
        metavar="DIR",
        help="with --out-dir: also each case's probabilities as DIR/<case>_prob.nii.gz",
    )
    seg.add_argument(
        "--skip-existing",
        action="store_true",
        help="with --out-dir: leave the cases whose outputs are already there (resume a batch)",
    )
    seg.add_argument(
        "--dask",
        nargs="?",
        const=LOCAL_CLUSTER,
        metavar="ADDRESS",
        help="with --out-dir: one Dask task per exam, on the cluster whose scheduler is at "
        "ADDRESS (tcp://host:8786, tls://...; Dask's security settings apply), or without "
        "ADDRESS on a local cluster of worker processes (127.0.0.1 only). The workers read "
        "and write the paths given: a cluster needs a file system they all see. Needs "
        'pip install "napari-tumorseg[dask]"',
    )
    seg.add_argument("--workers", type=int, help="with --dask and no ADDRESS: worker processes")
    seg.add_argument(
        "--threads-per-worker",
        type=int,
        help="with --dask and no ADDRESS: the threads each worker segments its exam with, one "
        "exam at a time (default: up to 4)",
    )
    seg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    seg.add_argument(
        "--overlap", type=float, default=0.5, help="window overlap in [0, 1) (3D models)"
    )
    seg.add_argument("--tta", action="store_true", help="test-time mirroring")
    seg.add_argument(
        "--views",
        type=_views_option,
        help="2D models: the slices to run over, maps averaged, e.g. axial,coronal,sagittal "
        "(default: the model card's, axial for the bundled 2d; each view costs one more pass)",
    )
    seg.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "float32"),
        help="auto: mixed precision where the device has it natively (float16 on CUDA, "
        "bfloat16 on CPUs with AVX512-BF16/AMX); float32: full precision everywhere",
    )
    seg.add_argument(
        "--register",
        action="store_true",
        help="register the sequences to the reference first (raw exams)",
    )
    seg.add_argument(
        "--brain-extraction",
        choices=("auto", "on", "off"),
        default="auto",
        help="mask the scans to the brain with HD-BET after registration: auto (default) only "
        "when the exam is not skull-stripped, on, off. Needs the brain extra: "
        'pip install "napari-tumorseg[brain]"',
    )
    seg.add_argument(
        "--reference",
        choices=("t1", "t1ce", "t2", "flair"),
        help="sequence whose geometry the outputs take (default: the first given)",
    )
    seg.set_defaults(func=_cmd_segment)

    tune = sub.add_parser("finetune", help="fine-tune a model on a corrected label map")
    _add_exam_arguments(tune)
    tune.add_argument(
        "--labels",
        required=True,
        type=Path,
        metavar="CORRECTED.nii.gz",
        help="the corrected label map (on the exam's grid)",
    )
    tune.add_argument(
        "--edited",
        type=Path,
        metavar="EDITED_MASK.nii.gz",
        help="non-zero where the user corrected (default: every voxel counts)",
    )
    tune.add_argument("--name", required=True, help="user model to store the new version as")
    tune.add_argument(
        "--seconds",
        type=float,
        help="time budget of --mode keep (default 60, or none when --steps is given)",
    )
    tune.add_argument(
        "--steps", type=int, help="step budget of --mode keep (with --seconds: whichever first)"
    )
    tune.add_argument(
        "--mode",
        choices=("keep", "adapt"),
        default="keep",
        help="keep: for the next exams, without forgetting (default); "
        "adapt: the strongest fit to this exam",
    )
    tune.set_defaults(func=_cmd_finetune)

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
    demo.add_argument("--model", default=DEFAULT_MODEL, help="model for the headless pipeline")
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
