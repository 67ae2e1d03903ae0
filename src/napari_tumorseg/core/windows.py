"""The window plan and the blender of sliding-window inference (the torchio split: a sampler
says which windows, an aggregator averages their overlapping predictions).

Where every window is computed, the blend is MONAI's ``sliding_window_inference(mode="gaussian",
sigma_scale=0.125)`` exactly: the same window positions (the last window flush with the end, inputs
smaller than the patch zero-padded symmetrically), the same importance map, the same weighted mean.

Each window of a plan *owns* a box -- the voxels it is the last to touch in raster order (Z
slowest, X fastest) -- and the owned boxes tile the volume: once a window is blended, its owned
box is final, so a viewer can paint the map as it fills in and never repaint a voxel.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Box = tuple[slice, ...]

#: Output channels of the models, in order (contract 2.2).
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")


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
