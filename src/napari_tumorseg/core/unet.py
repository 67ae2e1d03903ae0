"""One U-Net class for 2 and 3 spatial dimensions.

The classic shape (Ronneberger et al., MICCAI 2015; Cicek et al., MICCAI 2016): a contracting path
of convolution blocks with down-sampling, an expanding path of up-convolutions whose outputs are
concatenated with the matching contracting features (skip connections), and a 1x1 output layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 -- torch's own name


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "instance":
        cls = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        return cls(channels, affine=True)
    if kind == "batch":
        return (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown normalisation {kind!r}; use instance, batch or group")


class ConvBlock(nn.Module):
    """Two 3x3(x3) convolutions, each followed by normalisation and LeakyReLU.

    The first convolution has ``stride`` (2 to down-sample). With ``residual=True`` the block adds
    a projected shortcut of its input (He et al., CVPR 2016).

    Shapes: (B, in_channels, *S) -> (B, out_channels, *S / stride).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm: str = "instance",
        residual: bool = False,
    ) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, spatial_dims, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, spatial_dims, out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.shortcut = None
        if residual:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm(norm, spatial_dims, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_conv2(x, self.conv2(self.after_conv1(self.conv1(x))))

    def after_conv1(self, y: torch.Tensor) -> torch.Tensor:
        """What follows the first convolution: normalisation and activation."""
        return self.act(self.norm1(y))

    def after_conv2(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What follows the second convolution ``y``: normalisation, the shortcut of the
        block's input ``x``, activation."""
        y = self.norm2(y)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.act(y)

    def step_costs(self, out_voxels: float) -> list[float]:
        """Multiply-adds of `first` and `second` for ``out_voxels`` output voxels."""
        kernel = math.prod(self.conv1.kernel_size)
        return [
            float(conv.in_channels * conv.out_channels * kernel * out_voxels)
            for conv in (self.conv1, self.conv2)
        ]


class UNet(nn.Module):
    """U-Net for 2D slices or 3D sub-volumes.

    Parameters
    ----------
    spatial_dims : {2, 3}
        2 for axial slices (B, C, Y, X), 3 for sub-volumes (B, C, Z, Y, X).
    in_channels : int
        Input channels (4 MRI sequences in the order t1, t1ce, t2, flair).
    out_channels : int
        Output channels (3 region logits: WT, TC, ET).
    features : sequence of int
        Channels at each resolution level; its length is the depth (number of levels). Each
        level after the first halves every spatial size, so inputs must be divisible by
        ``2 ** (len(features) - 1)``.
    norm : {"instance", "batch", "group"}
        Normalisation after each convolution.
    residual : bool
        Residual convolution blocks.

    Shapes
    ------
    forward: (B, in_channels, *S) -> (B, out_channels, *S) logits.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        features=(16, 32, 64, 128, 256),
        norm: str = "instance",
        residual: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        features = [int(f) for f in features]
        self.spatial_dims = spatial_dims
        self.config = {
            "architecture": "UNet",
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "features": features,
            "norm": norm,
            "residual": residual,
        }
        conv = _conv(spatial_dims)
        up = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.encoders = nn.ModuleList()
        channels = in_channels
        for level, width in enumerate(features):
            stride = 1 if level == 0 else 2
            self.encoders.append(ConvBlock(spatial_dims, channels, width, stride, norm, residual))
            channels = width
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(features[:-1]):
            self.upsamplers.append(up(channels, width, kernel_size=2, stride=2))
            self.decoders.append(ConvBlock(spatial_dims, 2 * width, width, 1, norm, residual))
            channels = width
        self.head = conv(channels, out_channels, kernel_size=1)

    @property
    def divisor(self) -> int:
        """Spatial sizes of the input must be multiples of this."""
        return 2 ** (len(self.config["features"]) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            x = upsample(x)
            x = decoder(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)

    def forward_steps(
        self, x: torch.Tensor, context: Callable[[], AbstractContextManager] = nullcontext
    ) -> Generator[float, None, torch.Tensor]:
        """`forward` in small steps: yields the fraction of the work (multiply-adds) done after
        each, and returns the logits (the same, up to float rounding).

        On 2 CPU cores one 112^3 window takes 5-20 s in one call, which no progress bar can
        show and no Cancel can interrupt. Here each convolution is a step, and one that costs
        more than 1/`MIN_STEPS` of the whole is computed in parts (slabs of its output
        slices: `_conv_in_parts`), so no step takes more than about
        1/`MIN_STEPS` of the window. Each step runs inside ``context()`` (inference mode,
        autocast), left between steps so that the caller's code runs outside it.
        """
        plan = self._step_plan(x.shape[2:])
        total = sum(cost for _, cost, _ in plan)
        parts = {id(conv): n for conv, _, n in plan}
        costs = {id(conv): cost / n for conv, cost, n in plan}
        done = 0.0

        def convolution(conv: nn.Module, x: torch.Tensor):
            nonlocal done
            steps = _conv_in_parts(conv, x, parts[id(conv)], context)
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    return stop.value
                done += costs[id(conv)]
                yield done / total

        def block(module: ConvBlock, x: torch.Tensor):
            y = yield from convolution(module.conv1, x)
            with context():
                y = module.after_conv1(y)
            y = yield from convolution(module.conv2, y)
            with context():
                return module.after_conv2(x, y)

        skips = []
        for encoder in self.encoders:
            x = yield from block(encoder, x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            with context():
                joined = torch.cat([upsample(x), skips.pop()], dim=1)
            x = yield from block(decoder, joined)
        with context():
            return self.head(x)

    def _step_plan(self, spatial_shape) -> list[tuple[nn.Module, float, int]]:
        """``(convolution, multiply-adds, parts)`` of every 3x3(x3) convolution of
        `forward_steps` for an input of ``spatial_shape``, in the order they run."""
        voxels = math.prod(int(s) for s in spatial_shape)
        levels = len(self.encoders)
        at = [voxels / (2**self.spatial_dims) ** level for level in range(levels)]
        blocks = [(e, at[level]) for level, e in enumerate(self.encoders)]
        blocks += [(d, at[levels - 2 - index]) for index, d in enumerate(self.decoders)]
        convs = [
            (conv, cost)
            for module, out_voxels in blocks
            for conv, cost in zip((module.conv1, module.conv2), module.step_costs(out_voxels))
        ]
        largest = sum(cost for _, cost in convs) / MIN_STEPS
        return [(conv, cost, max(1, math.ceil(cost / largest - 1e-9))) for conv, cost in convs]


#: The fewest steps `UNet.forward_steps` splits a forward pass into (its largest convolutions
#: in parts): on 2 CPU cores a 112^3 window's step then takes well under a second.
MIN_STEPS = 24


def _conv_in_parts(
    conv: nn.Module, x: torch.Tensor, parts: int, context: Callable[[], AbstractContextManager]
) -> Generator[None, None, torch.Tensor]:
    """``conv(x)`` computed in ``parts`` slabs of output slices along the first spatial axis,
    yielding after each; each slab reads the input slices under its kernel (zeros where they
    fall outside ``x``, so only the first and last slabs are padded) and is written into the
    output in place, so the result is ``conv(x)``'s without a padded copy of ``x`` or a
    concatenation of the slabs. (Slabs of output channels instead ran the 3D model at half its
    speed: convolutions with few output channels are slow.)"""
    size = x.shape[2]
    plain = (
        parts <= 1
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or any(d != 1 for d in conv.dilation)
    )
    out_size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    if plain or out_size < 2:
        with context():
            y = conv(x)
        yield
        return y
    function = F.conv3d if x.dim() == 5 else F.conv2d
    stride, kernel, pad = conv.stride[0], conv.kernel_size[0], conv.padding[0]
    rest = (0, *conv.padding[1:])  # the other axes are padded by the convolution itself
    parts = min(parts, out_size)
    bounds = [round(i * out_size / parts) for i in range(parts + 1)]
    out = None
    for first, last in zip(bounds, bounds[1:]):
        with context():
            low, high = first * stride - pad, (last - 1) * stride - pad + kernel
            slab = x[:, :, max(low, 0) : min(high, size)]
            if low < 0 or high > size:
                edges = (max(-low, 0), max(high - size, 0))
                slab = F.pad(slab, (0, 0) * (x.dim() - 3) + edges)
            y = function(slab, conv.weight, conv.bias, conv.stride, rest)
            if out is None:
                out = y.new_empty((*y.shape[:2], out_size, *y.shape[3:]))
            out[:, :, first:last] = y
        yield
    return out


def build_network(config: dict) -> UNet:
    """A network from the ``architecture`` section of a model card."""
    config = dict(config)
    name = config.pop("architecture", "UNet")
    if name != "UNet":
        raise ValueError(f"unknown architecture {name!r}")
    return UNet(**config)
