"""`Volume`: a voxel array that never loses its physical geometry.

Axis conventions (contract 2.1)
-------------------------------
- ``Volume.array`` is ordered (Z, Y, X) -- or (C, Z, Y, X) for channels -- after reorienting the
  file to LPS: Z grows towards superior, Y towards posterior, X towards the patient's left. An axial
  slice ``array[z]`` therefore shows anterior at the top and the patient's right on the left
  (radiological convention, as ITK-SNAP and 3D Slicer show it).
- ``Volume.affine`` is the 4x4 matrix that maps a voxel index given as (x, y, z) -- the array index
  reversed -- to LPS world coordinates in mm. This is the ITK / SimpleITK convention
  (``point = origin + direction @ diag(spacing) @ index``), so a `Volume` converts to and from a
  ``SimpleITK.Image`` without any axis juggling.
- napari gets the same geometry in its own (Z, Y, X) world order through `Volume.layer_transform`.
- ``Volume.source`` remembers the NIfTI header of the file the voxels came from, so that anything
  written for this volume goes back into the original voxel order and affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from .errors import TumorSegError

# RAS (NIfTI world) <-> LPS (DICOM / ITK world): negate x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
# Reverses the three spatial axes of a 4x4 affine: (x, y, z) <-> (z, y, x).
_REVERSE = np.eye(4)[[2, 1, 0, 3]]


@dataclass(eq=False)
class SourceGeometry:
    """Where a volume's voxels came from: enough to write an array back in the file's own grid.

    Attributes
    ----------
    header : nibabel.Nifti1Header
        The original header (affine, qform/sform codes, units, description).
    shape : tuple of int
        The original 3D voxel shape (i, j, k) as stored in the file.
    path : Path or None
        The file it was read from.
    """

    header: nib.Nifti1Header
    shape: tuple[int, int, int]
    path: Path | None = None

    @property
    def nifti_affine(self) -> np.ndarray:
        """The file's own voxel (i, j, k) -> RAS mm affine."""
        return self.header.get_best_affine()

    def orientation(self) -> np.ndarray:
        """nibabel orientation of the file's voxel axes relative to LPS."""
        return io_orientation(RAS_TO_LPS @ self.nifti_affine)


