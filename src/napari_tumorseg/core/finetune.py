"""Fine-tuning a model on a user's corrections ("Fine-tune on my corrections").

The user corrected some voxels of a segmentation. Those voxels, and the axial slices they lie on,
are the strongest supervision; the rest of the label map -- seen and left alone -- counts less
(`correction_weights`). `finetune` trains a copy of the model on patches (3D) or slices (2D)
sampled around the corrections, with the soft Dice + BCE loss and the joint augmentation of the
training code, and yields progress between steps. Two outcomes:

- ``mode="adapt"``: the strongest fit to this exam, to re-segment it: the parent network
  with an exam head (`refine`) fitted on the corrected slices in seconds -- measured to fit
  the exam better than a minute of fine-tuning the network itself, which it leaves as it is;
- ``mode="keep"``: a version meant for the next exams -- a lower learning rate, distillation
  from the parent where the user corrected nothing (its probabilities as soft targets instead
  of the map's hard labels, which sharpen the network towards this exam: learning without
  forgetting, Li & Hoiem 2017), L2-SP regularisation towards the parent weights (Li et al.,
  ICML 2018), and at the end the weights interpolated between the parent and the fine-tuned
  network (WiSE-FT, Wortsman et al., CVPR 2022), so what the corrections teach carries over
  with little forgetting. Only the voxels the user changed are hard targets; the rest of the
  corrected slices is distilled too. Measured with benchmarks/bench_finetune.py: distillation
  cut the worst loss on another exam from -0.068 to -0.032 WT Dice for about the same gain on
  the corrected exam, and hard targets on the changed voxels alone to -0.008, with a larger
  gain. Replaying the user's earlier corrected exams (half the batches) was measured too and
  dropped: in a chain of two "keep" rounds it lowered the unseen exam (0.714-0.717 WT against
  0.724-0.730 without) and did not protect the earlier exam (0.893 against 0.892). A 2D
  model's "keep" also draws most of its slices away from the corrections (`MODES_2D`).

Nothing is written here: the caller saves the returned network (atomically, `models`) only when
the generator finished, so a cancelled or failed fine-tune leaves every model file as it was.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import refine
from .augment import JointAugment
from .devices import select_device
from .errors import TumorSegError
from .inference import exam_to_channels, segment
from .io import SEQUENCES, Exam, to_brats_labels
from .jobs import map_events
from .losses import dice_bce_loss
from .models import TumorModel, bundled_dir, check_can_save, save_user_model
from .training import (
    CachedExam,
    cache_exam,
    cosine_lr,
    crop_padded,
    region_targets,
    train_steps,
)

#: Loss weight of the voxels the user left alone, relative to corrected slices (see
#: `correction_weights`); chosen with benchmarks/bench_finetune.py (0.1 when resampling
#: blended a corrected slice with its neighbours; 0.125 keeps that ratio since
#: `training.cache_exam` no longer does).
UNCORRECTED_WEIGHT = 0.125

MODES = {
    # The exam head (`refine`): fitted on the corrected slices on top of the parent network,
    # which it leaves as it is. Measured with benchmarks/bench_finetune.py on the three unseen
    # exams, against a minute of network fine-tuning (lr 1e-3, no L2-SP, no interpolation,
    # hard labels everywhere: the recipe before): WT on the uncorrected slices of the sample
    # +0.206 (mean of seeds 0-2) against +0.130, and the other two exams up too (+0.034,
    # +0.033) where the network fine-tuning lowered them (-0.004, -0.029); fitted on top of
    # that fine-tuning instead of on the parent it gained no more.
    "adapt": {
        "exam_head": True,
        "hidden": refine.HIDDEN,
        "iterations": refine.ITERATIONS,
        "weight_decay": refine.WEIGHT_DECAY,
    },
    # Network fine-tuning: lr, L2-SP strength, the share of the fine-tuned weights kept when
    # interpolating back towards the parent's, whether the voxels the user left alone are
    # distilled from the parent (its probabilities as soft targets) rather than learnt as the
    # hard labels of the map, and the weight of the voxels the user left alone on the slices
    # they corrected (`correction_weights`: below 0.5 they are distilled too, and patches
    # centre on the corrected voxels alone)
    "keep": {
        "lr": 1e-4,
        "l2sp": 1e-2,
        # 0.4 of the way from the parent: once thin corrections kept their own labels, 0.5
        # gave +0.077 on the sample but cost TCIA10_637 0.013 WT; 0.4: +0.062 and 0.008.
        "interpolate": 0.4,
        "distill": True,
        # Hard labels only on the voxels the user changed: learning the rest of the corrected
        # slices as hard labels sharpened the network (fine-tuned on ABM, the sample lost 0.034
        # WT; with 0.4: 0.002), and the sample's own gain grew (+0.052 -> +0.062).
        "confirmed": 0.4,
    },
}


#: What differs for a 2D model. Its training samples are single axial slices, so without
#: ``context`` every one of them is a corrected slice, where a 3D patch of 64 slices holds 2-4
#: corrected ones among slices distilled from the parent: the corrections weighed ten times
#: more, and "keep" made on the sample cost another exam 0.120 WT (benchmarks/bench_finetune.py
#: --model 2d). ``context``: the share of slices drawn anywhere in the brain instead (distilled
#: from the parent where not corrected), as a 3D patch's surroundings are.
MODES_2D = {"keep": {"context": 0.9}}

#: The fewest steps "keep" makes, whatever its time budget: about half of what its recipe
#: made in 60 s when it was measured (72-81 steps, docs/BENCHMARKS.md). On a busy 2-core
#: machine 60 s once made 2 steps, and a version that had learnt nothing was saved as if it
#: had; now the budget stretches until this many, and the progress says how long that takes.
MIN_KEEP_STEPS = 40

#: What each mode was last measured with (benchmarks/bench_finetune.py writes it; a version's
#: card repeats its mode's figures, `measured_figures`).
MEASURED_FILE = bundled_dir() / "finetune_measured.json"


def measured_figures(mode: str, spatial_dims: int) -> dict:
    """The benchmark figures ``mode`` was last measured with on a model of ``spatial_dims``
    (`MEASURED_FILE`, keys ``<mode>_<dims>d_<benchmark>``): each benchmark's command, date and
    figures; empty when none were stored."""
    import json

    try:
        data = json.loads(MEASURED_FILE.read_text())
    except (OSError, ValueError):
        return {}
    prefix = f"{mode}_{spatial_dims}d_"
    return {key[len(prefix) :]: value for key, value in data.items() if key.startswith(prefix)}


def recipe(mode: str, spatial_dims: int) -> dict:
    """The fine-tuning settings of ``mode`` for a model of ``spatial_dims`` (`MODES`, with
    `MODES_2D` for 2D models)."""
    if mode not in MODES:
        raise TumorSegError(f"unknown fine-tuning mode {mode!r}; use {list(MODES)}")
    extra = MODES_2D.get(mode, {}) if spatial_dims == 2 else {}
    return {**MODES[mode], **extra}


def correction_weights(
    edited: np.ndarray | None,
    shape,
    uncorrected: float = UNCORRECTED_WEIGHT,
    confirmed: float = 1.0,
) -> np.ndarray:
    """float32 (Z, Y, X) loss weights: 1 on the corrected voxels, ``confirmed`` on the other
    voxels of the axial slices holding them (looked at and left alone), ``uncorrected``
    elsewhere. Without ``edited`` (None) every voxel counts fully."""
    if edited is None:
        return np.ones(shape, np.float32)
    weights = np.full(shape, uncorrected, np.float32)
    weights[refine.corrected_rows(edited, shape[0])] = confirmed
    weights[edited] = 1.0
    return weights


def corrected_slices(edited: np.ndarray) -> np.ndarray:
    """Indices of the axial slices holding corrected voxels."""
    return np.flatnonzero(refine.corrected_rows(edited, edited.shape[0]))


@dataclass
class CorrectionExam:
    """A corrected exam at the model spacing (image, targets, loss weights) and the voxels
    patches are centred on: those of the corrected slices."""

    cached: CachedExam
    focus: np.ndarray  # (N, 3) voxel indices

    @property
    def weight(self) -> np.ndarray:
        return self.cached.weight


def prepare_corrections(
    exam: Exam, labels: np.ndarray, edited: np.ndarray | None, spacing_mm, confirmed: float = 1.0
) -> CorrectionExam:
    """Bring the corrected labels and their weights (`correction_weights`) onto the model's
    grid."""
    weights = correction_weights(edited, labels.shape, confirmed=confirmed)
    cached = cache_exam(exam, spacing_mm, labels=labels, weight=weights)
    focus = np.argwhere(cached.weight >= 0.5)
    if len(focus) == 0:  # corrections thinner than a model voxel: centre on the tumour
        focus = np.argwhere(cached.target[0] > 0)
    if len(focus) == 0:
        focus = np.argwhere(np.ones(cached.shape, bool))
    return CorrectionExam(cached=cached, focus=focus)


@dataclass
class _CorrectionSampler:
    """Patches centred on the corrections (`CorrectionExam.focus`); a share ``context`` of them
    centred anywhere in the brain instead."""

    exam: CorrectionExam
    patch: tuple[int, ...]
    batch_size: int
    seed: int = 0
    context: float = 0.0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.brain = np.argwhere(self.exam.cached.image.any(axis=0)) if self.context else None

    def __next__(self):
        images, targets, weights = [], [], []
        cached, focus = self.exam.cached, self.exam.focus
        weight = self.exam.weight[None]
        for _ in range(self.batch_size):
            anywhere = self.context and len(self.brain) and self.rng.random() < self.context
            centres = self.brain if anywhere else focus
            centre = centres[int(self.rng.integers(len(centres)))]
            if len(self.patch) == 2:
                z = int(centre[0])
                start = [int(c) - p // 2 for c, p in zip(centre[1:], self.patch)]
                arrays = (cached.image[:, z], cached.target[:, z], weight[:, z])
            else:
                start = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
                arrays = (cached.image, cached.target, weight)
            image, target, w = (crop_padded(a, start, self.patch) for a in arrays)
            images.append(image)
            targets.append(target)
            weights.append(w)
        return tuple(torch.from_numpy(np.stack(x)) for x in (images, targets, weights))

    def __iter__(self):
        return self


@dataclass(frozen=True)
class FinetuneProgress:
    """One fine-tuning step: ``step``, ``loss``, ``elapsed`` seconds, and the budget (for the
    exam head: ``steps`` its L-BFGS iterations, ``seconds`` None).

    ``loss`` is None before the first step: while the corrections are prepared ("keep"), or
    while the parent segments the exam and the head's features are computed ("adapt";
    ``stage`` says which, ``fraction`` how far it is).
    ``min_steps``: the fewest steps the run makes whatever ``seconds`` (`MIN_KEEP_STEPS`)."""

    step: int
    loss: float | None
    elapsed: float
    seconds: float | None
    steps: int | None
    min_steps: int = 0
    fraction: float | None = None
    stage: str = ""

    def remaining_seconds(self) -> float | None:
        """Seconds left, estimated from the pace so far (None before the first step)."""
        if self.loss is None or self.step < 1:
            return None
        per_step = self.elapsed / self.step
        left = []
        if self.steps:
            left.append((self.steps - self.step) * per_step)
        if self.seconds is not None:
            by_time = max(self.seconds - self.elapsed, (self.min_steps - self.step) * per_step)
            left.append(by_time)
        return max(0.0, min(left)) if left else None


@dataclass
class FinetuneResult:
    """The fine-tuned network (not saved), its exam head ("adapt"), and the card describing
    them."""

    network: torch.nn.Module
    card: dict
    steps: int
    seconds: float
    losses: list[float]
    head: torch.nn.Module | None = None

    def model(self, parent: TumorModel) -> TumorModel:
        """The fine-tuned model, unsaved (e.g. to segment with before deciding to keep it)."""
        return TumorModel(network=self.network, card=self.card, path=parent.path, head=self.head)


def l2sp(network: torch.nn.Module, parent: dict[str, torch.Tensor], alpha: float):
    """L2-SP regulariser: ``alpha`` x squared distance of the weights to the parent's."""
    params = [(p, parent[name]) for name, p in network.named_parameters()]

    def penalty() -> torch.Tensor:
        return alpha * sum(((p - p0) ** 2).sum() for p, p0 in params)

    return penalty


