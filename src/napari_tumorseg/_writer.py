"""npe2 writer: a labels layer -> .nii.gz in the geometry of the scan it belongs to."""

from __future__ import annotations

import numpy as np

from ._layers import META_KEY, layer_volume, volume_from_layer
from .core.io import to_brats_labels, write_labels
from .core.volume import Volume


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one labels layer as NIfTI, restoring the source scan's voxel order and affine.

    napari shows a TumorSegError (bad name, wrong grid) as a notification; the file on disk is
    replaced atomically, never left half-written.
    """
    name = attributes.get("name", "labels")
    like = _with_open_scan_header(volume_from_layer(data, attributes, name))
    if not path.lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    # Values the reader would refuse (napari's "new label" button picks 5, 6, ...) are refused
    # here, before a file that cannot be opened again is written; the layer stays as it is.
    labels = to_brats_labels(np.asarray(like.array), f"layer {name!r}")
    return [str(write_labels(path, labels, like))]


def _with_open_scan_header(like: Volume) -> Volume:
    """A layer made in napari (e.g. "New labels layer", which copies a scan's transform but not
    its metadata) has no source file: take the header of an open scan on the same grid, so the
    mask is written voxel for voxel like that scan (contract 2.1), not in our LPS order."""
    if like.source is not None:
        return like
    import napari

    viewer = napari.current_viewer()
    for layer in [] if viewer is None else viewer.layers:
        if layer.metadata.get(META_KEY, {}).get("source_header") is None:
            continue
        scan = layer_volume(layer)
        if scan.same_grid(like):
            like.source = scan.source
            return like
    return like