@dataclass(eq=False)
class Volume:
    """A voxel array with its physical geometry.

    Attributes
    ----------
    array : numpy.ndarray
        (Z, Y, X) or (C, Z, Y, X), LPS-ordered (see the module docstring).
    affine : numpy.ndarray
        4x4 float64; voxel index (x, y, z) -> LPS world point in mm.
    name : str
        What the volume shows: a sequence name (``"t1"``, ``"t1ce"``, ``"t2"``, ``"flair"``),
        ``"labels"``, or the file stem when unknown.
    source : SourceGeometry or None
        The file geometry to write back into; None for volumes made in memory.
    """

    array: np.ndarray
    affine: np.ndarray
    name: str = ""
    source: SourceGeometry | None = None
    channels: tuple[str, ...] = field(default_factory=tuple)

    # ---------------------------------------------------------------- geometry
    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) voxel shape."""
        return tuple(self.array.shape[-3:])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm, in array order (Z, Y, X)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)[::-1]

    @property
    def origin(self) -> np.ndarray:
        """LPS position (x, y, z) in mm of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines; column k is the LPS direction of voxel axis k of (x, y, z)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def same_grid(self, other: Volume, atol_mm: float = 1e-3) -> bool:
        """True when both volumes have the same spatial shape and voxel-to-world mapping."""
        return self.spatial_shape == other.spatial_shape and np.allclose(
            self.affine, other.affine, atol=atol_mm
        )

    def with_array(self, array: np.ndarray, name: str | None = None, **changes) -> Volume:
        """A new Volume on the same grid holding ``array`` ((Z, Y, X) or (C, Z, Y, X))."""
        if tuple(array.shape[-3:]) != self.spatial_shape:
            raise ValueError(
                f"array of shape {array.shape} does not fit the grid {self.spatial_shape}"
            )
        return replace(self, array=array, name=self.name if name is None else name, **changes)

    # ---------------------------------------------------------------- napari
    def layer_transform(self) -> dict:
        """napari layer keyword arguments placing the array in world space (mm).

        napari's world axes are (Z, Y, X) = (S, P, L) in mm. Returns ``scale`` and ``translate``,
        plus ``rotate`` when the scan is oblique (its direction cosines are not the identity).
        """
        napari_affine = _REVERSE @ self.affine @ _REVERSE
        linear = napari_affine[:3, :3]
        scale = np.linalg.norm(linear, axis=0)
        rotation = linear / scale
        kwargs = {"scale": tuple(scale), "translate": tuple(napari_affine[:3, 3])}
        if not np.allclose(rotation, np.eye(3), atol=1e-6):
            kwargs["rotate"] = _nearest_rotation(rotation)
        return kwargs

    @classmethod
    def affine_from_layer_transform(
        cls, scale, translate, rotate=None, extra_affine=None
    ) -> np.ndarray:
        """Inverse of `layer_transform`: the LPS (x, y, z) affine of a napari layer's transform."""
        linear = np.diag(np.asarray(scale, dtype=float))
        if rotate is not None:
            linear = np.asarray(rotate, dtype=float) @ linear
        napari_affine = np.eye(4)
        napari_affine[:3, :3] = linear
        napari_affine[:3, 3] = np.asarray(translate, dtype=float)
        if extra_affine is not None:
            napari_affine = np.asarray(extra_affine, dtype=float) @ napari_affine
        return _REVERSE @ napari_affine @ _REVERSE

    # ---------------------------------------------------------------- SimpleITK
    def to_sitk(self, channel: int | None = None):
        """This volume (or one of its channels) as a ``SimpleITK.Image`` with the same geometry."""
        import SimpleITK as sitk

        array = self.array if channel is None else self.array[channel]
        if array.ndim != 3:
            raise ValueError("to_sitk needs a 3D array; pass channel= for a multi-channel volume")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(_nearest_rotation(self.direction).ravel().tolist()))
        return image

    @classmethod
    def from_sitk(cls, image, name: str = "", source: SourceGeometry | None = None) -> Volume:
        """A Volume from a ``SimpleITK.Image`` (physical space LPS, array (Z, Y, X))."""
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(image)
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
        affine[:3, 3] = image.GetOrigin()
        return cls(array=array, affine=affine, name=name, source=source)

    # ---------------------------------------------------------------- NIfTI
    @classmethod
    def from_nifti(
        cls, image: nib.Nifti1Image, data: np.ndarray, name: str = "", path: Path | None = None
    ) -> Volume:
        """Reorient a NIfTI image's 3D ``data`` to LPS (Z, Y, X) without resampling."""
        source = SourceGeometry(header=image.header.copy(), shape=tuple(data.shape[:3]), path=path)
        lps_affine = RAS_TO_LPS @ source.nifti_affine
        xform = ornt_transform(source.orientation(), _LPS_ORNT)
        reoriented = apply_orientation(data, xform)
        affine = lps_affine @ inv_ornt_aff(xform, data.shape[:3])
        array = np.ascontiguousarray(reoriented.transpose(2, 1, 0))
        return cls(array=array, affine=affine, name=name, source=source)

    def to_nifti(self, array: np.ndarray | None = None, dtype=None) -> nib.Nifti1Image:
        """A NIfTI image of ``array`` (default: this volume's own) in the source file's geometry.

        Without a source file, the image is written in LPS order with this volume's affine.
        """
        array = self.array if array is None else array
        if array.ndim not in (3, 4):
            raise ValueError("only (Z, Y, X) or (C, Z, Y, X) arrays can be written as NIfTI")
        # (Z, Y, X) -> (x, y, z); channels last, as NIfTI stores a 4th dimension.
        xyz = array.transpose(2, 1, 0) if array.ndim == 3 else array.transpose(3, 2, 1, 0)
        if dtype is not None:
            xyz = xyz.astype(dtype, copy=False)
        if self.source is None:
            return nib.Nifti1Image(np.asfortranarray(xyz), RAS_TO_LPS @ self.affine)
        back = ornt_transform(_LPS_ORNT, self.source.orientation())
        data = apply_orientation(xyz, back)
        header = self.source.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(None, None)
        header.set_data_shape(data.shape)
        # The scan's display window would show labels 1-4 or probabilities as black: viewers
        # choose their own (0 = unset).
        header["cal_min"] = header["cal_max"] = 0
        if data.ndim == 4:
            # Channels (WT, TC, ET), not time points: no time unit or repetition time.
            header.set_xyzt_units(xyz=header.get_xyzt_units()[0], t="unknown")
            header["pixdim"][4] = 1.0
        # Keep the original header's qform and sform exactly (codes included).
        image = nib.Nifti1Image(np.asfortranarray(data), None, header=header)
        image.set_qform(header.get_qform(), int(header["qform_code"]))
        image.set_sform(header.get_sform(), int(header["sform_code"]))
        return image


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The orthonormal matrix nearest to ``matrix`` (polar decomposition); removes tiny shears."""
    u, _, vt = np.linalg.svd(matrix)
    return u @ vt


def check_grid_match(labels: Volume, scans: list[Volume], path=None) -> Volume:
    """The scan whose grid the label map ``labels`` lies on; raises TumorSegError when none does."""
    for scan in scans:
        if scan.same_grid(labels):
            return scan
    grids = (
        ", ".join(f"{s.name} {'x'.join(map(str, s.spatial_shape))}" for s in scans) or "none open"
    )
    raise TumorSegError(
        f"the label map's grid ({'x'.join(map(str, labels.spatial_shape))} voxels, "
        f"{_fmt_spacing(labels.spacing)} mm) matches none of the exam's scans ({grids}); "
        "it must lie on the grid of the scans it was drawn on",
        path,
    )


def _fmt_spacing(spacing) -> str:
    return "x".join(f"{s:.3g}" for s in spacing)
