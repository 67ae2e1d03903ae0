"""Training: a cache of prepared exams, a patch sampler and a training loop generator.

The loop is shared by `scripts/train_bundled.py` (the bundled models) and fine-tuning
(`core.finetune`): it yields progress after every step and stops between steps when the consumer
stops iterating, within a step or time budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .devices import cpu_bf16_is_fast
from .errors import TumorSegError
from .inference import exam_to_channels
from .io import REGIONS, SEQUENCES, Exam, find_exam_files, read_exam
from .losses import dice_bce_loss
from .preprocess import NORMALIZATION, prepare, resample_array


@dataclass
class CachedExam:
    """One exam ready for training, at the model spacing.

    Attributes
    ----------
    name : str
    image : numpy.ndarray
        float16 (4, z, y, x) z-scored channels, cropped to the brain.
    target : numpy.ndarray
        uint8 (3, z, y, x) WT, TC, ET masks on the same grid.
    weight : numpy.ndarray or None
        float32 (z, y, x) per-voxel loss weights (fine-tuning on corrections), or None.
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


def region_targets(labels: np.ndarray) -> np.ndarray:
    """uint8 (3, Z, Y, X) WT, TC, ET masks of a BraTS label map."""
    return np.stack([np.isin(labels, values) for values in REGIONS.values()]).astype(np.uint8)


