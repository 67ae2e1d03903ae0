"""Joint augmentation of scans and masks, batched in torch on the training device.

Geometric transforms move scan and mask with the same sampling grid (bilinear/trilinear for the
scan, nearest neighbour for the mask); intensity transforms touch the scan only. Works for 2D
(B, C, Y, X) and 3D (B, C, Z, Y, X) batches; the axial plane is (Y, X).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def random_flip(image, mask, generator=None, p: float = 0.5):
    """Flip each sample along each spatial axis with probability ``p``."""
    image, mask = image.clone(), mask.clone()
    spatial = image.ndim - 2
    for b in range(image.shape[0]):
        axes = [2 + a for a in range(spatial) if torch.rand((), generator=generator) < p]
        if axes:
            image[b] = image[b].flip([a - 1 for a in axes])
            mask[b] = mask[b].flip([a - 1 for a in axes])
    return image, mask


def random_rot90(image, mask, generator=None):
    """Rotate each sample by a random multiple of 90 degrees in the axial (Y, X) plane.

    Needs square axial patches (the shape must not change).
    """
    if image.shape[-1] != image.shape[-2]:
        return image, mask
    image, mask = image.clone(), mask.clone()
    dims = (image.ndim - 3, image.ndim - 2)  # (Y, X) of one sample (C, ..., Y, X)
    for b in range(image.shape[0]):
        k = int(torch.randint(0, 4, (), generator=generator))
        if k:
            image[b] = torch.rot90(image[b], k, dims)
            mask[b] = torch.rot90(mask[b], k, dims)
    return image, mask


def _rotation_matrix(angles: torch.Tensor, spatial: int) -> torch.Tensor:
    """(B, spatial, spatial) rotation; in 3D about the Z axis then small tilts about Y and X."""
    if spatial == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    matrices = []
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        if axis == 0:  # in the axial plane (grid coordinates are x, y, z)
            m = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
        elif axis == 1:
            m = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
        else:
            m = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
        matrices.append(torch.stack([torch.stack(row, -1) for row in m], -2))
    return matrices[0] @ matrices[1] @ matrices[2]


def _resample(image, mask, grid):
    mode = "bilinear"
    image = F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(
        mask.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    ).to(mask.dtype)
    return image, mask


def random_affine(
    image,
    mask,
    generator=None,
    max_degrees: float = 15.0,
    scale: tuple[float, float] = (0.85, 1.15),
    tilt_degrees: float = 5.0,
):
    """Small random rotation (mostly in the axial plane) and isotropic scaling."""
    batch, spatial = image.shape[0], image.ndim - 2
    n_angles = 1 if spatial == 2 else 3
    limits = torch.tensor([max_degrees] + [tilt_degrees] * (n_angles - 1))
    angles = (torch.rand(batch, n_angles, generator=generator) * 2 - 1) * limits * math.pi / 180
    zoom = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, 1, 1, generator=generator)
    linear = _rotation_matrix(angles, spatial) / zoom
    theta = torch.cat([linear, torch.zeros(batch, spatial, 1)], dim=2).to(image)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return _resample(image, mask, grid)


def random_elastic(image, mask, generator=None, magnitude: float = 0.03, control: int = 5):
    """Smooth random deformation: a coarse random displacement field (``control`` points per
    axis, up to ``magnitude`` of the half-extent) upsampled to a dense sampling grid."""
    batch, spatial = image.shape[0], image.ndim - 2
    identity = torch.eye(spatial, spatial + 1).expand(batch, -1, -1).to(image)
    grid = F.affine_grid(identity, list(image.shape), align_corners=False)
    coarse = torch.rand(batch, spatial, *([control] * spatial), generator=generator) * 2 - 1
    mode = "trilinear" if spatial == 3 else "bilinear"
    dense = F.interpolate(
        coarse.to(image) * magnitude, size=image.shape[2:], mode=mode, align_corners=True
    )
    grid = grid + dense.movedim(1, -1)
    return _resample(image, mask, grid)


def random_lesion_contrast(image, mask, generator=None, low: float = 0.25, p_channel: float = 0.5):
    """Fade the oedema towards the surrounding brain in some sequences (the mask is not touched).

    Oedema (WT but not TC, channels 0 and 1 of ``mask``; further channels are ignored) is as
    bright as the scanner and sequence parameters make it: on some exams it is barely brighter
    than normal brain on T2 or FLAIR. Each present channel of each sample, with chance
    ``p_channel``, has the contrast between its oedema and the brain around it (the mean of the
    patch's brain voxels outside the tumour) multiplied by a factor drawn from [``low``, 1]. The
    fade reaches one voxel past the oedema into the brain at a falling weight, so the faded
    region gets no new edge of its own; the tumour core keeps its values, and so does a sample
    with too little normal brain in the patch (under 1 %) to say what "brain" looks like.
    Background and missing channels stay zero. Computed in float32, returned in the image's
    dtype.
    """
    batch, channels, spatial = image.shape[0], image.shape[1], image.ndim - 2
    view = (batch, channels, *([1] * spatial))
    x = image.float()
    pool = F.avg_pool3d if spatial == 3 else F.avg_pool2d
    core = mask[:, 1:2].float().clamp(0, 1)
    oedema = (mask[:, :1].float() - core).clamp(0, 1)
    spread = pool(oedema, 3, stride=1, padding=1, count_include_pad=False)
    oedema = torch.maximum(oedema, spread) * (1 - core)
    brain = (x != 0).any(dim=1, keepdim=True)
    present = (x != 0).flatten(2).any(dim=2).view(view)
    normal = (brain & (mask[:, :1] < 0.5)).float()
    count = normal.flatten(2).sum(dim=2).view(batch, 1, *([1] * spatial))
    reference = (x * normal).flatten(2).sum(dim=2).view(view) / count.clamp_min(1)
    enough = count >= max(1.0, 0.01 * normal[0].numel())
    # Drawn on the generator's device (the CPU), then moved: a CUDA image would not mix.
    chosen = (torch.rand(view, generator=generator) < p_channel).to(x.device) & enough
    factor = low + (1 - low) * torch.rand(view, generator=generator).to(x.device)
    fade = torch.where(chosen, 1 - factor, torch.zeros_like(factor))
    out = x - fade * oedema * (x - reference)
    return torch.where(brain & present, out, x).to(image.dtype)


def random_intensity(
    image,
    generator=None,
    scale: float = 0.1,
    shift: float = 0.1,
    gamma: float = 0.3,
    noise: float = 0.05,
    bias: float = 0.2,
    foreground: torch.Tensor | None = None,
):
    """Per-sample, per-channel intensity changes of z-scored scans (the mask is not touched).

    Scale and shift, gamma on the foreground's range, Gaussian noise and a smooth multiplicative
    bias field. Background (exact zeros, or outside ``foreground``) stays zero, and so does a
    channel that is all zeros: a missing sequence, exactly as inference fills it.
    """
    batch, channels, spatial = image.shape[0], image.shape[1], image.ndim - 2
    view = (batch, channels, *([1] * spatial))
    fg = (image != 0).any(dim=1, keepdim=True) if foreground is None else foreground
    fg = fg & (image != 0).flatten(2).any(dim=2).view(view)  # a missing channel stays zero
    out = image * (1 + (torch.rand(view, generator=generator) * 2 - 1).to(image) * scale)
    out = out + (torch.rand(view, generator=generator) * 2 - 1).to(image) * shift
    if gamma > 0:
        g = torch.exp((torch.rand(view, generator=generator) * 2 - 1) * gamma).to(image)
        low = out.amin(dim=tuple(range(2, out.ndim)), keepdim=True)
        high = out.amax(dim=tuple(range(2, out.ndim)), keepdim=True)
        span = (high - low).clamp_min(1e-6)
        out = ((out - low) / span).clamp_min(0) ** g * span + low
    if bias > 0:
        coarse = torch.randn(batch, channels, *([3] * spatial), generator=generator) * bias
        mode = "trilinear" if spatial == 3 else "bilinear"
        field = F.interpolate(coarse.to(image), size=image.shape[2:], mode=mode, align_corners=True)
        out = out * torch.exp(field)
    if noise > 0:
        out = out + torch.randn(out.shape, generator=generator).to(image) * noise
    return torch.where(fg, out, torch.zeros_like(out))


@dataclass
class JointAugment:
    """The training augmentation: each transform applied to a whole batch with a probability.

    Call it with ``(image, mask)`` of shapes (B, C, *S) and (B, K, *S); returns both augmented.
    ``intensity`` overrides `random_intensity`'s strengths (e.g. ``{"gamma": 0.5}``);
    ``p_lesion_contrast`` is the chance of `random_lesion_contrast` (off by default).
    """

    p_flip: float = 0.5
    p_rot90: float = 0.0
    p_affine: float = 0.3
    p_elastic: float = 0.0
    p_intensity: float = 0.8
    p_lesion_contrast: float = 0.0
    intensity: dict = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)

    def _chance(self, p: float) -> bool:
        return p > 0 and bool(torch.rand((), generator=self.generator) < p)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        g = self.generator
        if self._chance(self.p_affine):
            image, mask = random_affine(image, mask, g)
        if self._chance(self.p_elastic):
            image, mask = random_elastic(image, mask, g)
        if self._chance(self.p_rot90):
            image, mask = random_rot90(image, mask, g)
        if self.p_flip > 0:
            image, mask = random_flip(image, mask, g, self.p_flip)
        if self._chance(self.p_lesion_contrast):
            image = random_lesion_contrast(image, mask, g)
        if self._chance(self.p_intensity):
            image = random_intensity(image, g, **self.intensity)
        return image, mask
