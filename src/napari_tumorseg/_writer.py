"""npe2 writer: a labels layer -> .nii.gz in the geometry of the scan it belongs to."""

from __future__ import annotations

from ._layers import volume_from_layer
from .core.io import write_labels


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one labels layer as NIfTI, restoring the source scan's voxel order and affine.

    napari shows a TumorSegError (bad name, wrong grid) as a notification; the file on disk is
    replaced atomically, never left half-written.
    """
    like = volume_from_layer(data, attributes, attributes.get("name", "labels"))
    if not path.lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    return [str(write_labels(path, like.array, like))]
