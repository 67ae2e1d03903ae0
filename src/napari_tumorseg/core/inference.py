"""Inference: overlapping sub-volumes (3D) or axial slices (2D), as generators that report progress.

The sliding window is split the torchio way into a window plan (`plan_windows`, which windows), a
blender (`WindowBlender`, how overlapping predictions are averaged) and a loop the caller can watch
and stop (`sliding_window`). The loop follows nnU-Net's (Isensee et al., Nature Methods 2021): a
cached Gaussian importance map with sigma = 1/8 of the patch, float32 accumulators the size of the
(cropped) input, ``torch.inference_mode()``, mixed precision where the device has it natively
(float16 on CUDA, bfloat16 on CPUs with AVX512-BF16/AMX), a CPU fallback when the device runs out
of memory, and optional mirroring test-time augmentation.

Where every window is computed, the blend is MONAI's ``sliding_window_inference(mode="gaussian",
sigma_scale=0.125)`` exactly: the same window positions (the last window flush with the end, inputs
smaller than the patch zero-padded symmetrically), the same importance map, the same weighted mean.
Speed comes from computing fewer windows: `segment` crops the exam to the brain and skips windows
that hold no brain voxel.

Every engine is a generator: it yields `InferenceProgress` events between batches and returns its
result through ``StopIteration.value`` (``result = yield from engine``). Closing the generator
(``generator.close()``, or napari's ``worker.quit()``) stops it cleanly before the next batch.

Live display
------------
A voxel's blended value is final once no remaining window touches it. Windows run in raster order
(Z slowest, X fastest), so each window of the plan *owns* a box -- the voxels it is the last to
touch -- and the owned boxes tile the volume. After each batch the engine yields the newly final
boxes with their values (``event.box`` and ``event.partial``), so a viewer can paint the map as it
fills in, window by window, and never repaint a voxel. ``event.window`` and ``event.current(box)``
offer a preview of the region computed in that step, whose values may still change. The values of
a final box are computed when first read (they never change), so a consumer that only wants the
result -- a script, the CLI -- does not pay for them.
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import TumorSegError
from .io import SEQUENCES, Exam
from .jobs import map_events, run_to_end
from .postprocess import relabel_small_enhancing, remove_small_islands
from .preprocess import SKULL_ON_WARNING, Prepared, prepare
from .volume import Volume

Box = tuple[slice, ...]

#: Output channels of the models, in order (contract 2.2).
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")


# --------------------------------------------------------------------------- devices
def select_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device to run on.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "mps"} or torch.device
        ``"auto"`` picks CUDA, then Apple MPS, then the CPU. ``"cuda:1"`` style indices are
        accepted.

    Raises
    ------
    TumorSegError
        An explicitly requested device is not available on this computer.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TumorSegError(
                "device 'cuda' is not available: no CUDA GPU is visible to this torch build "
                f"(torch {torch.__version__}); use --device cpu or auto"
            )
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise TumorSegError(
                f"device {name!r} is not available: only {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return torch.device(name)
    if kind == "mps":
        if not _mps_available():
            raise TumorSegError(
                "device 'mps' is not available: Apple Metal (MPS) needs a Mac with Apple silicon "
                "and a torch build with MPS; use --device cpu or auto"
            )
        return torch.device("mps")
    raise TumorSegError(f"unknown device {device!r}; use auto, cpu, cuda or mps")


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 (AVX512-BF16 or AMX). Without it (e.g. AVX2-only
    CPUs) oneDNN falls back to a path measured 60x slower than float32 for 3D convolutions."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Inference precisions: "auto" (mixed precision where the device does it natively) or "float32".
PRECISIONS = ("auto", "float32")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of inference on ``device``: float16 on CUDA, bfloat16 on a CPU with
    native bfloat16, none (float32) elsewhere or when ``precision`` is ``"float32"``."""
    if precision not in PRECISIONS:
        raise TumorSegError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
    if precision == "float32":
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bf16_is_fast():
        return torch.bfloat16
    return None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _is_out_of_memory(exc: BaseException) -> bool:
    candidates = (
        getattr(torch, "OutOfMemoryError", None),
        getattr(torch.cuda, "OutOfMemoryError", None),
    )
    types = tuple(t for t in candidates if t is not None)
    return isinstance(exc, types) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