def interpolate_weights(
    network: torch.nn.Module, parent: dict[str, torch.Tensor], alpha: float
) -> None:
    """Set every parameter to ``alpha`` x its fine-tuned value + (1 - ``alpha``) x the parent's
    (in place; WiSE-FT). ``alpha`` = 1 keeps the fine-tuned network, 0 restores the parent."""
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.lerp_(parent[name].to(p.device), 1.0 - alpha)


def finetune(
    model: TumorModel,
    exam: Exam,
    labels: np.ndarray,
    edited: np.ndarray | None = None,
    mode: str = "keep",
    seconds: float | None = 60.0,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    overlap: float = 0.5,
    tta: bool = False,
    min_steps: int | None = None,
) -> Generator[FinetuneProgress, None, FinetuneResult]:
    """Fine-tune a copy of ``model`` on an exam's corrected label map.

    Parameters
    ----------
    model : TumorModel
        The model that produced the segmentation (left untouched).
    exam : Exam
        The exam's scans on one grid (as segmented).
    labels : numpy.ndarray
        (Z, Y, X) corrected BraTS label map on the exam's grid.
    edited : numpy.ndarray, optional
        bool (Z, Y, X): the voxels the user changed; None means every voxel is a correction.
    mode : {"adapt", "keep"}
        See the module docstring.
    seconds, steps : optional
        Budget: stop after this many seconds and/or steps (at least one must be given). The
        "adapt" exam head takes its `refine.ITERATIONS` whatever the budget (seconds).
    min_steps : int, optional
        "keep": the time budget ends the run only after this many steps (default
        `MIN_KEEP_STEPS`, or ``steps`` if that is fewer).
    device : str
        Where to train (``"auto"``: as `devices.select_device`).
    overlap, tta : optional
        "adapt": how the parent segments the exam for the head's features -- as the
        re-segmentation that applies the head will (`inference.segment`'s arguments).

    Yields `FinetuneProgress` after every step; returns a `FinetuneResult`.
    """
    settings = recipe(mode, model.card["spatial_dims"])
    if seconds is None and steps is None:
        raise TumorSegError("give a time (seconds) or step budget")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise TumorSegError(f"the time budget must be a positive number of seconds, not {seconds}")
    if steps is not None and steps < 1:
        raise TumorSegError(f"the step budget must be at least 1 step, not {steps}")
    reference = exam.reference
    if labels.shape != reference.spatial_shape:
        raise TumorSegError(
            f"the corrected label map ({labels.shape}) does not lie on the exam's grid "
            f"({reference.spatial_shape})"
        )
    # BraTS values only (3, BraTS 2023's enhancing tumour, read as 4): any other value would
    # be learnt as background.
    labels = to_brats_labels(labels, "the corrected label map")
    if edited is not None:
        edited = np.asarray(edited, bool)
        if edited.shape != labels.shape:
            raise TumorSegError(
                f"the map of corrected voxels ({edited.shape}) does not lie on the label "
                f"map's grid ({labels.shape})"
            )
        if not edited.any():
            raise TumorSegError("no corrected voxel: edit the label map before fine-tuning")
    device = select_device(device)
    if settings.get("exam_head"):
        segmentation = {"device": device, "overlap": overlap, "tta": tta}
        return (yield from _fit_exam_head(model, exam, labels, edited, mode, seed, segmentation))
    card = model.card
    spacing = card["spacing_mm"]
    if card["spatial_dims"] == 2:
        spacing = [float(reference.spacing[0]), *spacing[1:]]
    corrections = prepare_corrections(exam, labels, edited, spacing, settings["confirmed"])
    # Train on patches of the size the model was trained on (the inference window can be larger).
    patch = tuple(card.get("train_patch_size", card["patch_size"]))
    batch_size = batch_size or (2 if card["spatial_dims"] == 3 else 8)
    sampler = _CorrectionSampler(
        corrections, patch, batch_size, seed=seed, context=settings.get("context", 0.0)
    )
    torch.manual_seed(seed)
    network = copy.deepcopy(model.network).to(device)
    # A frozen copy of the parent: anchor of L2-SP and WiSE-FT, and the distillation teacher.
    frozen = copy.deepcopy(network).eval().requires_grad_(False)
    parent = dict(frozen.named_parameters())
    regulariser = l2sp(network, parent, settings["l2sp"]) if settings["l2sp"] else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings["lr"], weight_decay=0.0)
    augment = JointAugment(p_affine=0.2, p_intensity=0.5, seed=seed)
    budget_steps = steps
    floor = MIN_KEEP_STEPS if min_steps is None else int(min_steps)
    if steps is not None:
        floor = min(floor, steps)

    def lr_at(step: int, elapsed: float) -> float:
        # The share of the run done: it ends at the step budget, or once both the time budget
        # and the fewest steps are reached -- whichever of these two lags behind.
        done = 0.0
        if seconds is not None:
            done = elapsed / seconds
            if floor:
                done = min(done, step / floor)
        if budget_steps:
            done = max(done, step / budget_steps)
        return cosine_lr(step, done, settings["lr"], warmup=5, floor=0.1)

    started = time.perf_counter()
    losses: list[float] = []
    yield FinetuneProgress(0, None, 0.0, seconds, steps, floor)  # before the first step's wait
    run = train_steps(
        network,
        sampler,
        optimizer,
        lr_at,
        max_steps=steps,
        seconds=seconds,
        min_steps=floor,
        augment=augment,
        loss_fn=dice_bce_loss,
        regulariser=regulariser,
        device=device,
        teacher=frozen if settings["distill"] else None,
        norm_statistics=False,
    )
    last = 0
    for progress in run:
        losses.append(progress.loss)
        last = progress.step
        yield FinetuneProgress(
            progress.step, progress.loss, progress.elapsed, seconds, steps, floor
        )
    if settings["interpolate"] < 1.0:
        interpolate_weights(network, parent, settings["interpolate"])
    network.eval().cpu()
    elapsed = time.perf_counter() - started
    channels = exam_to_channels(exam)
    present = [SEQUENCES.index(s) for s in (channels.channels or SEQUENCES)]
    fingerprint = refine.exam_fingerprint(channels.array, present, channels.spacing)
    new_card = _finetuned_card(
        model, exam, fingerprint, edited, labels, mode, last, elapsed, settings
    )
    new_card.pop("exam_head", None)  # the parent's head belongs to the parent's exam
    return FinetuneResult(network, new_card, last, elapsed, losses)


