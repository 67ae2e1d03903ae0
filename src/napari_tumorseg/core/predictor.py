"""Running the network on one batch of windows or slices: on the device, in its precision,
with mirroring test-time augmentation, falling back to the CPU when the device runs out of
memory, and reporting progress within a window (`InferenceProgress`)."""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import torch

from .devices import _is_out_of_memory, autocast_dtype, select_device
from .jobs import run_to_end
from .windows import Box, _window_box


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
        Windows or slices of the batch after ``done`` computed so far, in [0, batch size):
        events in the middle of a batch (``box`` and ``window`` None) say how far its forward
        pass has got, so ``(done + part) / total`` is the share of the work done.
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

    def events(
        self, batch: torch.Tensor, done: int, total: int
    ) -> Generator[InferenceProgress, None, torch.Tensor]:
        """`steps` as an engine's events: ``batch`` holds the windows or slices after ``done``
        of ``total``, and each event's ``part`` counts those computed so far (fractions of the
        batch's count). Returns the logits."""
        steps = self.steps(batch)
        while True:
            try:
                part = next(steps)
            except StopIteration as stop:
                return stop.value
            yield InferenceProgress(
                done, total, None, part=part * len(batch), device=self.device.type
            )

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


def _output_channels(network, data: torch.Tensor, predictor: _Predictor) -> int:
    out = getattr(network, "config", {}).get("out_channels")
    if out is not None:
        return int(out)
    divisor = int(getattr(network, "divisor", 1))
    probe = data.new_zeros((1, data.shape[0], *([divisor] * (data.ndim - 1))))
    with torch.inference_mode():
        return int(predictor(probe).shape[1])