# --------------------------------------------------------------------------- window plan (sampler)
def window_starts(size: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start positions of the windows along one axis, as MONAI's ``dense_patch_slices`` places them.

    Windows step by ``int(patch * (1 - overlap))`` voxels (at least 1); the last one is moved back
    to end flush with the image. An axis shorter than the patch gets one window starting at
    ``-((patch - size) // 2)``: MONAI pads such inputs symmetrically with zeros.

    Parameters
    ----------
    size : int
        Image size along the axis (voxels).
    patch : int
        Window size along the axis (voxels).
    overlap : float
        Fraction of the window shared by neighbours, in [0, 1).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [-((patch - size) // 2)]
    step = max(int(patch * (1 - overlap)), 1)
    count = next(d for d in itertools.count() if d * step + patch >= size) + 1
    return [min(i * step, size - patch) for i in range(count)]


def _per_axis(value, ndim: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} needs {ndim} values, got {values}")
    return values


def _window_box(start: Sequence[int], patch: Sequence[int], shape: Sequence[int]) -> Box:
    """The part of a window inside the image (slices of the image)."""
    return tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, patch, shape))


@dataclass
class WindowPlan:
    """Which windows to compute, in raster order (first axis slowest).

    Attributes
    ----------
    shape : tuple of int
        Spatial shape of the image (voxels).
    patch : tuple of int
        Window size (voxels).
    axis_starts : list of list of int
        Window starts along each axis; the full grid is their Cartesian product.
    kept : list of (int, tuple of int)
        (raster index in the full grid, start) of each window to compute. Windows holding no
        mask voxel are left out.
    """

    shape: tuple[int, ...]
    patch: tuple[int, ...]
    axis_starts: list[list[int]]
    kept: list[tuple[int, tuple[int, ...]]]

    @property
    def grid_size(self) -> int:
        """Number of windows of the full grid (computed or skipped)."""
        return int(np.prod([len(s) for s in self.axis_starts]))

    @property
    def starts(self) -> list[tuple[int, ...]]:
        """Start positions of the windows to compute."""
        return [start for _, start in self.kept]

    def owned_box(self, raster_index: int) -> Box:
        """Voxels whose last covering window (in raster order) is grid window ``raster_index``.

        Along one axis, window i is the last to touch ``[s_i, s_(i+1))`` (``[0, s_1)`` for the
        first, ``[s_last, size)`` for the last); the owned boxes tile the image.
        """
        index = np.unravel_index(raster_index, [len(s) for s in self.axis_starts])
        box = []
        for i, starts, n in zip(index, self.axis_starts, self.shape):
            lo = 0 if i == 0 else starts[i]
            hi = n if i == len(starts) - 1 else starts[i + 1]
            box.append(slice(int(lo), int(hi)))
        return tuple(box)


def make_plan(shape, patch, overlap=0.5, mask: np.ndarray | None = None) -> WindowPlan:
    """A `WindowPlan` over ``shape``; see `plan_windows`."""
    shape = tuple(int(s) for s in shape)
    patch = tuple(int(p) for p in _per_axis(patch, len(shape), "patch"))
    overlaps = _per_axis(overlap, len(shape), "overlap")
    axis_starts = [window_starts(n, p, o) for n, p, o in zip(shape, patch, overlaps)]
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {shape}")
    kept = []
    for raster, start in enumerate(itertools.product(*axis_starts)):
        if mask is None or mask[_window_box(start, patch, shape)].any():
            kept.append((raster, tuple(int(s) for s in start)))
    return WindowPlan(shape=shape, patch=patch, axis_starts=axis_starts, kept=kept)


def plan_windows(
    shape: Sequence[int],
    patch: int | Sequence[int],
    overlap: float | Sequence[float] = 0.5,
    mask: np.ndarray | None = None,
) -> list[tuple[int, ...]]:
    """Start positions (voxels) of the sliding windows covering an image, in raster order.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the image, e.g. (z, y, x).
    patch : int or sequence of int
        Window size (voxels), per axis or one for all.
    overlap : float or sequence of float
        Fraction of a window shared with its neighbour along each axis, in [0, 1).
    mask : numpy.ndarray of bool, optional
        (z, y, x) brain mask; windows holding no mask voxel are left out.

    Returns
    -------
    list of tuple of int
        Window starts; a start is negative on an axis shorter than the patch (the window then
        overhangs the image on both sides, zero-filled). See `window_starts`.
    """
    return make_plan(shape, patch, overlap, mask).starts


@functools.lru_cache(maxsize=8)
def _gaussian_importance(patch: tuple[int, ...], sigma_scale: tuple[float, ...]) -> torch.Tensor:
    weights = None
    for i, (p, s) in enumerate(zip(patch, sigma_scale)):
        sigma = p * s
        x = torch.arange(start=-(p - 1) / 2.0, end=(p - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x**2 / (-2 * sigma**2))
        weights = x if i == 0 else weights.unsqueeze(-1) * x[(None,) * i]
    # As MONAI: no zero weights, so that every voxel of a window counts a little.
    floor = max(torch.min(weights).item(), 1e-3)
    return torch.clamp_(weights, min=floor)


def gaussian_importance(
    patch: int | Sequence[int], sigma_scale: float | Sequence[float] = 0.125, ndim: int = 3
) -> torch.Tensor:
    """Gaussian importance map of a window, as MONAI's ``compute_importance_map(mode="gaussian")``.

    ``exp(-x^2 / (2 sigma^2))`` per axis with ``sigma = sigma_scale * patch`` and x measured from
    the window centre, multiplied over the axes, clamped below at its minimum (at least 1e-3).

    Parameters
    ----------
    patch : int or sequence of int
        Window size (voxels).
    sigma_scale : float or sequence of float
        Sigma as a fraction of the window size (nnU-Net and MONAI use 1/8).
    ndim : int
        Number of axes when ``patch`` is a single int.

    Returns
    -------
    torch.Tensor
        float32 of shape ``patch``, on the CPU. Cached and shared between calls: do not modify it.
    """
    patch = tuple(int(p) for p in _per_axis(patch, ndim, "patch"))
    sigma = tuple(float(s) for s in _per_axis(sigma_scale, len(patch), "sigma_scale"))
    return _gaussian_importance(patch, sigma)


# --------------------------------------------------------------------------- blender (aggregator)
class WindowBlender:
    """Weighted mean of overlapping window predictions (the aggregator).

    Holds two float32 accumulators the size of the image on ``device`` (the CPU by default;
    the GPU the network runs on, so windows are not copied back one by one): the weighted sum
    ``(K, *shape)`` and the sum of weights ``shape``.

    Parameters
    ----------
    channels : int
        K, the number of output channels.
    shape : tuple of int
        Spatial shape of the image (voxels).
    activation : {"sigmoid", None}
        Applied to blended values when they are read (MONAI blends logits too).
    device : str or torch.device
        Where the accumulators live; values are read back as CPU numpy arrays.
    """

    def __init__(
        self,
        channels: int,
        shape: Sequence[int],
        activation: str | None = "sigmoid",
        device: str | torch.device = "cpu",
    ):
        if activation not in ("sigmoid", None):
            raise ValueError(f"activation must be 'sigmoid' or None, got {activation!r}")
        self.shape = tuple(int(s) for s in shape)
        self.activation = activation
        # One tuple, replaced as a whole: a reader in another thread never pairs sums of two
        # devices.
        self._sums = (
            torch.zeros((channels, *self.shape), dtype=torch.float32, device=device),
            torch.zeros(self.shape, dtype=torch.float32, device=device),
        )

    def add(self, start: Sequence[int], prediction: torch.Tensor, importance: torch.Tensor) -> None:
        """Add one window's prediction ``(K, *patch)`` with its importance map ``patch``.

        Both may live on any device; only the part of the window inside the image is kept.
        """
        patch = prediction.shape[1:]
        image_box = _window_box(start, patch, self.shape)
        window_box = tuple(slice(b.start - s, b.stop - s) for b, s in zip(image_box, start))
        total, weight = self._sums
        if prediction.device.type == "cpu" and total.device.type != "cpu":
            # The network fell back to the CPU (the GPU ran out of memory): the sums follow.
            total, weight = self._sums = (total.cpu(), weight.cpu())
        weighted = (prediction * importance)[(slice(None), *window_box)]
        total[(slice(None), *image_box)] += weighted.to(total.device, torch.float32)
        weight[image_box] += importance[window_box].to(total.device, torch.float32)

    def current(self, box: Box | None = None) -> np.ndarray:
        """Blended values so far in ``box`` (all by default): float32 (K, *box).

        Voxels no window has touched yet are 0 (after the activation too).
        """
        box = tuple(slice(0, n) for n in self.shape) if box is None else tuple(box)
        total, weight = self._sums
        return self._normalise(total[(slice(None), *box)], weight[box]).cpu().numpy()

    def _normalise(self, total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        covered = weight > 0
        out = total / torch.where(covered, weight, torch.ones_like(weight))
        if self.activation == "sigmoid":
            out = torch.sigmoid_(out)
        return out.mul_(covered)

    def result(self) -> np.ndarray:
        """The blended map: float32 (K, *shape), a new array (the accumulators stay intact)."""
        return self.current()


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class InferenceProgress:
    """One step of an inference engine (`sliding_window`, `slice_inference`).

    Attributes
    ----------
    done : int
        Windows (3D) or slices (2D) computed so far.
    total : int
        Windows or slices to compute (skipped ones not counted).
    box : tuple of slice or None
        Region of the output, on the engine's input grid (z, y, x), that just became final: no
        later window touches it. Boxes of successive events never overlap, and together they
        tile the whole output by the last event. None when nothing became final in this step.
    partial : numpy.ndarray or None
        float32 (K, *box): the final values in ``box`` (after the activation), read from the
        engine when first accessed (``current(box)``).
    window : tuple of slice or None
        Bounding box of the windows computed in this step (values there may still change);
        given on the first event of each step only.
    current : callable or None
        ``current(box) -> (K, *box)`` float32 blended values so far, for a live preview of
        ``window``. Read from the running engine: only values inside final boxes are exact.
    device : str
        The device the network ran on (``"cpu"`` after an out-of-memory fallback).
    part : float
        Fraction of the batch after ``done`` computed so far, in [0, 1): events in the middle
        of a batch (``box`` and ``window`` None) say how far its forward pass has got.
    """

    done: int
    total: int
    box: Box | None
    _: KW_ONLY
    window: Box | None = None
    current: Callable[[Box], np.ndarray] | None = field(default=None, repr=False)
    device: str = "cpu"
    part: float = 0.0

    @functools.cached_property
    def partial(self) -> np.ndarray | None:
        if self.box is None or self.current is None:
            return None
        return self.current(self.box)


# --------------------------------------------------------------------------- network runner
class _Predictor:
    """Runs the network on batches: inference mode, mixed precision (`autocast_dtype`),
    mirroring, OOM fallback."""

    def __init__(
        self, network: torch.nn.Module, device, tta: bool, spatial_dims: int, precision="auto"
    ):
        self.network = network
        self.device = select_device(device) if isinstance(device, str) else torch.device(device)
        self.precision = precision
        self.dtype = autocast_dtype(self.device, precision)
        if hasattr(network, "to"):
            try:  # the weights alone can exhaust a GPU that other programs fill
                network.to(self.device)
            except Exception as exc:
                if self.device.type == "cpu" or not _is_out_of_memory(exc):
                    raise
                self._fall_back_to_cpu(exc)
        flips = (
            [()]
            if not tta
            else [
                dims
                for r in range(spatial_dims + 1)
                for dims in itertools.combinations(range(2, 2 + spatial_dims), r)
            ]
        )
        self.flips = flips

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) CPU batch -> (B, K, *S) float32 logits on ``self.device``."""
        return run_to_end(self.steps(batch))

    def steps(self, batch: torch.Tensor) -> Generator[float, None, torch.Tensor]:
        """`__call__` as a generator: yields the fraction of the batch computed, a convolution
        at a time where the network can (`UNet.forward_steps`), and returns the logits."""
        while True:
            try:
                return (yield from self._forward(batch))
            except Exception as exc:  # torch raises several types for device memory
                if self.device.type == "cpu" or not _is_out_of_memory(exc):
                    raise
                self._fall_back_to_cpu(exc)

    @contextmanager
    def _step(self):
        """Inference mode and autocast, entered for each step only: the caller's code between
        two steps runs outside them."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        )
        with torch.inference_mode(), autocast:
            yield

    def _forward(self, batch: torch.Tensor) -> Generator[float, None, torch.Tensor]:
        x = batch.to(self.device, non_blocking=True)
        stepwise = hasattr(self.network, "forward_steps")
        total = None
        for index, dims in enumerate(self.flips):
            with self._step():
                xi = torch.flip(x, dims) if dims else x
                if not stepwise:
                    y = self.network(xi)
            if stepwise:
                steps = self.network.forward_steps(xi, self._step)
                while True:
                    try:
                        part = next(steps)
                    except StopIteration as stop:
                        y = stop.value
                        break
                    if part < 1.0:
                        yield (index + part) / len(self.flips)
            with self._step():
                y = (torch.flip(y, dims) if dims else y).float()
                total = y if total is None else total.add_(y)
        return total / len(self.flips) if len(self.flips) > 1 else total

    def _fall_back_to_cpu(self, exc: BaseException) -> None:
        warnings.warn(
            f"{self.device} ran out of memory ({str(exc).splitlines()[0][:120]}); "
            "continuing on the CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        old = self.device
        self.device = torch.device("cpu")
        self.dtype = autocast_dtype(self.device, self.precision)
        if hasattr(self.network, "to"):
            self.network.to(self.device)
        if old.type == "cuda":
            torch.cuda.empty_cache()
        elif old.type == "mps" and hasattr(torch, "mps"):
            torch.mps.empty_cache()


def _as_tensor(image) -> torch.Tensor:
    """A float32 CPU tensor sharing memory with ``image`` where possible."""
    if isinstance(image, torch.Tensor):
        return image.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


def _crop_window(image: torch.Tensor, start: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """(C, *patch) window of a (C, *S) image; parts outside the image are zeros."""
    image_box = _window_box(start, patch, image.shape[1:])
    inside = image[(slice(None), *image_box)]
    if tuple(inside.shape[1:]) == tuple(patch):
        return inside
    out = image.new_zeros((image.shape[0], *patch))
    window_box = tuple(slice(b.start - s, b.stop - s) for b, s in zip(image_box, start))
    out[(slice(None), *window_box)] = inside
    return out


def _bounding_box(boxes: Sequence[Box]) -> Box:
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
        for a in range(len(boxes[0]))
    )


def merge_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Merge boxes that are equal on all axes but one and touch on that one (a tiling stays one)."""
    boxes = [b for b in boxes if all(s.stop > s.start for s in b)]
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        for i, j in itertools.combinations(range(len(boxes)), 2):
            a, b = boxes[i], boxes[j]
            differ = [k for k in range(len(a)) if a[k] != b[k]]
            if len(differ) != 1:
                continue
            k = differ[0]
            if a[k].stop == b[k].start or b[k].stop == a[k].start:
                joined = slice(min(a[k].start, b[k].start), max(a[k].stop, b[k].stop))
                boxes[i] = (*a[:k], joined, *a[k + 1 :])
                del boxes[j]
                merged = True
                break
    return boxes


# --------------------------------------------------------------------------- 3D engine
def sliding_window(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    patch: int | Sequence[int],
    overlap: float | Sequence[float] = 0.5,
    batch_size: int = 2,
    mask: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    tta: bool = False,
    activation: str | None = "sigmoid",
    sigma_scale: float = 0.125,
    precision: str = "auto",
) -> Generator[InferenceProgress, None, np.ndarray]:
    """Sliding-window inference over a (C, z, y, x) image, blending windows with a Gaussian.

    A generator: yields `InferenceProgress` between batches and returns the map. Closing it stops
    before the next batch.

    Parameters
    ----------
    network : torch.nn.Module
        (B, C, *patch) -> (B, K, *patch) logits; moved to ``device`` (should be in eval mode).
    image : numpy.ndarray or torch.Tensor
        float32 (C, z, y, x) model input (or (C, y, x) for a 2D network).
    patch : int or sequence of int
        Window size (voxels); must fit the network (a multiple of ``network.divisor``).
    overlap : float or sequence of float
        Fraction of a window shared with its neighbour, in [0, 1).
    batch_size : int
        Windows per forward pass.
    mask : numpy.ndarray of bool, optional
        (z, y, x) brain mask: windows holding no mask voxel are not computed. Voxels no computed
        window covers are 0 in the output.
    device : str or torch.device
        Where the network runs (see `select_device`). Out of device memory, it continues on the
        CPU with a RuntimeWarning.
    tta : bool
        Mirroring test-time augmentation: the mean of the logits over all 2^d flips of the
        spatial axes (d times more compute).
    activation : {"sigmoid", None}
        Applied to the blended logits; None returns blended logits.
    sigma_scale : float
        Sigma of the Gaussian importance map as a fraction of the patch.
    precision : {"auto", "float32"}
        ``"auto"``: mixed precision where the device has it natively (float16 on CUDA,
        bfloat16 on CPUs with AVX512-BF16/AMX; see `autocast_dtype`); blending stays float32.

    Returns
    -------
    numpy.ndarray
        float32 (K, z, y, x), through ``StopIteration.value``.
    """
    data = _as_tensor(image)
    shape = tuple(data.shape[1:])
    plan = make_plan(shape, patch, overlap, mask)
    divisor = int(getattr(network, "divisor", 1))
    if any(p % divisor for p in plan.patch):
        raise ValueError(f"patch {plan.patch} must be a multiple of the network's {divisor}")
    predictor = _Predictor(network, device, tta, len(shape), precision)
    importance = gaussian_importance(plan.patch, sigma_scale, ndim=len(shape))
    on_device = importance.to(predictor.device)
    total = len(plan.kept)
    blender: WindowBlender | None = None
    yield InferenceProgress(0, total, None, device=predictor.device.type)
    finished = 0  # grid windows (raster order) whose owned boxes were reported final
    for first in range(0, total, batch_size):
        batch = plan.kept[first : first + batch_size]
        windows = torch.stack([_crop_window(data, start, plan.patch) for _, start in batch])
        steps = predictor.steps(windows)
        while True:
            try:
                part = next(steps)
            except StopIteration as stop:
                logits = stop.value
                break
            yield InferenceProgress(first, total, None, part=part, device=predictor.device.type)
        with torch.inference_mode():
            if blender is None:
                blender = WindowBlender(logits.shape[1], shape, activation, logits.device)
            if on_device.device != logits.device:
                on_device = importance.to(logits.device)
            for (_, start), prediction in zip(batch, logits):
                blender.add(start, prediction, on_device)
        done = first + len(batch)
        upto = plan.kept[done][0] if done < total else plan.grid_size
        boxes = merge_boxes([plan.owned_box(r) for r in range(finished, upto)])
        finished = upto
        window = _bounding_box([_window_box(s, plan.patch, shape) for _, s in batch])
        yield from _step_events(done, total, boxes, blender, window, predictor.device.type)
    if blender is None:  # nothing to compute: the mask is empty
        blender = WindowBlender(_output_channels(network, data, predictor), shape, activation)
        full = tuple(slice(0, n) for n in shape)
        yield InferenceProgress(0, 0, full, current=blender.current, device=predictor.device.type)
    return blender.result()


def _step_events(done, total, boxes, blender, window, device):
    if not boxes:
        yield InferenceProgress(
            done, total, None, window=window, current=blender.current, device=device
        )
        return
    for i, box in enumerate(boxes):
        yield InferenceProgress(
            done,
            total,
            box,
            window=window if i == 0 else None,
            current=blender.current,
            device=device,
        )


def _output_channels(network, data: torch.Tensor, predictor: _Predictor) -> int:
    out = getattr(network, "config", {}).get("out_channels")
    if out is not None:
        return int(out)
    divisor = int(getattr(network, "divisor", 1))
    probe = data.new_zeros((1, data.shape[0], *([divisor] * (data.ndim - 1))))
    with torch.inference_mode():
        return int(predictor(probe).shape[1])


# --------------------------------------------------------------------------- 2D engine
def slice_inference(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    batch_size: int = 16,
    mask: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    tta: bool = False,
    activation: str | None = "sigmoid",
    precision: str = "auto",
) -> Generator[InferenceProgress, None, np.ndarray]:
    """Slice-by-slice inference of a 2D network over the axial slices of a (C, z, y, x) image.

    Each slice is zero-padded (symmetrically) in Y and X to a multiple of ``network.divisor``
    (at least two of them), slices run in batches, and the outputs are cropped back and
    re-stacked. A generator like `sliding_window`: each event's ``box`` is the slab of slices
    just finished.

    Parameters
    ----------
    network : torch.nn.Module
        (B, C, y, x) -> (B, K, y, x) logits.
    image : numpy.ndarray or torch.Tensor
        float32 (C, z, y, x).
    batch_size : int
        Slices per forward pass.
    mask : numpy.ndarray of bool, optional
        (z, y, x) brain mask: slices without a mask voxel are not computed (their output is 0).
    device, tta, activation, precision
        As in `sliding_window` (TTA mirrors Y and X: 4 passes).

    Returns
    -------
    numpy.ndarray
        float32 (K, z, y, x), through ``StopIteration.value``.
    """
    if activation not in ("sigmoid", None):
        raise ValueError(f"activation must be 'sigmoid' or None, got {activation!r}")
    data = _as_tensor(image)
    if data.ndim != 4:
        raise ValueError(f"slice inference needs a (C, z, y, x) image, got {tuple(data.shape)}")
    depth, height, width = data.shape[1:]
    divisor = int(getattr(network, "divisor", 1))
    # At least two divisors wide: instance norm needs more than one voxel at the deepest level.
    pad_y, pad_x = (max(-(-n // divisor), 2) * divisor - n for n in (height, width))
    # F.pad order: last axis first, (before, after).
    padding = (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2)
    inside = (
        slice(None),
        slice(None),
        slice(pad_y // 2, pad_y // 2 + height),
        slice(pad_x // 2, pad_x // 2 + width),
    )
    if mask is not None:
        if tuple(mask.shape) != (depth, height, width):
            raise ValueError(
                f"mask shape {mask.shape} differs from the image's {(depth, height, width)}"
            )
        kept = np.flatnonzero(mask.reshape(depth, -1).any(axis=1)).tolist()
    else:
        kept = list(range(depth))
    predictor = _Predictor(network, device, tta, 2, precision)
    total = len(kept)
    out: torch.Tensor | None = None

    def current(box: Box) -> np.ndarray:
        return out[(slice(None), *box)].numpy()

    yield InferenceProgress(0, total, None, device=predictor.device.type)
    finished = 0
    for first in range(0, total, batch_size):
        indices = kept[first : first + batch_size]
        batch = data[:, indices].transpose(0, 1)  # (B, C, y, x)
        if any(padding):
            batch = torch.nn.functional.pad(batch, padding)
        with torch.inference_mode():
            logits = predictor(batch)[inside]
            if activation == "sigmoid":
                logits = torch.sigmoid_(logits)
            if out is None:
                out = torch.zeros((logits.shape[1], depth, height, width), dtype=torch.float32)
            out[:, indices] = logits.transpose(0, 1).to("cpu", torch.float32)
        done = first + len(indices)
        upto = kept[done] if done < total else depth
        box = (slice(finished, upto), slice(0, height), slice(0, width))
        finished = upto
        yield InferenceProgress(
            done, total, box, window=box, current=current, device=predictor.device.type
        )
    if out is None:
        out = torch.zeros((_output_channels(network, data, predictor), depth, height, width))
        full = (slice(0, depth), slice(0, height), slice(0, width))
        yield InferenceProgress(0, 0, full, current=current, device=predictor.device.type)
    return out.numpy()


# --------------------------------------------------------------------------- labels
def region_thresholds(threshold: float | Sequence[float] = 0.5) -> tuple[float, float, float]:
    """The WT, TC, ET thresholds of ``threshold``: one value for all regions or one per region."""
    values = np.broadcast_to(np.asarray(threshold, dtype=float), (3,))
    return tuple(float(v) for v in values)


def probabilities_to_labels(
    probabilities: np.ndarray, threshold: float | Sequence[float] = 0.5
) -> np.ndarray:
    """BraTS label map of region probabilities (contract 2.2).

    Regions are painted in the order WT, TC, ET, each over the previous one (nnU-Net's
    region-based convention): WT -> 2, TC -> 1, ET -> 4. The label map's regions are therefore
    nested, ET ⊆ TC ⊆ WT: a voxel above the threshold for ET counts as tumour core and whole
    tumour too, whatever their own probabilities.

    Parameters
    ----------
    probabilities : numpy.ndarray
        (3, Z, Y, X) WT, TC, ET probabilities in [0, 1].
    threshold : float or (float, float, float)
        A region holds the voxels whose probability is above it; one value for all regions or
        one per region (WT, TC, ET).

    Returns
    -------
    numpy.ndarray
        uint8 (Z, Y, X) with values 0, 1, 2, 4.
    """
    if probabilities.ndim < 2 or probabilities.shape[0] != 3:
        raise ValueError(f"need (3, ...) WT/TC/ET probabilities, got shape {probabilities.shape}")
    wt, tc, et = region_thresholds(threshold)
    labels = np.where(probabilities[0] > wt, np.uint8(2), np.uint8(0))
    labels[probabilities[1] > tc] = 1
    labels[probabilities[2] > et] = 4
    return labels


# --------------------------------------------------------------------------- exams
def card_labels(
    probabilities: np.ndarray,
    rules: dict | None,
    voxel_ml: float,
    threshold: float | Sequence[float] | None = None,
) -> np.ndarray:
    """BraTS labels from region probabilities with a model card's ``postprocess`` rules.

    Rules (all optional; chosen per model on its validation exams with
    ``scripts/tune_postprocess.py``): ``thresholds`` (one or per region, default 0.5),
    ``et_min_ml`` (less enhancing tumour than this becomes core,
    `postprocess.relabel_small_enhancing`) and ``island_ml`` (tumour pieces smaller than this
    are removed, `postprocess.remove_small_islands`). ``threshold`` overrides the card's.
    """
    rules = rules or {}
    if threshold is None:
        threshold = rules.get("thresholds", 0.5)
    labels = probabilities_to_labels(probabilities, threshold)
    if rules.get("et_min_ml"):
        labels = relabel_small_enhancing(labels, float(rules["et_min_ml"]), voxel_ml)
    if rules.get("island_ml"):
        labels = remove_small_islands(labels, float(rules["island_ml"]), voxel_ml)
    return labels


def exam_to_channels(exam: Exam) -> Volume:
    """The scans of an exam as one (4, Z, Y, X) float32 Volume in the order t1, t1ce, t2, flair.

    The scans must already lie on one grid (use the registration module's ``stack_sequences``
    otherwise). Missing sequences are zero channels; ``channels`` lists the present ones.

    Raises
    ------
    TumorSegError
        The exam has no scan, or its scans lie on different grids (naming them).
    """
    reference = check_one_grid(exam)
    array = np.zeros((len(SEQUENCES), *reference.spatial_shape), dtype=np.float32)
    for c, name in enumerate(SEQUENCES):
        if name in exam.scans:
            array[c] = exam.scans[name].array
    present = tuple(s for s in SEQUENCES if s in exam.scans)
    return reference.with_array(array, name=exam.name or "exam", channels=present)


def check_one_grid(exam: Exam) -> Volume:
    """The exam's reference scan, after checking (cheaply, no copy) that every scan lies on its
    grid; raises `TumorSegError` as `exam_to_channels` does."""
    if not exam.scans:
        raise TumorSegError("the exam holds no scan")
    reference = exam.reference
    ref_name = _scan_text(reference.name or next(iter(exam.scans)), reference)
    others = [
        f"{_scan_text(name, scan)} ({_grid_text(scan)})"
        for name, scan in exam.scans.items()
        if not scan.same_grid(reference)
    ]
    if others:
        raise TumorSegError(
            f"{', '.join(others)} {'does' if len(others) == 1 else 'do'} not lie on the grid of "
            f"{ref_name} ({_grid_text(reference)}); register the sequences first "
            "(the Register sequences dock, or tumorseg segment --register)"
        )
    return reference


def _scan_text(name: str, volume: Volume) -> str:
    """``flair`` or, for a scan read from a file, ``flair (case_flair.nii.gz)``."""
    path = volume.source.path if volume.source is not None else None
    return name if path is None else f"{name} ({Path(path).name})"


def _grid_text(volume: Volume) -> str:
    shape = "x".join(map(str, volume.spatial_shape))
    spacing = "x".join(f"{s:.3g}" for s in volume.spacing)
    return f"{shape} voxels of {spacing} mm"


# --------------------------------------------------------------------------- segment
#: The share of a segmentation's progress given to applying a model's exam head (its features
#: take about a third of a 3D model's windows on 2 cores).
HEAD_SHARE = 0.25


@dataclass(frozen=True)
class SegmentationProgress:
    """One step of `segment`, on the INPUT grid (the full-size exam, Z, Y, X).

    Attributes
    ----------
    done, total : int
        Windows (3D) or slices (2D) computed, and to compute.
    box : tuple of slice or None
        Region of the input grid whose probabilities just became final (never repainted).
        None when nothing became final in this step. With resampling (model spacing differs
        from the exam's), voxels on the seams between final regions arrive with the result.
    probabilities : numpy.ndarray or None
        float32 (3, *box): WT, TC, ET probabilities in ``box``, as in the final result;
        computed when first read (``final()``), in the thread that reads it.
    window : tuple of slice or None
        Input-grid box of the windows computed in this step (a live preview region).
    preview : callable or None
        ``preview() -> (box, (3, *box) float32)``: the blend so far over ``window``, mapped to
        the input grid. Only values inside final boxes are exact.
    part : float
        Fraction of the batch after ``done`` computed so far (`InferenceProgress.part`): a
        3D window takes seconds, and progress moves within it.
    warnings : tuple of str
        Doubts about the input known before the network runs (e.g. a skull still on), on the
        first event only, so that a user hears of them before waiting for the result (they
        are in the result's ``warnings`` too).
    tail, finishing : float
        The share of the job that follows the windows (a model's exam head: seconds of
        features, `HEAD_SHARE`; 0 without one), and how much of it is done.
    """

    done: int
    total: int
    box: Box | None
    _: KW_ONLY
    window: Box | None = None
    preview: Callable[[], tuple[Box | None, np.ndarray | None]] | None = field(
        default=None, repr=False
    )
    final: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)
    part: float = 0.0
    warnings: tuple[str, ...] = ()
    tail: float = 0.0
    finishing: float = 0.0

    @property
    def fraction(self) -> float:
        """The share of the work done, in [0, 1]."""
        windows = min(1.0, (self.done + self.part) / self.total) if self.total else 1.0
        return (1 - self.tail) * windows + self.tail * self.finishing

    @functools.cached_property
    def probabilities(self) -> np.ndarray | None:
        return None if self.final is None else self.final()


@dataclass
class SegmentationResult:
    """What `segment` returns.

    Attributes
    ----------
    probabilities : Volume
        float32 (3, Z, Y, X) WT, TC, ET probabilities on the input grid (0 outside the brain).
    labels : Volume
        uint8 (Z, Y, X) BraTS labels (0, 1, 2, 4) on the input grid.
    used_sequences : tuple of str
        Sequences the result rests on.
    missing_sequences : tuple of str
        Sequences that were missing (filled as the model card says).
    seconds : float
        Wall-clock time of the whole segmentation.
    device : str
        Device the network ran on at the end.
    precision : str
        The network's arithmetic there: "float32", "bfloat16 autocast" or "float16 autocast".
    notes : tuple of str
        What else the user should know (e.g. whether a model's exam head was applied).
    warnings : tuple of str
        What makes the map doubtful (e.g. an exam that is not skull-stripped).
    postprocess : dict
        The rules that made ``labels`` from ``probabilities`` (`card_labels`), with the
        per-region ``thresholds`` actually used: to redo the labels at other thresholds alike.
    """

    probabilities: Volume
    labels: Volume
    used_sequences: tuple[str, ...]
    missing_sequences: tuple[str, ...]
    seconds: float
    device: str = "cpu"
    precision: str = "float32"
    notes: tuple[str, ...] = ()
    postprocess: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class _ModelToInput:
    """Maps boxes and values from the model grid (cropped, resampled) to the input grid.

    The values are interpolated exactly as `Prepared.to_input_grid` does (trilinear,
    ``align_corners=False``), so a final box's values equal the final result's.
    """

    def __init__(self, prepared: Prepared, mask: np.ndarray | None):
        self.offset = [s.start for s in prepared.box]
        self.crop = [s.stop - s.start for s in prepared.box]
        self.model = list(prepared.image.shape[1:])
        self.mask = mask
        # 0 outside the brain on the input grid too, as `Prepared.to_input_grid(mask=True)`.
        self.input_mask = prepared.input_mask if mask is not None else None
        self.identity = self.crop == self.model
        self.axes = []
        if not self.identity:
            for n_in, n_model in zip(self.crop, self.model):
                src = np.maximum((np.arange(n_in) + 0.5) * (n_model / n_in) - 0.5, 0.0)
                low = np.floor(src).astype(np.int64)
                lam = (src - low).astype(np.float32)
                high = np.minimum(low + 1, n_model - 1)
                self.axes.append((low, high, lam))

    def map_box(self, box: Box) -> Box | None:
        """The input-grid box whose values are interpolated from model-grid ``box`` alone."""
        if self.identity:
            return tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, self.offset))
        out = []
        for (low, high, _), s, o in zip(self.axes, box, self.offset):
            inside = np.flatnonzero((low >= s.start) & (high < s.stop))
            if inside.size == 0:
                return None
            out.append(slice(int(inside[0]) + o, int(inside[-1]) + 1 + o))
        return tuple(out)

    def __call__(self, box: Box | None, values: np.ndarray | None):
        """(model box, (K, *box)) -> (input box, (K, *input box)); (None, None) when empty."""
        if box is None or values is None:
            return None, None
        if self.mask is not None:
            values = values * self.mask[box]
        out_box = self.map_box(box)
        if out_box is None:
            return None, None
        if self.identity:
            return out_box, self._masked(out_box, values)
        for axis, ((low, high, lam), s, o) in enumerate(zip(self.axes, box, self.offset)):
            i0, i1 = out_box[axis].start - o, out_box[axis].stop - o
            matrix = np.zeros((i1 - i0, s.stop - s.start), dtype=np.float32)
            rows = np.arange(i1 - i0)
            np.add.at(matrix, (rows, low[i0:i1] - s.start), 1 - lam[i0:i1])
            np.add.at(matrix, (rows, high[i0:i1] - s.start), lam[i0:i1])
            values = np.moveaxis(np.tensordot(matrix, values, axes=([1], [axis + 1])), 0, axis + 1)
        return out_box, self._masked(out_box, np.ascontiguousarray(values, dtype=np.float32))

    def _masked(self, out_box: Box, values: np.ndarray) -> np.ndarray:
        if self.input_mask is None:
            return values
        crop = tuple(slice(s.start - o, s.stop - o) for s, o in zip(out_box, self.offset))
        return values * self.input_mask[crop]


def check_overlap(overlap: float) -> float:
    """``overlap`` if it is a window overlap (in [0, 1)), else a `TumorSegError`."""
    if not 0 <= overlap < 1:
        raise TumorSegError(f"the window overlap must be at least 0 and below 1, got {overlap}")
    return overlap


def segment(
    exam_or_channels: Exam | Volume,
    model,
    device: str | torch.device = "auto",
    overlap: float = 0.5,
    tta: bool = False,
    batch_size: int | None = None,
    threshold: float | None = None,
    restrict_to_brain: bool = True,
    precision: str = "auto",
    postprocess: bool = True,
) -> Generator[SegmentationProgress, None, SegmentationResult]:
    """Segment a brain tumour: prepare the exam, run the model, threshold to BraTS labels.

    A generator: yields `SegmentationProgress` (on the input grid) between batches and returns a
    `SegmentationResult` through ``StopIteration.value``. Closing it stops before the next batch.

    Steps: brain mask and crop to the brain's box, resampling to ``card["spacing_mm"]``,
    per-channel z-score, zeros for missing sequences (`preprocess.prepare`); then overlapping
    windows of ``card["patch_size"]`` (`sliding_window`, windows without brain skipped) for 3D
    models or axial slices (`slice_inference`) for 2D models; then the map goes back onto the
    input grid, the model's exam head where it was fitted on this exam (`refine`), and
    `probabilities_to_labels`.

    Parameters
    ----------
    exam_or_channels : Exam or Volume
        An exam whose scans lie on one grid, or a (4, Z, Y, X) Volume in the channel order t1,
        t1ce, t2, flair whose ``channels`` name the present sequences (empty: all four).
    model : TumorModel or str
        A loaded model or a model name for `models.load_model`. Its network is moved to the
        device.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"`` (see `select_device`).
    overlap : float
        Window overlap in [0, 1) (3D models).
    tta : bool
        Mirroring test-time augmentation (8x the compute in 3D, 4x in 2D).
    batch_size : int, optional
        Windows (default 1 on a CPU, where a batch is no faster than its windows one after
        the other and the first window's map shows sooner; 2 elsewhere) or slices (default
        16) per forward pass.
    threshold : float, optional
        Probability above which a voxel belongs to a region (default: the model card's
        ``postprocess`` thresholds, else 0.5; 0.5 where an exam head is applied: its
        probabilities are fitted to the user's labels).
    restrict_to_brain : bool
        Set probabilities outside the brain mask to 0 (tumour lies inside the brain).
    precision : {"auto", "float32"}
        Mixed precision where the device has it natively (see `autocast_dtype`), or float32.
    postprocess : bool
        Apply the model card's ``postprocess`` rules to the label map (`card_labels`); the
        probabilities are returned as the network (and an exam head) gave them either way.

    Raises
    ------
    TumorSegError
        Wrong channel count, no sequence present, scans on different grids, no brain voxel,
        unavailable device.
    """
    started = time.perf_counter()
    check_overlap(overlap)
    if isinstance(model, str):
        from .models import load_model

        model = load_model(model)
    channels = exam_or_channels
    if isinstance(channels, Exam):
        channels = exam_to_channels(channels)
    array = channels.array
    if array.ndim != 4 or array.shape[0] != len(SEQUENCES):
        raise TumorSegError(
            f"segmentation needs a 4-channel (t1, t1ce, t2, flair) volume, got shape {array.shape}"
        )
    present_names = tuple(channels.channels) or SEQUENCES
    unknown = [n for n in present_names if n not in SEQUENCES]
    if unknown:
        raise TumorSegError(f"unknown sequence(s) {unknown}; use {list(SEQUENCES)}")
    used = tuple(s for s in SEQUENCES if s in present_names)
    missing = tuple(s for s in SEQUENCES if s not in present_names)
    if not used:
        raise TumorSegError("no sequence given: at least one of t1, t1ce, t2, flair is needed")
    card = model.card
    spatial_dims = int(card["spatial_dims"])
    model_spacing = [float(s) for s in card["spacing_mm"]]
    if spatial_dims == 2:  # slice by slice: the exam's own slices, resampled in-plane only
        model_spacing = [float(channels.spacing[0]), *model_spacing[-2:]]
    present = [SEQUENCES.index(s) for s in used]
    prepared = prepare(array, channels.spacing, model_spacing, present=present)
    doubts = () if prepared.skull_stripped else (SKULL_ON_WARNING,)
    mask = prepared.mask if restrict_to_brain else None
    to_input = _ModelToInput(prepared, mask)
    torch_device = select_device(device)
    autocast_dtype(torch_device, precision)  # a wrong precision fails before any work
    if spatial_dims == 3:
        engine = sliding_window(
            model.network,
            prepared.image,
            card["patch_size"],
            overlap=overlap,
            batch_size=batch_size or (1 if torch_device.type == "cpu" else 2),
            mask=prepared.mask,
            device=torch_device,
            tta=tta,
            precision=precision,
        )
    elif spatial_dims == 2:
        engine = slice_inference(
            model.network,
            prepared.image,
            batch_size=batch_size or 16,
            mask=prepared.mask,
            device=torch_device,
            tta=tta,
            precision=precision,
        )
    else:
        raise TumorSegError(f"model card says spatial_dims={spatial_dims}; expected 2 or 3")
    last_device = torch_device.type
    early = doubts
    tail = HEAD_SHARE if getattr(model, "head", None) is not None else 0.0
    total = 0
    try:
        while True:
            try:
                event = next(engine)
            except StopIteration as stop:
                maps = stop.value
                break
            last_device = event.device
            box = final = window = preview = None
            if event.box is not None:
                box = to_input.map_box(event.box)
                if box is not None:
                    final = functools.partial(_final, to_input, event)
            if event.window is not None and event.current is not None:
                window = to_input.map_box(event.window)
                preview = functools.partial(_preview, to_input, event.window, event.current)
            yield SegmentationProgress(
                event.done,
                event.total,
                box,
                window=window,
                preview=preview,
                final=final,
                part=event.part,
                warnings=early,
                tail=tail,
            )
            total = event.total
            early = ()  # on the first event only (the result repeats them)
    finally:
        engine.close()
    if mask is not None:
        maps *= mask
    probabilities = prepared.to_input_grid(maps, mask=restrict_to_brain)
    notes: tuple[str, ...] = ()
    rules = card.get("postprocess") if postprocess else None
    if getattr(model, "head", None) is not None:
        probabilities, notes, applied = yield from map_events(
            _apply_exam_head(model, channels, present, probabilities, overlap, tta),
            lambda f: SegmentationProgress(total, total, None, tail=tail, finishing=f),
        )
        if rules and applied:
            # The head's probabilities are fitted to the user's labels (cut at 0.5): the
            # card's thresholds, chosen for the network's calibration, do not apply to them.
            rules = {k: v for k, v in rules.items() if k != "thresholds"}
    rules = {k: v for k, v in (rules or {}).items() if k != "why"}
    if threshold is not None:
        rules["thresholds"] = threshold
    rules["thresholds"] = list(region_thresholds(rules.get("thresholds", 0.5)))
    voxel_ml = float(np.prod(channels.spacing)) / 1000
    labels = card_labels(probabilities, rules, voxel_ml)
    return SegmentationResult(
        probabilities=channels.with_array(
            probabilities, name="probabilities", channels=REGION_NAMES
        ),
        labels=channels.with_array(labels, name="labels", channels=()),
        used_sequences=used,
        missing_sequences=missing,
        seconds=time.perf_counter() - started,
        device=last_device,
        precision=precision_label(last_device, precision),
        notes=notes,
        postprocess=rules,
        warnings=doubts,
    )


def _apply_exam_head(model, channels: Volume, present, probabilities, overlap, tta):
    """The probabilities with ``model``'s exam head applied -- only on the exam it was fitted
    on (`refine`) --, notes saying which happened, and whether it was applied. A job yielding
    the share of its work done."""
    from .refine import apply_head_steps, exam_fingerprint

    entry = model.card["exam_head"]
    exam = entry["exam"]
    if exam_fingerprint(channels.array, present, channels.spacing) != entry["fingerprint"]:
        if channels.name == exam:
            why = f"the scans of {exam} differ from those it was fitted on (edited, re-registered?)"
        else:
            why = "it was fitted on another exam"
        return (
            probabilities,
            (
                f"{model.label} was adapted to {exam}, but its exam head is not applied: "
                f"{why}; the network alone segmented this exam",
            ),
            False,
        )
    notes = [f"with the exam head fitted on the corrections of {exam}"]
    fitted = entry.get("segmentation", {})
    if fitted and (fitted.get("overlap"), fitted.get("tta")) != (overlap, tta):
        notes.append(
            f"the head was fitted on a segmentation with overlap {fitted.get('overlap')} and "
            f"TTA {'on' if fitted.get('tta') else 'off'}; this one used overlap {overlap} and "
            f"TTA {'on' if tta else 'off'}, which it has not seen"
        )
    refined = yield from apply_head_steps(
        model.head,
        channels.array,
        present,
        probabilities,
        channels.spacing,
        anchors=entry.get("anchors", ()),
    )
    return refined, tuple(notes), True


def precision_label(device: str | torch.device, precision: str = "auto") -> str:
    """The arithmetic inference uses on ``device``: "float32", "bfloat16 autocast" or
    "float16 autocast" (see `autocast_dtype`)."""
    dtype = autocast_dtype(torch.device(device), precision)
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"


def _preview(to_input: _ModelToInput, window: Box, current: Callable[[Box], np.ndarray]):
    return to_input(window, current(window))


def _final(to_input: _ModelToInput, event: InferenceProgress) -> np.ndarray | None:
    return to_input(event.box, event.partial)[1]
