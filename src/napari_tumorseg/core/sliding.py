"""The 3D engine: sliding windows over a (C, z, y, x) volume, blended with a Gaussian.

The loop follows nnU-Net's (Isensee et al., Nature Methods 2021): a cached Gaussian importance map
with sigma = 1/8 of the patch, float32 accumulators the size of the (cropped) input,
``torch.inference_mode()``, mixed precision where the device has it natively, a CPU fallback when
the device runs out of memory, and optional mirroring test-time augmentation. Speed comes from
computing fewer windows: `inference.segment` crops the exam to the brain, and windows that hold
no brain voxel are skipped.

A generator: it yields `InferenceProgress` events between batches (and within a window) and
returns the map through ``StopIteration.value``; closing it stops before the next batch. After
each batch the newly final boxes come with their values (``event.box``, ``event.partial``), and
``event.window`` / ``event.current(box)`` preview the region just computed. The values of a final
box are computed when first read, so a consumer that only wants the result does not pay for them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np
import torch

from .predictor import InferenceProgress, _as_tensor, _crop_window, _output_channels, _Predictor
from .windows import (
    WindowBlender,
    _bounding_box,
    _window_box,
    gaussian_importance,
    make_plan,
    merge_boxes,
)


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
        logits = yield from predictor.events(windows, first, total)
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
