"""The 2D engine: a 2D network over the axial slices of a volume, in batches of slices."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from .predictor import InferenceProgress, _as_tensor, _output_channels, _Predictor
from .windows import Box


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
