"""Registration and resampling of the sequences of one exam (SimpleITK, no Qt).

Rigid (or affine) registration of one scan to another with Mattes mutual information, as a
generator that yields progress and can be stopped between yields; resampling onto a reference grid;
and `stack_sequences`, which turns the scans of an exam into one multi-channel `Volume`.

Conventions
-----------
- Every transform here follows the ITK convention: it maps a point of the *fixed* (reference)
  image's physical space (LPS, mm) to the corresponding point of the *moving* image's space. It is
  the transform `SimpleITK.Resample` needs to bring the moving image onto the fixed grid, and what
  `SimpleITK.WriteTransform` writes for other ITK tools.
- The optimisation runs level by level on a multi-resolution pyramid (4, 2, 1 times the finest
  in-plane spacing by default), each level smoothed with a Gaussian of 2, 1, 0 mm.
  Thick slices are not shrunk below their own spacing, so 5.5 mm clinical slabs keep every slice.
- The metric samples a fixed random subset of the fixed scan's foreground (a fixed seed: the same
  inputs give the same result), and a quality check after registration compares the foreground
  masks of both scans, so that a failed registration is reported instead of passed on silently.
- No global SimpleITK setting is changed: ``threads`` applies to this registration only.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import TumorSegError
from .io import (
    SEQUENCES,
    OutputFiles,
    check_output_path,
    check_outputs_apart,
    read_scan,
    write_volume,
)
from .jobs import map_events, run_to_end
from .volume import Volume

__all__ = [
    "RegistrationProgress",
    "RegistrationResult",
    "StackResult",
    "foreground_mask",
    "reference_grid",
    "register",
    "register_files",
    "register_to_reference",
    "resample_to",
    "stack_sequences",
]

#: Dice of the foreground masks below which a registration is reported as poor.
POOR_QUALITY_DICE = 0.85
#: Physical overlap (fraction of the smaller scan's extent) below which, or ratio of the two
#: fields of view (volume) above which, the fields of view are reported as very different.
SMALL_OVERLAP = 0.5
LARGE_FOV_RATIO = 4.0

_TRANSFORMS = ("rigid", "affine")
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
_OUTSIDE = 2  # value of a resampled 0/1 mask outside the moving scan's field of view
_TRANSFORM_SUFFIXES = (".tfm", ".txt", ".mat", ".h5", ".hdf5")


# ============================================================================ results
@dataclass(frozen=True)
class RegistrationProgress:
    """One progress event of a registration (or of a stack of them).

    Attributes
    ----------
    sequence : str
        Name of the scan being registered (``Volume.name`` of the moving scan).
    stage : str
        ``"prepare"`` (checks, masks, initialisation), ``"optimise"`` (one optimiser iteration),
        ``"resample"`` (writing the moved scan) or ``"done"``.
    level : int
        Pyramid level, 0 = coarsest; -1 outside the optimisation.
    levels : int
        Number of pyramid levels.
    iteration : int
        Optimiser iteration within the level (0 outside the optimisation).
    metric : float
        Mattes mutual information at this iteration (negative; lower is better); NaN outside the
        optimisation.
    step, steps : int
        Index of this scan among the scans of a `stack_sequences` call, and their number.
    """

    sequence: str
    stage: str
    level: int = -1
    levels: int = 0
    iteration: int = 0
    metric: float = math.nan
    step: int = 0
    steps: int = 1

    @property
    def fraction(self) -> float:
        """Rough overall progress in [0, 1] (for a progress bar)."""
        if self.stage == "done":
            within = 1.0
        elif self.stage == "resample":
            within = 0.95
        elif self.stage == "optimise" and self.levels:
            within = 0.05 + 0.9 * (self.level + min(self.iteration, 50) / 50) / self.levels
        else:
            within = 0.0
        return (self.step + within) / max(self.steps, 1)


@dataclass
class RegistrationResult:
    """The outcome of registering a moving scan to a fixed one.

    Attributes
    ----------
    transform : SimpleITK.Transform
        Maps points of the fixed scan's space to the moving scan's space (LPS, mm; ITK convention).
        `SimpleITK.Euler3DTransform` for rigid, `SimpleITK.AffineTransform` for affine.
    metric : float
        Final Mattes mutual information (negative; lower is better); NaN when not optimised.
    moved : Volume
        The moving scan resampled on the output grid (the fixed scan's by default), float32.
    quality : float
        Dice of the foreground (head or brain) masks of both scans after registration, within
        their common field of view; NaN when not computed.
    quality_before : float
        The same Dice before registration (scanner coordinates, identity transform).
    warning : str
        Empty when all is well; otherwise why the result should be checked by eye.
    initialisation : str
        ``"identity"`` (scanner coordinates) or ``"moments"`` (foreground centres of mass aligned).
    iterations : int
        Optimiser iterations over all levels.
    seconds : float
        Wall time of the registration, resampling included.
    stop_condition : str
        The optimiser's stop condition at the last level.
    """

    transform: sitk.Transform
    metric: float
    moved: Volume
    quality: float = math.nan
    quality_before: float = math.nan
    warning: str = ""
    initialisation: str = "identity"
    iterations: int = 0
    seconds: float = 0.0
    stop_condition: str = ""

    @property
    def ok(self) -> bool:
        """True when no warning was raised."""
        return not self.warning


@dataclass
class StackResult:
    """A multi-channel exam made by `stack_sequences`.

    Attributes
    ----------
    volume : Volume
        (C, Z, Y, X) float32 on the output grid; ``volume.channels`` names the channels in
        `SEQUENCES` order (only the sequences given).
    reference : str
        The sequence every other one was registered to.
    results : dict[str, RegistrationResult]
        Per sequence (the reference included, with an identity transform).
    warnings : list[str]
        One line per sequence whose registration should be checked by eye.
    """

    volume: Volume
    reference: str
    results: dict[str, RegistrationResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def transforms(self) -> dict[str, sitk.Transform]:
        """Sequence -> transform from the reference's space to that sequence's space."""
        return {seq: r.transform for seq, r in self.results.items()}

    @property
    def metrics(self) -> dict[str, float]:
        """Sequence -> final Mattes mutual information (NaN for the reference and skipped ones)."""
        return {seq: r.metric for seq, r in self.results.items()}

    @property
    def quality(self) -> dict[str, float]:
        """Sequence -> foreground Dice with the reference after registration."""
        return {seq: r.quality for seq, r in self.results.items()}


# ============================================================================ grids
def reference_grid(volume: Volume, spacing_mm: float | tuple[float, float, float] = 1.0) -> Volume:
    """An empty grid covering the same physical extent as ``volume`` at a new voxel spacing.

    Parameters
    ----------
    volume : Volume
        The scan whose field of view and orientation (direction cosines) are kept.
    spacing_mm : float or (float, float, float)
        New voxel size in mm, in array order (Z, Y, X) like `Volume.spacing`; one number for
        isotropic voxels.

    Returns
    -------
    Volume
        A uint8 array of zeros on the new grid, centred on the same physical point as ``volume``;
        ``source`` is None (the grid belongs to no file).
    """
    spacing_zyx = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,)).copy()
    if not np.all(np.isfinite(spacing_zyx)) or np.any(spacing_zyx <= 0):
        raise TumorSegError(f"voxel spacing must be positive, got {spacing_mm} mm")
    old_spacing = volume.spacing
    extent = np.asarray(volume.spatial_shape, dtype=float) * old_spacing
    shape = tuple(int(max(1, round(e / s))) for e, s in zip(extent, spacing_zyx, strict=True))
    direction = volume.direction
    # Centre of the old grid, in voxel index (x, y, z) and then in world coordinates.
    old_centre = (np.asarray(volume.spatial_shape[::-1], dtype=float) - 1) / 2
    centre = volume.affine[:3, :3] @ old_centre + volume.affine[:3, 3]
    linear = direction * spacing_zyx[::-1]
    new_centre = (np.asarray(shape[::-1], dtype=float) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ new_centre
    return Volume(
        array=np.zeros(shape, dtype=np.uint8),
        affine=affine,
        name=f"{volume.name} grid" if volume.name else "grid",
    )


def resample_to(
    volume: Volume,
    reference: Volume,
    transform: sitk.Transform | None = None,
    interpolation: str = "auto",
    default: float = 0.0,
) -> Volume:
    """``volume`` resampled on the grid of ``reference``.

    Parameters
    ----------
    volume : Volume
        A scan or label map, (Z, Y, X) or (C, Z, Y, X) (each channel is resampled).
    reference : Volume
        Gives the output grid (shape, spacing, orientation, position); its voxels are not used.
    transform : SimpleITK.Transform, optional
        Maps points of the reference's space to ``volume``'s space (ITK convention, e.g.
        `RegistrationResult.transform`); None is the identity (scanner coordinates).
    interpolation : {"auto", "linear", "nearest"}
        ``"auto"`` is nearest neighbour for label maps (``name == "labels"``) and linear otherwise.
    default : float
        Value of output voxels that fall outside ``volume``.

    Returns
    -------
    Volume
        On ``reference``'s grid (and with its ``source``); float32 for linear interpolation, the
        input dtype for nearest neighbour.
    """
    if interpolation == "auto":
        interpolation = "nearest" if volume.name == "labels" else "linear"
    if interpolation not in _INTERPOLATORS:
        raise ValueError(
            f"interpolation must be 'auto', 'linear' or 'nearest', not {interpolation!r}"
        )
    if volume.array.ndim not in (3, 4):
        raise TumorSegError(
            f"cannot resample an array of shape {volume.array.shape}; (Z, Y, X) or (C, Z, Y, X) "
            "is needed",
            _where(volume),
        )
    if volume.same_grid(reference) and _is_identity(transform, reference):
        array = volume.array if interpolation == "nearest" else volume.array.astype(np.float32)
        return reference.with_array(array, name=volume.name, channels=volume.channels)
    grid = reference.to_sitk(0) if reference.array.ndim == 4 else _grid_image(reference)
    channels = [volume.array] if volume.array.ndim == 3 else list(volume.array)
    out = []
    for index, _ in enumerate(channels):
        image = volume.to_sitk(None if volume.array.ndim == 3 else index)
        if interpolation == "linear":
            image = sitk.Cast(image, sitk.sitkFloat32)
        out.append(
            sitk.GetArrayFromImage(
                sitk.Resample(
                    image,
                    grid,
                    sitk.Transform() if transform is None else transform,
                    _INTERPOLATORS[interpolation],
                    default,
                )
            )
        )
    array = out[0] if volume.array.ndim == 3 else np.stack(out)
    return reference.with_array(array, name=volume.name, channels=volume.channels)


def _grid_image(volume: Volume) -> sitk.Image:
    """A tiny-memory SimpleITK image carrying ``volume``'s grid (for ``Resample``'s reference)."""
    image = sitk.Image([int(n) for n in volume.spatial_shape[::-1]], sitk.sitkUInt8)
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    u, _, vt = np.linalg.svd(volume.direction)
    image.SetDirection(tuple((u @ vt).ravel().tolist()))
    return image


def _is_identity(transform: sitk.Transform | None, grid: Volume) -> bool:
    """True when ``transform`` moves no corner of ``grid`` by more than 1e-6 mm."""
    if transform is None:
        return True
    corners = _corners(grid)
    moved = np.array([transform.TransformPoint(tuple(map(float, c))) for c in corners])
    return bool(np.abs(moved - corners).max() < 1e-6)


# ============================================================================ checks
def _where(volume: Volume) -> str:
    """How to name a volume in an error message: its file, else its name."""
    if volume.source is not None and volume.source.path is not None:
        return str(volume.source.path)
    return volume.name or "volume"


def _check_scan(volume: Volume, role: str) -> None:
    """Raise TumorSegError unless ``volume`` is a 3D scan with some contrast."""
    array = volume.array
    where = _where(volume)
    if array.ndim != 3:
        raise TumorSegError(
            f"the {role} scan has shape {array.shape}; registration needs one 3D scan (Z, Y, X)",
            where,
        )
    if min(array.shape) < 3:
        shape = "x".join(map(str, array.shape))
        raise TumorSegError(
            f"is a 2D image or a slab too thin to register (shape {shape} (Z, Y, X)); a 3D scan "
            "with at least 3 voxels along every axis is needed",
            where,
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise TumorSegError("holds NaN or infinite voxels; it cannot be registered", where)
    low, high = array.min(), array.max()
    if low == high:
        what = "all voxels are 0" if high == 0 else f"all voxels are {high}"
        raise TumorSegError(f"is empty ({what}): there is nothing to register", where)


def _corners(volume: Volume) -> np.ndarray:
    """World (LPS) positions of the 8 outer corners of a volume's voxel grid, shape (8, 3)."""
    shape = np.asarray(volume.spatial_shape[::-1], dtype=float)
    lo, hi = -0.5 * np.ones(3), shape - 0.5
    index = np.array([[(lo, hi)[(k >> a) & 1][a] for a in range(3)] for k in range(8)])
    return index @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def _inside_fraction(volume: Volume, other: Volume, n: int = 12) -> float:
    """Fraction of a regular n^3 lattice over ``volume``'s extent that lies inside ``other``."""
    shape = np.asarray(volume.spatial_shape[::-1], dtype=float)
    axes = [np.linspace(-0.5, s - 0.5, n) for s in shape]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    inverse = np.linalg.inv(other.affine)
    other_index = world @ inverse[:3, :3].T + inverse[:3, 3]
    other_shape = np.asarray(other.spatial_shape[::-1], dtype=float)
    inside = np.all((other_index >= -0.5) & (other_index <= other_shape - 0.5), axis=1)
    return float(inside.mean())


