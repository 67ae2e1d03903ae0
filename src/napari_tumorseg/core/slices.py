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
    context: int = 0,
) -> Generator[InferenceProgress, None, np.ndarray]:
    """Slice-by-slice inference of a 2D network over the axial slices of a (C, z, y, x) image.

    Each slice is zero-padded in Y and X by ``context`` voxels per side at least, and to a
    multiple of ``network.divisor`` (at least two of them), slices run in batches, and the
    outputs are cropped back and re-stacked. The padding is split evenly between the two
    sides, except with ``context`` and a ``mask``: then the mask's first row and column (over
    all slices) are put on a multiple of ``network.divisor``, wherever the crop left them, so
    that the network's down-sampling meets the brain at one phase whatever the crop. A
    generator like `sliding_window`: each event's ``box`` is the slab of slices just finished.

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
    context : int
        Background (zeros) the network sees around the image on each side of Y and X. A
        batch-norm network's output at a voxel depends on what lies around it alone, the
        slice's edge included: with enough background between the brain and that edge, how
        tightly the image was cropped hardly moves the labels (docs/MODELS.md).

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
    if context < 0:
        raise ValueError(f"context must be 0 or more voxels, got {context}")
    depth, height, width = data.shape[1:]
    divisor = int(getattr(network, "divisor", 1))
    if mask is not None:
        if tuple(mask.shape) != (depth, height, width):
            raise ValueError(
                f"mask shape {mask.shape} differs from the image's {(depth, height, width)}"
            )
        kept = np.flatnonzero(mask.reshape(depth, -1).any(axis=1)).tolist()
    else:
        kept = list(range(depth))
    # Zeros before Y and X: half the padding, or (anchored) what puts the mask's first row and
    # column on a multiple of the divisor with at least ``context`` zeros before them.
    lead: list[int | None] = [None, None]
    if context and mask is not None and kept:
        starts = [int(np.flatnonzero(mask.any(axis=(0, 2 - a)))[0]) for a in (0, 1)]
        lead = [context + (-(s + context)) % divisor for s in starts]
    pads = []
    for n, before in zip((height, width), lead):
        needed = n + 2 * context if before is None else before + n + context
        # At least two divisors wide: instance norm needs more than one voxel at the deepest
        # level.
        extra = max(-(-needed // divisor), 2) * divisor - n
        before = extra // 2 if before is None else before
        pads.append((before, extra - before))
    (top, bottom), (left, right) = pads
    # F.pad order: last axis first, (before, after).
    padding = (left, right, top, bottom)
    inside = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
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
        # Progress within the batch: a batch of slices takes a second or more on 2 cores.
        logits = yield from predictor.events(batch, first, total)
        with torch.inference_mode():
            logits = logits[inside]
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


#: The views a 2D network can run over, as the axes order of a (z, y, x) volume whose first
#: axis is then sliced: axial slices (z), coronal (y), sagittal (x).
VIEWS = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 1, 0)}


def views_inference(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    views: tuple[str, ...] = ("axial",),
    batch_size: int = 16,
    mask: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    tta: bool = False,
    precision: str = "auto",
    context: int = 0,
) -> Generator[InferenceProgress, None, np.ndarray]:
    """`slice_inference` over the slices of each of ``views`` in turn, probabilities averaged.

    The volume is transposed so that each view's slices come first, and the maps are
    transposed back; this assumes (nearly) isotropic voxels, which the caller ensures.
    Progress counts the slices of every view. Until the last view nothing is final: events
    carry the window just computed and a preview (that view's map so far); during the last
    view each slab of its slices is final (the mean of all views), so the final boxes of the
    last view tile the output as `InferenceProgress` requires.
    """
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown:
        raise ValueError(f"views must be some of {list(VIEWS)}, got {list(views)}")
    data = _as_tensor(image)
    totals = []  # slices computed per view (those without a brain voxel are skipped)
    for view in views:
        order = VIEWS[view]
        if mask is None:
            totals.append(int(data.shape[1 + order[0]]))
        else:
            totals.append(int(mask.transpose(order).reshape(mask.shape[order[0]], -1).any(1).sum()))
    total = sum(totals)
    summed: np.ndarray | None = None
    before = 0
    for index, view in enumerate(views):
        order = VIEWS[view]
        inverse = tuple(int(i) for i in np.argsort(order))
        last = index == len(views) - 1
        engine = slice_inference(
            network,
            data.permute(0, *(a + 1 for a in order)).contiguous(),
            batch_size=batch_size,
            mask=None if mask is None else np.ascontiguousarray(mask.transpose(order)),
            device=device,
            tta=tta,
            precision=precision,
            context=context,
        )
        while True:
            try:
                event = next(engine)
            except StopIteration as stop:
                maps = stop.value.transpose(0, *(a + 1 for a in inverse))
                break
            if event.done == 0 and not event.part and event.total and index:
                continue  # the first event of a later view: nothing computed yet
            box = None if event.box is None else tuple(event.box[a] for a in inverse)
            earlier = summed if last else None  # the previous views' sum, for final values

            def current(region, _event=event, _order=order, _inverse=inverse, _sum=earlier):
                own = _event.current(tuple(region[a] for a in _order))
                own = own.transpose(0, *(a + 1 for a in _inverse))
                if _sum is None:  # not the last view, or the only one
                    return own
                return (_sum[(slice(None), *region)] + own) / len(views)

            yield InferenceProgress(
                before + event.done,
                total,
                box if last else None,
                window=box,
                current=current if event.current is not None else None,
                device=event.device,
                part=event.part,
            )
        summed = maps if summed is None else summed + maps  # a new array: previews keep theirs
        before += totals[index]
    return summed / len(views)