def _finetuned_card(
    model, exam, fingerprint, edited, labels, mode, steps, elapsed, settings
) -> dict:
    """The new version's card; ``fingerprint``: the exam's `refine.exam_fingerprint`."""
    n_edited = int(edited.sum()) if edited is not None else int(labels.size)
    entry = {
        "parent": model.label,
        "exam": exam.name,
        # The exam by its scans, whatever its name (`refine.exam_fingerprint`).
        "exam_fingerprint": fingerprint,
        "mode": mode,
        "corrected_voxels": n_edited,
        "corrected_slices": (
            [int(z) for z in corrected_slices(edited)] if edited is not None else "all"
        ),
        "steps": steps,
        "seconds": round(elapsed, 1),
        "settings": (
            dict(settings)
            if settings.get("exam_head")
            else {**settings, "uncorrected_weight": UNCORRECTED_WEIGHT}
        ),
        "measured": measured_figures(mode, model.card["spatial_dims"]),
    }
    return {
        **model.card,
        "parent": model.label,
        "metrics": {},
        "finetune": entry,
        "lineage": [*model.card.get("lineage", []), entry],
    }


def _fit_exam_head(model, exam, labels, edited, mode, seed, segmentation):
    """The "adapt" mode: the parent network and an exam head fitted on the corrected slices."""
    started = time.perf_counter()
    settings = recipe(mode, model.card["spatial_dims"])
    channels = exam_to_channels(exam)
    present = [SEQUENCES.index(s) for s in (channels.channels or SEQUENCES)]

    def waiting(stage: str):
        def event_of(fraction: float) -> FinetuneProgress:
            elapsed = time.perf_counter() - started
            iterations = settings["iterations"]
            return FinetuneProgress(
                0, None, elapsed, None, iterations, fraction=fraction, stage=stage
            )

        return event_of

    # The head's features are the network's own output (a parent's head stays out of them),
    # from the segmentation the re-segmentation will repeat (its device, overlap and TTA).
    network_only = TumorModel(network=model.network, card=model.card, path=model.path)
    segmenting = waiting("segmenting")
    result = yield from map_events(
        segment(channels, network_only, **segmentation), lambda event: segmenting(event.fraction)
    )
    rows = refine.corrected_rows(edited, labels.shape[0])
    features, box, mask = yield from map_events(
        refine.head_features(
            channels.array, present, result.probabilities.array, channels.spacing, rows=rows
        ),
        waiting("features"),
    )
    targets = region_targets(labels[box][mask]).T
    if len(features) == 0:
        raise TumorSegError("the corrected slices hold no brain voxel: nothing to learn from")
    if len(features) > refine.MAX_VOXELS:  # e.g. every voxel counts (no edited mask)
        keep = np.random.default_rng(seed).choice(len(features), refine.MAX_VOXELS, replace=False)
        features, targets = features[keep], targets[keep]
    losses: list[float] = []

    def fitted(event) -> FinetuneProgress:
        losses.append(event[1])
        elapsed = time.perf_counter() - started
        return FinetuneProgress(event[0], event[1], elapsed, None, settings["iterations"])

    head = yield from map_events(
        refine.fit_head(
            features,
            targets,
            iterations=settings["iterations"],
            weight_decay=settings["weight_decay"],
            hidden=settings["hidden"],
            seed=seed,
        ),
        fitted,
    )
    elapsed = time.perf_counter() - started
    fingerprint = refine.exam_fingerprint(channels.array, present, channels.spacing)
    card = _finetuned_card(
        model, exam, fingerprint, edited, labels, mode, settings["iterations"], elapsed, settings
    )
    card["exam_head"] = {
        "exam": exam.name,
        "fingerprint": fingerprint,
        "features": refine.N_FEATURES,
        "hidden": settings["hidden"],
        "training_voxels": len(features),
        "anchors": refine.tumour_anchors(labels, rows),
        "loss": round(losses[-1], 5),
        "segmentation": {k: segmentation[k] for k in ("overlap", "tta")},
    }
    network = copy.deepcopy(model.network).cpu()
    return FinetuneResult(network, card, settings["iterations"], elapsed, losses, head=head)


