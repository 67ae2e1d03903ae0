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
        return self.second(x, self.first(x))

    def first(self, x: torch.Tensor) -> torch.Tensor:
        """The first convolution (normalised, activated): half of `forward`."""
        return self.act(self.norm1(self.conv1(x)))

    def second(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The rest of `forward`, from the block's input ``x`` and ``first(x)``."""
        y = self.norm2(self.conv2(y))
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
        """`forward` a convolution at a time: yields the fraction of the work (multiply-adds)
        done after each, and returns the logits.

        On 2 CPU cores one 112^3 window takes 5-20 s in one call, which no progress bar can
        show and no Cancel can interrupt; its longest convolution here takes a sixth of that.
        Each step runs inside ``context()`` (inference mode, autocast), left between steps so
        that the caller's code between yields runs outside it.
        """
        costs = self.step_costs(x.shape[2:])
        total = sum(costs)
        done = 0.0

        def advance() -> float:
            nonlocal done
            done += costs.pop(0)
            return done / total

        skips = []
        for encoder in self.encoders:
            with context():
                y = encoder.first(x)
            yield advance()
            with context():
                x = encoder.second(x, y)
            skips.append(x)
            yield advance()
        skips.pop()  # the bottleneck output is x itself
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            with context():
                joined = torch.cat([upsample(x), skips.pop()], dim=1)
                y = decoder.first(joined)
            yield advance()
            with context():
                x = decoder.second(joined, y)
            yield advance()
        with context():
            return self.head(x)

    def step_costs(self, spatial_shape) -> list[float]:
        """Relative cost of each step of `forward_steps` for an input of ``spatial_shape``."""
        voxels = math.prod(int(s) for s in spatial_shape)
        levels = len(self.encoders)
        at = [voxels / (2**self.spatial_dims) ** level for level in range(levels)]
        costs = []
        for level, encoder in enumerate(self.encoders):
            costs += encoder.step_costs(at[level])
        for index, decoder in enumerate(self.decoders):
            costs += decoder.step_costs(at[levels - 2 - index])
        return costs


def build_network(config: dict) -> UNet:
    """A network from the ``architecture`` section of a model card."""
    config = dict(config)
    name = config.pop("architecture", "UNet")
    if name != "UNet":
        raise ValueError(f"unknown architecture {name!r}")
    return UNet(**config)