def _check_overlap(fixed: Volume, moving: Volume) -> str:
    """Raise when two scans share no physical space; a warning when they share little."""
    in_moving = _inside_fraction(fixed, moving)
    in_fixed = _inside_fraction(moving, fixed)
    if max(in_moving, in_fixed) == 0.0:
        f_lo, f_hi = _corners(fixed).min(0), _corners(fixed).max(0)
        m_lo, m_hi = _corners(moving).min(0), _corners(moving).max(0)
        raise TumorSegError(
            f"does not overlap the reference scan {_where(fixed)} in physical space (its field "
            f"of view spans {_fmt_box(m_lo, m_hi)} mm, the reference's {_fmt_box(f_lo, f_hi)} mm "
            "LPS); are both scans of the same exam, with valid headers?",
            _where(moving),
        )
    smaller = in_fixed if _extent_volume(moving) <= _extent_volume(fixed) else in_moving
    ratio = max(_extent_volume(moving), _extent_volume(fixed)) / min(
        _extent_volume(moving), _extent_volume(fixed)
    )
    if smaller < SMALL_OVERLAP or ratio > LARGE_FOV_RATIO:
        return (
            f"{moving.name or 'moving scan'} and {fixed.name or 'reference'} cover very different "
            f"fields of view ({100 * smaller:.0f}% of the smaller one overlaps the other, volume "
            f"ratio {ratio:.1f}); check the registration by eye"
        )
    return ""