def finetune_and_save(
    model: TumorModel,
    exam: Exam,
    labels: np.ndarray,
    edited: np.ndarray | None,
    name: str,
    mode: str = "keep",
    **kwargs,
) -> Generator[FinetuneProgress, None, tuple[Path, FinetuneResult]]:
    """`finetune`, then save the new version of user model ``name`` -- only if it finished.

    The version folder is written atomically. Returns ``(folder, result)``.
    """
    check_can_save(name)  # before training, not after it
    result = yield from finetune(model, exam, labels, edited, mode=mode, **kwargs)
    folder = save_user_model(result.network, result.card, name, head=result.head)
    result.card.update(name=name, version=int(folder.name[1:]))
    return folder, result


def change_summary(
    before: np.ndarray,
    after: np.ndarray,
    corrected: np.ndarray,
    edited: np.ndarray | None,
    spacing_zyx,
) -> dict:
    """What a re-segmentation changed: voxels added and removed per region, and Dice of both
    maps against the corrected labels on the axial slices the user did not correct."""
    from .metrics import evaluate_labels, region_masks

    old, new = region_masks(before), region_masks(after)
    changes = {
        region: {
            "added": int((new[region] & ~old[region]).sum()),
            "removed": int((old[region] & ~new[region]).sum()),
        }
        for region in old
    }
    keep = np.ones(before.shape[0], bool)
    if edited is not None:
        keep[corrected_slices(edited)] = False
    summary = {"changes": changes, "uncorrected_slices": int(keep.sum())}
    if keep.any() and edited is not None:
        for key, labels in (("dice_before", before), ("dice_after", after)):
            scores = evaluate_labels(labels[keep], corrected[keep], spacing_zyx, hd95=False)
            summary[key] = {r: round(s["dice"], 4) for r, s in scores.items()}
    return summary
