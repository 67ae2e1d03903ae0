"""npe2 writer: a labels layer -> .nii.gz in the geometry of the scan it belongs to."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._layers import META_KEY, is_volume_layer, layer_volume, painted_labels, volume_from_layer
from .core.errors import TumorSegError
from .core.io import write_labels
from .core.volume import Volume


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one labels layer as NIfTI, restoring the source scan's voxel order and affine.

    napari shows a TumorSegError (bad name, wrong grid) as a notification; the file on disk is
    replaced atomically, never left half-written.
    """
    name = attributes.get("name", "labels")
    if np.ndim(data) != 3:
        shape = "x".join(map(str, np.shape(data)))
        raise TumorSegError(
            f"layer {name!r} ({shape}) is not a 3D (Z, Y, X) label map: it cannot be saved as a "
            "NIfTI mask of a scan"
        )
    if not path.lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    return [str(save_labels(path, volume_from_layer(data, attributes, name), name))]


def save_labels(path, like: Volume, name: str, viewer=None, outputs=None):
    """Write a labels layer's Volume as NIfTI; every path that saves a mask goes through here
    (`save_target`, then the write: the part a dock may run off the main thread).
    ``outputs`` (`core.io.OutputFiles`): written together with that output's other files.
    """
    like = save_target(path, like, name, viewer)
    return write_labels(path, painted_labels(like.array, name), like, outputs=outputs)


def save_target(path, like: Volume, name: str, viewer=None) -> Volume:
    """What saving a labels layer's Volume as NIfTI needs from the viewer (main thread, quick):
    ``like`` with the header to write it with.

    A layer made in napari (e.g. "New labels layer", which copies a scan's transform but not
    its metadata) has no source file: it takes the header of an open scan on the same grid, so
    the mask is written voxel for voxel like that scan (contract 2.1), not in our LPS order.
    Values the reader would refuse (napari's "new label" button picks 5, 6, ...) are refused
    before a file that could not be opened again is written; the layer stays as it is. So is
    the file of an open scan: a mask saved over the scan it was drawn on would lose the scan.
    """
    if viewer is None:
        import napari

        viewer = napari.current_viewer()
    scans = (
        []
        if viewer is None
        else [
            layer
            for layer in viewer.layers
            if layer.metadata.get(META_KEY, {}).get("source_header") is not None
        ]
    )
    target = Path(path).resolve()
    for layer in scans:
        source = layer.metadata[META_KEY].get("source_path")
        if is_volume_layer(layer, "image") and source and Path(source).resolve() == target:
            raise TumorSegError(
                f"is the file of the open scan {layer.name!r}: choose another name for the mask",
                path,
            )
    if like.source is None:
        for layer in scans:
            scan = layer_volume(layer)
            if scan.same_grid(like):
                like.source = scan.source
                break
    return like
