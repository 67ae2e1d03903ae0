"""Train a bundled model (3D or 2D) from a BraTS-layout folder, reproducibly and resumably.

    python scripts/train_bundled.py --data ../shared/data/brats2018/train --dims 3 \
        --out src/napari_tumorseg/weights/3d --minutes 55

The exams are prepared once into a cache (float16, cropped, z-scored, at the model spacing).
A checkpoint is written every few minutes into --run-dir; running the same command again resumes
from it (weights as safetensors, optimiser state loaded with ``weights_only=True``, and the
random generators' states, so that the patches and augmentations go on as in one run). A
resumed run may be given more --minutes, other --threads or --device, but no other training
setting: the card describes the run that happened (its first command, and the commands that
resumed it). At the end the model is validated on the held-out exams with the full inference
pipeline (t1ce present and missing) and on the sample exam, and saved with its card into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_models import validate  # noqa: E402

from napari_tumorseg.core.augment import JointAugment
from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.io import SEQUENCES, fsync_path
from napari_tumorseg.core.models import TumorModel, load_model, save_model
from napari_tumorseg.core.preprocess import MISSING_POLICY, NORMALIZATION
from napari_tumorseg.core.training import (
    PatchSampler,
    build_cache,
    cosine_lr,
    train_steps,
    uses_bf16,
)
from napari_tumorseg.core.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VALIDATION = ("Brats18_CBICA_ABM_1", "Brats18_TCIA10_637_1")
CITATIONS = [
    "B. H. Menze et al., The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS), "
    "IEEE TMI 34(10):1993-2024, 2015",
    "S. Bakas et al., Advancing The Cancer Genome Atlas glioma MRI collections with expert "
    "segmentation labels and radiomic features, Scientific Data 4:170117, 2017",
    "S. Bakas et al., Identifying the Best Machine Learning Algorithms for Brain Tumor "
    "Segmentation, Progression Assessment, and Overall Survival Prediction in the BRATS "
    "Challenge, arXiv:1811.02629, 2018",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="BraTS-layout folder of cases")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--minutes", type=float, default=55.0, help="training time budget")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a budget of steps instead of minutes (the learning rate decays over the steps): "
        "runs that compare recipes then do the same work however busy the machine is",
    )
    p.add_argument("--patch", type=int, default=None, help="patch edge (voxels)")
    p.add_argument("--features", default="16,32,64,128,256")
    p.add_argument(
        "--norm",
        choices=("instance", "batch", "group"),
        default="instance",
        help="normalisation after each convolution; batch norm's running statistics make the "
        "trained network's output independent of how much background a window holds",
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--spacing", type=float, default=None, help="model spacing (mm, isotropic)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--validation", default=",".join(DEFAULT_VALIDATION))
    p.add_argument(
        "--sample",
        type=Path,
        default=ROOT / "sample_data" / "brats2018",
        help="an exam never trained on, reported as 'test'",
    )
    p.add_argument("--cache", type=Path, default=ROOT / "cache")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--init", default=None, help="model to start from (warm start), e.g. 3d")
    p.add_argument(
        "--intensity",
        default="",
        help="intensity augmentation strengths, e.g. scale=0.25,shift=0.25,gamma=0.5",
    )
    p.add_argument("--p-drop-other", type=float, default=0.1, help="t1/t2 dropout chance")
    p.add_argument(
        "--p-lesion-contrast",
        type=float,
        default=0.0,
        help="chance that a batch's oedema is faded towards the brain (random_lesion_contrast)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="inference window edge stored in the card (default: the training patch)",
    )
    p.add_argument(
        "--context-mm",
        type=float,
        default=0.0,
        help="2D: background (mm) the network sees around each slice at inference, stored in "
        "the card; with batch norm, enough of it makes labels independent of the crop",
    )
    args = p.parse_args(argv)
    if args.context_mm < 0:
        p.error(f"--context-mm must be 0 or more, got {args.context_mm}")
    if args.patch is None:
        args.patch = 64 if args.dims == 3 else 128
    if args.batch is None:
        args.batch = 2 if args.dims == 3 else 12
    if args.spacing is None:
        args.spacing = 1.5 if args.dims == 3 else 1.0
    if args.run_dir is None:
        args.run_dir = ROOT / "runs" / f"train{args.dims}d"
    return args


#: The checkpoint's files as `state.json` names them, and their names before it did.
CHECKPOINT_FILES = {"weights": "weights.safetensors", "optimizer": "optimizer.pt"}


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step, synced to disk first."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    tmp.replace(path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


#: Settings a resumed run may change: where things are written, the machine's resources, the
#: time budget (a run is resumed to give it more) and the card's inference window. Any other
#: change would make the card describe a run that did not happen.
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "minutes",
        "sample",
        "cache",
        "run_dir",
        "threads",
        "device",
        "checkpoint_minutes",
        "window",
        "context_mm",
    }
)


def main(argv=None) -> int:
    try:
        return run_training(parse_args(argv))
    except TumorSegError as exc:
        print(f"train_bundled: {exc}", file=sys.stderr)
        return 2


#: Settings added after checkpoints were made, with the value those checkpoints were made with.
SETTINGS_BEFORE_THEY_WERE_STORED = {"norm": "instance"}


def check_resume(state: dict, config: dict, state_path: Path) -> None:
    """Refuse to resume a checkpoint made with other training settings."""
    stored = state.get("config")
    if stored is None:
        log(f"{state_path} predates stored settings: resuming without checking them")
        return
    stored = {**SETTINGS_BEFORE_THEY_WERE_STORED, **stored}
    changed = sorted(
        k
        for k in set(stored) | set(config)
        if k not in RESUMABLE_CHANGES and stored.get(k) != config.get(k)
    )
    if changed:
        details = "; ".join(
            f"--{k.replace('_', '-')} {stored.get(k)!r} -> {config.get(k)!r}" for k in changed
        )
        raise TumorSegError(
            f"the checkpoint was made with other settings ({details}); resume with the same "
            "ones, or give another --run-dir to start afresh",
            state_path,
        )


def run_training(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    features = tuple(int(f) for f in args.features.split(","))
    spacing = [args.spacing] * 3
    validation = [v for v in args.validation.split(",") if v]
    missing = [v for v in validation if not (args.data / v).is_dir()]
    if missing:
        raise TumorSegError(
            f"no validation case folder {', '.join(missing)} there (--validation)", args.data
        )
    intensity = {k: float(v) for k, v in (kv.split("=") for kv in args.intensity.split(",") if kv)}
    # Paths absolute and settings parsed, so that a resume names them in any way it likes.
    config = {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(features=list(features), intensity=dict(sorted(intensity.items())))
    run_dir = args.run_dir
    state_path = run_dir / "state.json"
    state = {"step": 0, "elapsed": 0.0, "losses": [], "config": config, "commands": []}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        check_resume(state, config, state_path)
        state.setdefault("config", config)
    state.setdefault("commands", []).append(" ".join(["python", *sys.argv]))

    exams = build_cache(args.data, args.cache, spacing, log=log)
    train = [e for e in exams if e.name not in validation]
    if not train:
        raise TumorSegError("no case folder to train on besides the validation ones", args.data)
    names = [e.name for e in train]
    if state.setdefault("train_exams", names) != names:
        raise TumorSegError(
            f"the checkpoint was trained on other exams ({', '.join(state['train_exams'])}); "
            "give another --run-dir to start afresh",
            state_path,
        )
    log(f"training on {len(train)} exams: {[e.name for e in train]}; validation {validation}")
    patch = (args.patch,) * args.dims

    def make_sampler(seed: int) -> PatchSampler:
        return PatchSampler(
            train, patch, batch_size=args.batch, p_drop_other=args.p_drop_other, seed=seed
        )

    sampler = make_sampler(args.seed)
    network = UNet(args.dims, features=features, norm=args.norm)
    init_training = None
    if args.init is not None:
        parent = load_model(args.init)
        try:
            network.load_state_dict(parent.network.state_dict())
        except RuntimeError:
            theirs = parent.network.config
            raise TumorSegError(
                f"{args.init} cannot start this run: it has {theirs['norm']} norm and features "
                f"{theirs['features']}, this run {args.norm} norm and features {list(features)}",
                parent.path,
            ) from None
        init_training = {
            k: parent.card["training"].get(k) for k in ("steps", "minutes", "config", "warm_start")
        }
        log(f"warm start from {args.init} ({init_training['steps']} steps)")
    network.to(args.device)  # before the optimiser: its state lives on the weights' device
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-5)
    augment = JointAugment(
        p_affine=0.25,
        p_elastic=0.0,
        p_lesion_contrast=args.p_lesion_contrast,
        intensity=intensity,
        seed=args.seed,
    )

    if state["step"]:
        # Files named in the state (older checkpoints: fixed names).
        files = [run_dir / state.get(k, d) for k, d in CHECKPOINT_FILES.items()]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TumorSegError(
                f"the checkpoint's {' and '.join(missing)} are missing; give another --run-dir "
                "to start afresh",
                state_path,
            )
        network.load_state_dict(load_file(str(files[0])))
        optimizer.load_state_dict(torch.load(files[1], map_location=args.device, weights_only=True))
        if "sampler_rng" in state:  # the draws an uninterrupted run would have made
            sampler.rng_state = state["sampler_rng"]
            augment.generator.set_state(torch.tensor(state["augment_rng"], dtype=torch.uint8))
        else:
            sampler = make_sampler(args.seed + state["step"])
        log(f"resumed at step {state['step']} after {state['elapsed'] / 60:.1f} min")

    budget = args.minutes * 60
    done_before = state["elapsed"]

    def lr_at(step: int, elapsed: float) -> float:
        if args.steps:
            return cosine_lr(step, step / args.steps, args.lr)
        return cosine_lr(step, (done_before + elapsed) / budget, args.lr)

    last_checkpoint = time.perf_counter()

    def checkpoint(step: int, elapsed: float) -> None:
        """Write the weights and optimiser state of ``step`` under their own names, then the
        state that points at them (atomically, last): a crash at any moment leaves the previous
        checkpoint whole."""
        run_dir.mkdir(parents=True, exist_ok=True)
        names = {"weights": f"weights-{step}.safetensors", "optimizer": f"optimizer-{step}.pt"}
        tmp = run_dir / "checkpoint.tmp"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(tmp)
        )
        fsync_path(tmp)
        tmp.replace(run_dir / names["weights"])
        torch.save(optimizer.state_dict(), tmp)
        fsync_path(tmp)
        tmp.replace(run_dir / names["optimizer"])
        state.update(
            step=step,
            elapsed=elapsed,
            sampler_rng=sampler.rng_state,
            augment_rng=augment.generator.get_state().tolist(),
            **names,
        )
        atomic_write_text(state_path, json.dumps(state))
        fsync_path(run_dir)  # the renames on disk before the previous checkpoint goes
        for old in [*run_dir.glob("weights*.safetensors"), *run_dir.glob("optimizer*.pt")]:
            if old.name not in names.values():
                old.unlink()

    steps = train_steps(
        network,
        iter(sampler),
        optimizer,
        lr_at=lr_at,
        max_steps=args.steps,
        seconds=None if args.steps else max(budget - done_before, 0),
        start_step=state["step"],
        augment=augment,
        device=args.device,
    )
    window = []
    elapsed = 0.0
    start_step = step = state["step"]
    for progress in steps:
        step, elapsed = progress.step, progress.elapsed
        window.append(progress.loss)
        if step % 50 == 0:
            state["losses"].append([step, round(float(np.mean(window)), 4)])
            log(
                f"step {step} loss {np.mean(window):.4f} lr {progress.lr:.2e} "
                f"{(done_before + elapsed) / 60:.1f}"
                + (f" min, {step}/{args.steps} steps " if args.steps else f"/{args.minutes:g} min ")
                + f"({elapsed / max(step - start_step, 1):.2f} s/step)"
            )
            window = []
        if time.perf_counter() - last_checkpoint > args.checkpoint_minutes * 60:
            checkpoint(step, done_before + elapsed)
            last_checkpoint = time.perf_counter()
    checkpoint(step, done_before + elapsed)
    train_minutes = (done_before + elapsed) / 60
    log(f"trained {step} steps in {train_minutes:.1f} min")

    card = {
        "name": f"{args.dims}d",
        "version": 1,
        "spatial_dims": args.dims,
        "channels": list(SEQUENCES),
        "regions": ["WT", "TC", "ET"],
        "patch_size": [args.window] * args.dims if args.window else list(patch),
        "train_patch_size": list(patch),
        **({"context_mm": args.context_mm} if args.context_mm else {}),
        "spacing_mm": spacing,
        "normalization": NORMALIZATION,
        "missing_policy": MISSING_POLICY,
        "parent": None,
        "metrics": {},
        "training": {
            "data": f"{args.data} ({len(exams)} expert-labelled exams)",
            "train_exams": [e.name for e in train],
            "validation_exams": validation,
            "test_exam": args.sample.name if args.sample else None,
            "steps": step,
            "minutes": round(train_minutes, 1),
            "hardware": f"{platform.processor() or platform.machine()}, "
            f"{args.threads} threads, {args.device}",
            "torch": torch.__version__,
            "precision": "bfloat16 autocast" if uses_bf16(args.device) else "float32",
            "seed": args.seed,
            "config": {**state["config"], **{k: config[k] for k in RESUMABLE_CHANGES}},
            "command": state["commands"][0],
            "resumed_with": state["commands"][1:],
            "loss_curve": state["losses"],
            "warm_start": init_training,
        },
        "citations": CITATIONS,
    }
    network.eval()
    model = TumorModel(network, card, args.out)
    folders = [args.data / v for v in validation]
    if folders:
        log("validation, all sequences")
        card["metrics"]["validation"] = validate(model, folders, log=log)
        log("validation, t1ce missing")
        card["metrics"]["validation_without_t1ce"] = validate(model, folders, ("t1ce",), log=log)
        card["metrics"]["mean"] = card["metrics"]["validation"]["mean"]
        card["metrics"]["command"] = (
            f"python scripts/evaluate_models.py --model {card['name']} "
            f"--data ../shared/data/brats2018/train --exams {','.join(validation)}"
        )
    else:  # every labelled exam trained on: the recipe's cross-validation is its estimate
        card["metrics"]["validation"] = None
        card["metrics"]["note"] = (
            "trained on every labelled exam, none held out: its recipe's cross-validation "
            "(docs/MODELS.md) is the estimate of its accuracy"
        )
    if args.sample and args.sample.exists():
        log("test (sample exam, never trained on)")
        card["metrics"]["test_sample"] = validate(model, [args.sample], log=log)
        card["metrics"]["test_sample_without_t1ce"] = validate(model, [args.sample], drop=("t1ce",))
    save_model(network, card, args.out, half=True)
    log(f"saved {args.out}: {json.dumps(card['metrics'].get('mean'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