def _extent_volume(volume: Volume) -> float:
    return float(np.prod(np.asarray(volume.spatial_shape) * volume.spacing))


def _fmt_box(lo, hi) -> str:
    return " x ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(lo, hi, strict=True))


# ============================================================================ masks
def foreground_mask(image: sitk.Image, target_mm: float = 2.0) -> sitk.Image:
    """Head (or brain, for skull-stripped scans) mask of an MRI scan on a coarse grid.

    Otsu's threshold on log intensities (robust to the bright tails of T2 and FLAIR), with the
    enclosed holes filled.

    Parameters
    ----------
    image : SimpleITK.Image
        A 3D scan.
    target_mm : float
        The mask is computed on a grid shrunk (by whole voxels) to about this voxel size in mm.

    Returns
    -------
    SimpleITK.Image
        uint8, 1 inside, 0 outside, on the shrunk grid (same physical extent).
    """
    factors = [max(1, int(round(target_mm / s))) for s in image.GetSpacing()]
    small = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    array = sitk.GetArrayViewFromImage(small)
    low = float(array.min())
    logged = sitk.Log(sitk.Clamp(small - low, sitk.sitkFloat32, 0.0) + 1.0)
    mask = sitk.OtsuThreshold(logged, 0, 1, 128)
    return sitk.BinaryFillhole(sitk.Cast(mask, sitk.sitkUInt8))