def cache_exam(
    exam: Exam,
    spacing_mm=None,
    labels: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> CachedExam:
    """Prepare an exam exactly as inference does and bring its labels onto the same grid.

    ``labels`` (Z, Y, X) defaults to the exam's own label map. Region masks are resampled with
    linear interpolation and thresholded at 0.5 (smoother than nearest neighbour).

    A per-voxel ``weight`` map (Z, Y, X) marks corrections among labels the user left alone
    (`finetune.correction_weights`). Along z, masks and weights are then resampled by
    normalised convolution (Knutsson & Westin, CVPR 1993) with each axial slice's largest
    weight as its confidence: a model voxel takes the labels of the corrected slice it
    overlaps rather than a blend with its neighbours (plain linear resampling from 1 to
    1.5 mm lost every third corrected slice: its voxels never made half of a model voxel), and
    weights are scaled by the share of a model voxel one input slice fills (2/3 from 1 to
    1.5 mm; a partial volume), as the blend did for the other slices. Voxels weighing 1 are
    corrections: every model voxel overlapping one weighs at least 0.5, so that a thin
    correction, or one on thin slices, stays a correction (weight >= 0.5, see `train_steps`).
    """
    if labels is None:
        if exam.labels is None:
            raise TumorSegError("no label map to train on")
        labels = exam.labels.array  # `read_exam` checked it lies on a scan's grid
    channels = exam_to_channels(exam)  # checks that the scans share one grid
    present = [SEQUENCES.index(s) for s in channels.channels]
    prepared = prepare(channels.array, channels.spacing, spacing_mm, present=present)
    targets = region_targets(labels[prepared.box]).astype(np.float32)
    shape = prepared.image.shape[1:]
    if weight is None:
        targets = resample_array(targets, shape) > 0.5
    else:
        weight = weight[prepared.box][None].astype(np.float32)
        confidence = weight.max(axis=(2, 3), keepdims=True)  # (1, Z, 1, 1)
        # Interpolation is separable: the z profile alone gives the normaliser.
        total = np.maximum(resample_array(confidence, (shape[0], 1, 1)), 1e-6)
        blended = resample_array(targets * confidence, shape) / total > 0.5
        share = min(1.0, shape[0] / weight.shape[1])
        corrections = (weight >= 1.0).astype(np.float32)
        weight = share * (resample_array(weight * confidence, shape) / total)[0]
        # A model voxel that overlaps a correction is one, however thin the correction: a
        # one-voxel brush stroke at 1 mm fills as little as a quarter of a 1.5 mm voxel. Its
        # labels come from the corrected voxels alone (blended with the untouched neighbours
        # they were outvoted), and it weighs at least 0.5, the least a correction weighs, so
        # that distillation does not hand it back to the parent; full ones keep the share.
        coverage = resample_array(corrections * confidence, shape)
        touched = coverage[0] > 1e-3
        own = resample_array(targets * corrections * confidence, shape) / np.maximum(coverage, 1e-6)
        targets = np.where(touched, own > 0.5, blended)
        weight[touched] = np.maximum(weight[touched], 0.5)
    return CachedExam(
        exam.name, prepared.image.astype(np.float16), targets.astype(np.uint8), weight
    )


#: Bumped when `cache_exam` or the preprocessing it calls changes what it makes, so that
#: caches made before are rebuilt.
CACHE_VERSION = 2


def cache_fingerprint(folder: Path, spacing_mm) -> str:
    """What a cached exam was made from: its files (names, sizes, modification times), the
    spacing, the normalisation and `CACHE_VERSION`. A cache whose fingerprint differs is
    rebuilt -- an exam whose scans or labels changed is not trained on stale voxels."""
    scans, label_files, _ = find_exam_files(folder)
    grid = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
    parts = [f"v{CACHE_VERSION}", NORMALIZATION, repr(grid)]
    for path in sorted([*scans.values(), *label_files]):
        info = path.stat()
        parts.append(f"{path.name}:{info.st_size}:{info.st_mtime_ns}")
    return "|".join(parts)


def build_cache(
    data_dir: Path, cache_dir: Path, spacing_mm, names=None, log: Callable[[str], None] = print
) -> list[CachedExam]:
    """Prepare every case folder of a BraTS-layout ``data_dir`` once; reuse ``cache_dir``.

    Raises
    ------
    TumorSegError
        ``data_dir`` is missing or holds no case folder, or a case cannot be trained on (no
        label map, scans on different grids, unreadable files), naming it.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TumorSegError("no such folder", data_dir)
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    if names is not None:
        folders = [f for f in folders if f.name in names]
    if not folders:
        raise TumorSegError("no case folder to train on", data_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = "x".join(f"{s:g}" for s in spacing_mm) if spacing_mm is not None else "native"
    exams = []
    for folder in folders:
        path = cache_dir / f"{folder.name}_{tag}.npz"
        fingerprint = cache_fingerprint(folder, spacing_mm)
        cached = None
        if path.exists():
            with np.load(path) as data:
                if "fingerprint" in data and str(data["fingerprint"]) == fingerprint:
                    cached = CachedExam(folder.name, data["image"], data["target"])
        if cached is None:
            started = time.perf_counter()
            try:
                cached = cache_exam(read_exam(folder), spacing_mm)
            except TumorSegError as exc:
                if exc.path is not None:  # it names its file already
                    raise
                raise TumorSegError(exc.problem, folder) from None
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp, image=cached.image, target=cached.target, fingerprint=np.str_(fingerprint)
            )
            tmp.replace(path)
            log(f"cached {folder.name} {cached.shape} in {time.perf_counter() - started:.1f} s")
        exams.append(cached)
    return exams


def crop_padded(array: np.ndarray, start, size, dtype=np.float32) -> np.ndarray:
    """Crop (C, *S) ``array`` at ``start`` to ``size``, zero-padded where it leaves the volume."""
    out = np.zeros((array.shape[0], *size), dtype=dtype)
    src, dst = [slice(None)], [slice(None)]
    for s0, n, full in zip(start, size, array.shape[1:]):
        lo, hi = max(s0, 0), min(s0 + n, full)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, hi - s0))
    out[tuple(dst)] = array[tuple(src)]
    return out


@dataclass
class PatchSampler:
    """Random training patches (3D) or axial slabs cropped to a patch (2D).

    A share ``p_tumour`` of patches is centred on a tumour voxel -- half of those on tumour
    core or enhancing tumour when the exam has any, so small enhancing regions are seen often;
    the rest are centred anywhere in the brain box. ``p_drop_t1ce`` and ``p_drop_other`` drop
    sequences (zero channel = the missing-sequence policy); FLAIR is never dropped.

    Yields (image (B, 4, *P), target (B, 3, *P)) float32 tensors.
    """

    exams: list[CachedExam]
    patch: tuple[int, ...]
    batch_size: int = 2
    p_tumour: float = 0.67
    p_drop_t1ce: float = 0.3
    p_drop_other: float = 0.1
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _tumour: list = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._tumour = [(np.argwhere(e.target[0]), np.argwhere(e.target[1])) for e in self.exams]

    @property
    def spatial_dims(self) -> int:
        return len(self.patch)

    @property
    def rng_state(self) -> dict:
        """The random generator's state (JSON-serialisable): a checkpoint stores it, so that a
        resumed run draws the patches an uninterrupted one would have."""
        return self._rng.bit_generator.state

    @rng_state.setter
    def rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state

    def _centre(self, index: int) -> np.ndarray:
        exam = self.exams[index]
        wt, tc = self._tumour[index]
        rng = self._rng
        if rng.random() < self.p_tumour and len(wt):
            voxels = tc if len(tc) and rng.random() < 0.5 else wt
            return voxels[rng.integers(len(voxels))]
        return np.array([rng.integers(s) for s in exam.shape])

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = [], []
        rng = self._rng
        for _ in range(self.batch_size):
            index = int(rng.integers(len(self.exams)))
            exam = self.exams[index]
            centre = self._centre(index)
            if self.spatial_dims == 2:  # one axial slice, cropped in-plane
                z = int(centre[0])
                start = [int(c) - p // 2 for c, p in zip(centre[1:], self.patch)]
                image = crop_padded(exam.image[:, z], start, self.patch)
                target = crop_padded(exam.target[:, z], start, self.patch, np.uint8)
            else:
                start = [int(c) - p // 2 for c, p in zip(centre, self.patch)]
                image = crop_padded(exam.image, start, self.patch)
                target = crop_padded(exam.target, start, self.patch, np.uint8)
            if rng.random() < self.p_drop_t1ce:
                image[SEQUENCES.index("t1ce")] = 0
            for seq in ("t1", "t2"):
                if rng.random() < self.p_drop_other:
                    image[SEQUENCES.index(seq)] = 0
            images.append(image)
            targets.append(target)
        return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.sample()


@dataclass(frozen=True)
class TrainProgress:
    """One training step: ``step`` (1-based, counting resumed steps), ``loss``, ``elapsed`` s,
    ``lr``."""

    step: int
    loss: float
    elapsed: float
    lr: float


def cosine_lr(
    step: int, progress: float, base: float, warmup: int = 50, floor: float = 0.02
) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay with ``progress`` (0..1, e.g. the
    share of the time budget spent) down to ``floor`` x ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def uses_bf16(device: torch.device | str) -> bool:
    """Whether `train_steps` runs the forward pass under bfloat16 autocast by default on
    ``device``: on CPUs with native bfloat16 and on NVIDIA GPUs of compute capability 8.0 or
    more (Ampere and later; older ones would emulate it, slowly). bfloat16 has float32's range,
    so no loss scaling is needed."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_bf16_is_fast()
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.version.hip is not None:  # AMD: torch knows which GPUs have it
            return torch.cuda.is_bf16_supported()
        return torch.cuda.get_device_capability(device)[0] >= 8
    return False


def train_steps(
    network: torch.nn.Module,
    batches: Iterator,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int, float], float],
    max_steps: int | None = None,
    seconds: float | None = None,
    start_step: int = 0,
    min_steps: int = 0,
    augment: Callable | None = None,
    loss_fn: Callable = dice_bce_loss,
    regulariser: Callable[[], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    bf16: bool | None = None,
    teacher: torch.nn.Module | None = None,
    norm_statistics: bool = True,
) -> Generator[TrainProgress, None, int]:
    """Train ``network`` until ``max_steps`` steps or ``seconds`` have passed, yielding progress.
    The time budget ends a run only once it has made ``min_steps`` steps.

    ``batches`` yields (image, target) or (image, target, weight); ``augment(image, mask)``
    transforms them jointly (the weight travels with the mask). ``lr_at(step, elapsed)`` gives
    the learning rate; ``regulariser()`` is added to the loss (e.g. L2-SP towards the parent
    weights). Where the device has native bfloat16 (`uses_bf16`) the forward pass runs under
    bfloat16 autocast by default (2.4x faster on such CPUs; loss and weights stay float32). Stops
    between steps when the consumer stops iterating. Returns the number of the last step done.

    With a ``teacher`` network (frozen; e.g. the parent of a fine-tune), voxels whose weight is
    below 0.5 (not corrections: those weigh 1, blurred by resampling and augmentation) take the
    teacher's probabilities on the same augmented patch as their targets
    instead of the batch's labels: distillation where the labels are not a correction
    (learning without forgetting, Li & Hoiem 2017), with no sharpening towards hard labels.

    With ``norm_statistics=False`` batch-norm layers keep the running statistics they have and
    normalise with them (a fine-tune: a few patches of one exam would replace statistics
    gathered over whole training sets). Instance norm has none: it is unaffected.
    """
    device = torch.device(device)
    bf16 = uses_bf16(device) if bf16 is None else bf16
    network.to(device).train()
    if not norm_statistics:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    started = time.perf_counter()
    step = start_step
    try:
        while max_steps is None or step < max_steps:
            elapsed = time.perf_counter() - started
            if seconds is not None and elapsed >= seconds and step >= min_steps:
                break
            batch = next(batches)
            image, target = batch[0].to(device), batch[1].to(device)
            weight = batch[2].to(device) if len(batch) > 2 else None
            if augment is not None:
                if weight is None:
                    image, target = augment(image, target)
                else:
                    k = target.shape[1]
                    image, mask = augment(image, torch.cat([target, weight], dim=1))
                    target, weight = mask[:, :k], mask[:, k:]
            if teacher is not None and weight is not None:
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    soft = torch.sigmoid(teacher(image).float())
                corrected = (weight >= 0.5).to(soft.dtype).expand_as(soft)
                target = corrected * target + (1 - corrected) * soft
            lr = lr_at(step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = network(image)
            loss = loss_fn(logits.float(), target, weight=weight)
            if regulariser is not None:
                loss = loss + regulariser()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
            optimizer.step()
            step += 1
            yield TrainProgress(step, float(loss.detach()), time.perf_counter() - started, lr)
    finally:
        network.eval()
    return step