def _mask_dice(fixed_mask: sitk.Image, moving_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Dice of two foreground masks within their common field of view, on the fixed mask's grid."""
    moved = sitk.Resample(
        moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, _OUTSIDE, sitk.sitkUInt8
    )
    moved_array = sitk.GetArrayViewFromImage(moved)
    fixed_array = sitk.GetArrayViewFromImage(fixed_mask) > 0
    common = moved_array != _OUTSIDE
    a = fixed_array & common
    b = (moved_array == 1) & common
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 0.0


def _centroid(mask: sitk.Image) -> np.ndarray | None:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        return None
    return np.asarray(stats.GetCentroid(1), dtype=float)


# ============================================================================ registration
@dataclass(frozen=True)
class _Level:
    shrink: float  # multiple of the finest spacing of the fixed scan
    sigma_mm: float
    sampling: float  # fraction of the level's voxels drawn (then restricted to the mask)
    learning_rate: float  # initial step, in physical-shift-scaled units (about mm)
    min_step: float
    iterations: int


#: Coarse levels sample densely (cheap), the full-resolution level sparsely (costly per sample).
#: Steps are in the optimiser's physical-shift-scaled units (about mm of voxel motion).
_DEFAULT_LEVELS = (
    _Level(4, sigma_mm=2.0, sampling=0.5, learning_rate=4.0, min_step=0.01, iterations=200),
    _Level(2, sigma_mm=1.0, sampling=0.25, learning_rate=1.0, min_step=0.005, iterations=100),
    _Level(1, sigma_mm=0.0, sampling=0.05, learning_rate=0.5, min_step=0.005, iterations=60),
)


def _pyramid_level(image: sitk.Image, shrink: float, sigma_mm: float) -> sitk.Image:
    """Smoothed and shrunk copy of ``image`` for one pyramid level.

    Each axis is shrunk by whole voxels towards ``shrink`` times the finest spacing, never below
    its own spacing (thick slices are kept), by block averaging; then smoothed with a Gaussian of
    ``sigma_mm`` on the axes where that is at least half a voxel.
    """
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    target = shrink * spacing.min()
    # An axis keeps at least 2 voxels (a small field of view would otherwise shrink to none).
    factors = [
        max(1, min(int(round(target / s)), n // 2)) for s, n in zip(spacing, image.GetSize())
    ]
    if max(factors) > 1:
        image = sitk.BinShrink(image, factors)
    if sigma_mm > 0:
        spacing = np.asarray(image.GetSpacing(), dtype=float)
        variance = [sigma_mm**2 if sigma_mm >= 0.5 * s else 0.0 for s in spacing]
        if any(variance):
            image = sitk.DiscreteGaussian(image, variance, 32, 0.01, True)
    return image


def register_to_reference(
    fixed: Volume,
    moving: Volume,
    transform: str = "rigid",
    *,
    bins: int = 50,
    seed: int = 20240613,
    use_mask: bool = True,
    threads: int | None = None,
    output: Volume | None = None,
    levels: tuple[_Level, ...] = _DEFAULT_LEVELS,
) -> Generator[RegistrationProgress, None, RegistrationResult]:
    """Register ``moving`` to ``fixed``, yielding progress; returns a `RegistrationResult`.

    A generator: iterate it to run the registration (``result = yield from ...`` or
    `register`); the result is the ``StopIteration`` value. Closing it (``.close()``, or dropping
    it) stops the optimiser within one iteration and waits for the worker thread to end.

    Parameters
    ----------
    fixed : Volume
        The reference scan (Z, Y, X); its grid receives the moved scan.
    moving : Volume
        The scan to align (Z, Y, X), any grid overlapping ``fixed`` in physical space.
    transform : {"rigid", "affine"}
        Rigid (3 rotations + 3 translations, `SimpleITK.Euler3DTransform`) or affine (12
        parameters).
    bins : int
        Histogram bins of the Mattes mutual information metric.
    seed : int
        Seed of the metric's random sampling; equal inputs and seed give equal results.
    use_mask : bool
        Sample the metric only on the fixed scan's foreground (head or brain): faster, and the
        empty background does not pull the optimum.
    threads : int, optional
        Threads of the optimiser (the bulk of the work); None uses SimpleITK's global default,
        which is never changed here.
    output : Volume, optional
        Grid for ``RegistrationResult.moved`` (default: ``fixed``'s), e.g. a `reference_grid`.
    levels : tuple
        Pyramid schedule (advanced; see ``_DEFAULT_LEVELS``).

    Yields
    ------
    RegistrationProgress
        ``"prepare"``, then one ``"optimise"`` event per optimiser iteration, ``"resample"``,
        ``"done"``.

    Returns
    -------
    RegistrationResult

    Raises
    ------
    TumorSegError
        A scan that is not 3D, is empty or constant, holds NaN, or shares no physical space with
        the other; a registration that finds too few overlapping voxels. Being a generator, it
        raises on the first ``next()``, not when called.
    """
    start = time.perf_counter()
    if transform not in _TRANSFORMS:
        raise TumorSegError(f"unknown transform {transform!r}; use 'rigid' or 'affine'")
    _check_scan(fixed, "reference")
    _check_scan(moving, "moving")
    warnings = [w for w in [_check_overlap(fixed, moving)] if w]
    name = moving.name or "moving"
    n_levels = len(levels)
    yield RegistrationProgress(name, "prepare", levels=n_levels)

    fixed_image = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    moving_image = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    fixed_mask = foreground_mask(fixed_image)
    moving_mask = foreground_mask(moving_image)
    fixed_centre = _centroid(fixed_mask)
    moving_centre = _centroid(moving_mask)
    if fixed_centre is None or moving_centre is None:
        raise TumorSegError(
            "has no foreground (head or brain) that can be told from the background",
            _where(fixed if fixed_centre is None else moving),
        )

    # Starts: scanner coordinates, and the foreground centres of mass aligned (for scans from
    # different sessions or scanners); the one whose masks overlap best is tried first, the other
    # only when the first ends with a poor overlap.
    identity = sitk.Euler3DTransform()
    identity.SetCenter(fixed_centre.tolist())
    moments = sitk.Euler3DTransform(identity)
    moments.SetTranslation((moving_centre - fixed_centre).tolist())
    quality_before = _mask_dice(fixed_mask, moving_mask, identity)
    starts = [("identity", identity), ("moments", moments)]
    if _mask_dice(fixed_mask, moving_mask, moments) > quality_before + 0.01:
        starts.reverse()

    metric_mask = sitk.BinaryDilate(fixed_mask, [2, 2, 2]) if use_mask else None
    events: queue.SimpleQueue = queue.SimpleQueue()
    cancel = threading.Event()
    done = object()
    state: dict = {"iterations": 0, "best": None}

    def optimise(initial: sitk.Euler3DTransform) -> tuple[sitk.Transform, float, str]:
        if transform == "rigid":
            current: sitk.Transform = sitk.Euler3DTransform(initial)
        else:
            current = sitk.AffineTransform(3)
            current.SetCenter(initial.GetCenter())
            current.SetTranslation(initial.GetTranslation())
        metric, stop = math.nan, ""
        for index, level in enumerate(levels):
            if cancel.is_set():
                break
            method = _method(bins, seed, level, metric_mask, threads)
            method.SetInitialTransform(current, inPlace=True)

            def on_iteration(method=method, index=index) -> None:
                if cancel.is_set():
                    method.StopRegistration()
                    return
                state["iterations"] += 1
                events.put(
                    RegistrationProgress(
                        name,
                        "optimise",
                        level=index,
                        levels=n_levels,
                        iteration=method.GetOptimizerIteration(),
                        metric=method.GetMetricValue(),
                    )
                )

            method.AddCommand(sitk.sitkIterationEvent, on_iteration)
            try:
                method.Execute(
                    _pyramid_level(fixed_image, level.shrink, level.sigma_mm),
                    _pyramid_level(moving_image, level.shrink, level.sigma_mm),
                )
                metric = method.GetMetricValue()
                stop = method.GetOptimizerStopConditionDescription()
            finally:
                method.RemoveAllCommands()
        return current, metric, stop

    def run() -> None:
        try:
            for initialisation, initial in starts:
                if cancel.is_set():
                    return
                current, metric, stop = optimise(initial)
                quality = _mask_dice(fixed_mask, moving_mask, current)
                best = state["best"]
                if best is None or quality > best[3]:
                    state["best"] = (initialisation, current, metric, quality, stop)
                if quality >= POOR_QUALITY_DICE:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread
            state["error"] = exc
        finally:
            events.put(done)

    worker = threading.Thread(target=run, name=f"tumorseg-register-{name}", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if event is done:
                break
            yield event
    finally:
        cancel.set()
        worker.join()
    if "error" in state:
        raise _registration_error(state["error"], moving, fixed) from None

    yield RegistrationProgress(name, "resample", levels=n_levels)
    initialisation, current, metric, quality, stop = state["best"]
    if quality < POOR_QUALITY_DICE:
        warnings.append(
            f"{name}: poor overlap with {fixed.name or 'the reference'} after registration "
            f"(foreground Dice {quality:.2f}); check the result by eye"
        )
    elif quality < quality_before - 0.02:
        warnings.append(
            f"{name}: registration lowered the foreground overlap with "
            f"{fixed.name or 'the reference'} (Dice {quality_before:.2f} -> {quality:.2f}); "
            "check the result by eye"
        )
    moved = resample_to(moving, fixed if output is None else output, current, "linear")
    result = RegistrationResult(
        transform=current,
        metric=float(metric),
        moved=moved,
        quality=quality,
        quality_before=quality_before,
        warning="; ".join(warnings),
        initialisation=initialisation,
        iterations=state["iterations"],
        seconds=time.perf_counter() - start,
        stop_condition=stop,
    )
    yield RegistrationProgress(name, "done", levels=n_levels, metric=result.metric)
    return result


def _method(
    bins: int, seed: int, level: _Level, mask: sitk.Image | None, threads: int | None
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    # Gradients at the sample points only: much cheaper than gradient images of whole scans.
    method.MetricUseFixedImageGradientFilterOff()
    method.MetricUseMovingImageGradientFilterOff()
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(level.sampling, seed)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=level.learning_rate,
        minStep=level.min_step,
        numberOfIterations=level.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    if threads is not None:
        method.SetNumberOfThreads(int(threads))
    return method


def _check_itk_reads_the_same_space(volume: Volume, tolerance_mm: float = 0.1) -> None:
    """Refuse a scan that SimpleITK places elsewhere than this tool (e.g. an FSL FLIRT output
    whose qform and sform disagree, and ITK reads the qform): a transform written for ITK tools
    would map the wrong space. This tool places a scan by its sform when it has one; ITK's
    choice between the two depends on the codes and its version, so SimpleITK is asked."""
    header = volume.source.header if volume.source is not None else None
    if header is None or int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0:
        return
    shape = np.asarray(header.get_data_shape()[:3])
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (shape - 1)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])

    def placed(affine: np.ndarray) -> np.ndarray:  # the corners in LPS mm
        return (corners @ affine[:3, :3].T + affine[:3, 3]) @ ras_to_lps

    ours = placed(header.get_best_affine())
    apart = np.abs(placed(header.get_qform()) - placed(header.get_sform())).max()
    if apart <= tolerance_mm:
        return
    path = volume.source.path
    if path is not None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        direction = np.asarray(reader.GetDirection()).reshape(3, 3)
        itk = corners @ (direction * np.asarray(reader.GetSpacing())).T + reader.GetOrigin()
        if np.abs(itk - ours).max() <= tolerance_mm:
            return  # SimpleITK reads the sform too
    raise TumorSegError(
        f"its qform and sform place it {apart:.1f} mm apart, and SimpleITK reads the qform where "
        "this tool reads the sform, so a transform written for ITK tools would not apply: make "
        "the two agree (e.g. fslorient -copysform2qform) or leave out --transform-out",
        _where(volume),
    )


def _registration_error(exc: BaseException, moving: Volume, fixed: Volume) -> BaseException:
    text = str(exc)
    if isinstance(exc, RuntimeError) and (
        "outside" in text.lower() or "too many samples" in text.lower() or "valid" in text.lower()
    ):
        return TumorSegError(
            f"registration to {_where(fixed)} failed: too few voxels overlap during the "
            "optimisation (the scans barely share a field of view, or start too far apart)",
            _where(moving),
        )
    if isinstance(exc, RuntimeError) and "ITK" in text:  # SimpleITK's own errors
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "ITK ERROR" in line), lines[-1])
        detail = detail.rsplit("): ", 1)[-1]
        return TumorSegError(
            f"registration to {_where(fixed)} failed in SimpleITK ({detail[:160]})", _where(moving)
        )
    return exc


def register(fixed: Volume, moving: Volume, **kwargs) -> RegistrationResult:
    """`register_to_reference` run to the end without progress; returns its result."""
    return run_to_end(register_to_reference(fixed, moving, **kwargs))


def stack_sequences(
    scans: dict[str, Volume],
    reference: str | None = None,
    already_registered: bool = False,
    transform: str = "rigid",
    spacing_mm: float | tuple[float, float, float] | None = None,
    **kwargs,
) -> Generator[RegistrationProgress, None, StackResult]:
    """Register the scans of one exam to a reference sequence and stack them as channels.

    Parameters
    ----------
    scans : dict[str, Volume]
        Sequence name (``"t1"``, ``"t1ce"``, ``"t2"``, ``"flair"``) -> scan; any subset.
    reference : str, optional
        The sequence the others are registered to; default t1ce, else flair, else the first
        present in `SEQUENCES` order.
    already_registered : bool
        Skip the optimisation (scans already co-registered, as BraTS data); scans are only
        resampled (identity transform) when their grid differs from the output grid.
    transform : {"rigid", "affine"}
        See `register_to_reference`.
    spacing_mm : float or (float, float, float), optional
        Output voxel size in mm (Z, Y, X) over the reference's field of view (see
        `reference_grid`); None keeps the reference's own grid.
    **kwargs
        Passed to `register_to_reference` (``threads``, ``seed``, ...).

    Yields
    ------
    RegistrationProgress
        With ``sequence``, ``step`` and ``steps`` telling which scan is being worked on.

    Returns
    -------
    StackResult
        ``volume`` is (C, Z, Y, X) float32 with ``channels`` in `SEQUENCES` order.
    """
    unknown = sorted(set(scans) - set(SEQUENCES))
    if unknown:
        raise TumorSegError(f"unknown sequence(s) {unknown}; use {list(SEQUENCES)}")
    present = [seq for seq in SEQUENCES if seq in scans]
    if not present:
        raise TumorSegError("no scan given")
    if reference is None:
        reference = next((s for s in ("t1ce", "flair") if s in scans), present[0])
    elif reference not in scans:
        raise TumorSegError(
            f"the reference sequence {reference!r} is not among the scans ({', '.join(present)})"
        )
    fixed = scans[reference]
    _check_scan(fixed, "reference")
    grid = fixed if spacing_mm is None else reference_grid(fixed, spacing_mm)
    results: dict[str, RegistrationResult] = {}
    warnings: list[str] = []
    for step, seq in enumerate(present):
        scan = scans[seq]
        if seq == reference or already_registered:
            _check_scan(scan, seq)
            warning = _check_overlap(fixed, scan) if seq != reference else ""
            yield RegistrationProgress(seq, "resample", step=step, steps=len(present))
            results[seq] = RegistrationResult(
                transform=sitk.Euler3DTransform(),
                metric=math.nan,
                moved=resample_to(scan, grid, None, "linear"),
                warning=warning,
                initialisation="identity",
            )
        else:
            results[seq] = yield from map_events(
                register_to_reference(fixed, scan, transform, output=grid, **kwargs),
                lambda event, seq=seq, step=step: replace(
                    event, sequence=seq, step=step, steps=len(present)
                ),
            )
        if results[seq].warning:
            warnings.append(results[seq].warning)
    array = np.stack([results[seq].moved.array.astype(np.float32, copy=False) for seq in present])
    volume = grid.with_array(array, name="exam", channels=tuple(present))
    return StackResult(volume=volume, reference=reference, results=results, warnings=warnings)


# ============================================================================ files
def register_files(
    fixed_path: str | Path,
    moving_path: str | Path,
    out_path: str | Path,
    transform: str = "rigid",
    transform_out: str | Path | None = None,
    **kwargs,
) -> RegistrationResult:
    """Register one NIfTI scan to another and write the moved scan (``tumorseg register``).

    Parameters
    ----------
    fixed_path, moving_path : str or Path
        The reference scan and the scan to align (NIfTI).
    out_path : str or Path
        Output NIfTI: the moving scan resampled on the fixed scan's grid, written with the fixed
        file's geometry (header, orientation). Integer scans keep their integer type (rounded).
    transform : {"rigid", "affine"}
    transform_out : str or Path, optional
        Where to write the transform with `SimpleITK.WriteTransform` (``.tfm``, ``.txt``,
        ``.mat``, ``.h5``, ``.hdf5``). ITK convention: it maps points of the fixed scan's
        physical space to the moving scan's (LPS, mm), so
        ``sitk.Resample(moving, fixed, transform)`` reproduces the output.
    **kwargs
        Passed to `register_to_reference`.

    Returns
    -------
    RegistrationResult
    """
    check_output_path(out_path)
    if transform_out is not None:
        check_output_path(transform_out, nifti=False)
        if Path(transform_out).suffix.lower() not in _TRANSFORM_SUFFIXES:
            raise TumorSegError(
                f"unknown transform file type; use one of {', '.join(_TRANSFORM_SUFFIXES)}",
                transform_out,
            )
    check_outputs_apart((out_path, transform_out), (fixed_path, moving_path), "the input scans")
    fixed = read_scan(fixed_path)
    moving = read_scan(moving_path)
    if transform_out is not None:
        for volume in (fixed, moving):
            _check_itk_reads_the_same_space(volume)
    result = register(fixed, moving, transform=transform, **kwargs)
    array = result.moved.array
    dtype = moving.array.dtype
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max).astype(dtype)
    # Both files or neither: an existing --out is not replaced when the transform fails.
    with OutputFiles() as files:
        write_volume(out_path, array, like=fixed, outputs=files)
        if transform_out is not None:
            try:
                sitk.WriteTransform(result.transform, str(files.stage(transform_out)))
            except RuntimeError as exc:
                raise TumorSegError(
                    f"cannot write the transform ({str(exc).strip().splitlines()[-1][:160]})",
                    transform_out,
                ) from None
    return result
