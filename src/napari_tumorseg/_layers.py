"""Volume <-> napari layer data: geometry, BraTS colours and region names.

napari's world axes are (Z, Y, X) in mm (see `core.volume`). Every layer this plugin makes carries
its geometry in ``metadata["tumorseg"]`` so the writer can put its voxels back into the grid of
the scan they belong to.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .core.errors import TumorSegError
from .core.io import BRATS_LABELS, to_brats_labels
from .core.volume import SourceGeometry, Volume

META_KEY = "tumorseg"


def geometry_metadata(volume: Volume, **extra) -> dict:
    """The ``metadata`` entry that lets the writer restore ``volume``'s geometry."""
    meta = {"affine": np.array(volume.affine), "sequence": volume.name, **extra}
    if volume.source is not None:
        meta["source_header"] = volume.source.header
        meta["source_shape"] = tuple(volume.source.shape)
        meta["source_path"] = None if volume.source.path is None else str(volume.source.path)
    return {META_KEY: meta}


def volume_from_layer(data: np.ndarray, attributes: dict, name: str = "") -> Volume:
    """A Volume from layer ``data`` and its attributes (as napari's writers receive them).

    Uses the geometry our reader stored in the metadata; for layers made elsewhere (e.g. a new
    labels layer drawn by hand) it rebuilds the affine from the layer's scale/translate/rotate.
    """
    meta = (attributes.get("metadata") or {}).get(META_KEY)
    if meta is not None and "affine" in meta:  # (a layer can carry our key without geometry)
        source = None
        if meta.get("source_header") is not None:
            path = meta.get("source_path")
            source = SourceGeometry(
                header=meta["source_header"],
                shape=tuple(meta["source_shape"]),
                path=None if path is None else Path(path),
            )
        return Volume(np.asarray(data), np.asarray(meta["affine"], dtype=float), name, source)
    affine = Volume.affine_from_layer_transform(
        attributes.get("scale", (1.0, 1.0, 1.0)),
        attributes.get("translate", (0.0, 0.0, 0.0)),
        attributes.get("rotate"),
        attributes.get("affine"),
    )
    return Volume(np.asarray(data), affine, name)


def layer_key(layer) -> str:
    """A layer's identity, kept across the proxies napari hands a plugin.

    A dock opened from the Plugins menu sees each layer through a `PublicOnlyProxy` made
    afresh at every access: ``is`` never matches, and a weak reference to one dies at once (a
    fine-tune was refused as "scans no longer open" right after Segment). napari's public
    ``unique_id`` is the same through any proxy, and holds no layer alive."""
    return str(layer.unique_id)


def find_layer(layers, key: str | None):
    """The layer of ``layers`` whose `layer_key` is ``key``, or None (closed)."""
    if key is None:
        return None
    return next((layer for layer in layers if layer_key(layer) == key), None)


def same_layer(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same napari layer, either seen through a proxy (or both
    None: no layer)."""
    if a is None or b is None:
        return a is b
    return layer_key(a) == layer_key(b)


def is_volume_layer(layer, kind: str) -> bool:
    """Whether ``layer`` is a 3D (Z, Y, X) ``kind`` ("image" or "labels") layer -- what the
    docks can measure, segment or register (not a 2D picture, a 4D stack or an RGB image)."""
    from napari.layers import Image, Labels

    layer_class = {"image": Image, "labels": Labels}[kind]
    return isinstance(layer, layer_class) and layer.ndim == 3 and not getattr(layer, "rgb", False)


def layer_volume(layer) -> Volume:
    """The Volume (array + geometry) behind a 3D napari image or labels layer; a
    `TumorSegError` naming the layer for any other."""
    if layer.ndim != 3 or getattr(layer, "rgb", False):
        shape = "x".join(map(str, np.shape(layer.data)))
        raise TumorSegError(
            f"layer {layer.name!r} ({shape}{', RGB' if getattr(layer, 'rgb', False) else ''}) "
            "is not a 3D (Z, Y, X) scan or label map"
        )
    attributes = {
        "metadata": layer.metadata,
        "scale": layer.scale,
        "translate": layer.translate,
        "rotate": layer.rotate,
    }
    return volume_from_layer(layer.data, attributes, layer.name)


def painted_labels(data, name: str) -> np.ndarray:
    """A labels layer's data as BraTS labels (`core.io.to_brats_labels`, refusing other values
    and naming the layer). A 3 in a layer was painted -- the reader turns BraTS 2023's 3 into
    4 -- so it is enhancing tumour, as the layer shows and measures it (`core.io.REGIONS`),
    even beside 4s."""
    data = np.asarray(data)
    if (data == 3).any():
        data = np.where(data == 3, np.asarray(4, data.dtype), data)
    return to_brats_labels(data, f"layer {name!r}")


def edit_history(layer, redo: bool = False):
    """A labels layer's undo (or redo) history -- napari's private deques of edits, each a list
    of atoms -- or None where there is none (other layers; a napari without it).

    napari 0.9 has no public undo API and warns (FutureWarning) on private access from plugins;
    the warning is silenced here, where its absence is handled: every caller copes with None.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Private attribute access", FutureWarning)
        try:
            return getattr(layer, "_redo_history" if redo else "_undo_history", None)
        except Exception:  # a napari that refuses private access outright
            return None


def edit_depth(layer, redo: bool = False) -> int:
    """How many edits a labels layer's undo (or redo) history holds: napari's undo and redo
    only refresh the layer, so this is how they are told apart from a slice change. napari
    keeps at most 100; 0 for layers without a history."""
    return len(edit_history(layer, redo) or ())


def layer_sequence(layer) -> str | None:
    """The MRI sequence a layer shows: from our metadata, else from its name."""
    from .core.io import SEQUENCES, classify_path

    meta = layer.metadata.get(META_KEY, {})
    if meta.get("sequence") in SEQUENCES:
        return meta["sequence"]
    kind = classify_path(layer.name.split(" ")[0])
    return kind if kind in SEQUENCES else None


def contrast_limits(array: np.ndarray) -> tuple[float, float]:
    """Display window from the 0.5 and 99.5 percentiles of the non-zero voxels."""
    sample = array[::2, ::2, ::2]
    sample = sample[sample != 0]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(sample, [0.5, 99.5])
    return float(low), float(max(high, low + 1e-6))


def scan_layer_data(volume: Volume, name: str | None = None, **kwargs) -> tuple:
    """napari layer-data tuple for a scan (image layer)."""
    layer_kwargs = {
        "name": name or volume.name,
        "colormap": "gray",
        "contrast_limits": contrast_limits(volume.array),
        "metadata": geometry_metadata(volume),
        **volume.layer_transform(),
        **kwargs,
    }
    return volume.array, layer_kwargs, "image"


#: Colour of each region's probability map (RGB, 0-1). In additive blending WT's green and TC's
#: red made yellow, the colour of enhancing tumour; these three are told apart where they
#: overlap too, and none is a label colour but ET's own yellow (NCR/NET red, oedema green).
REGION_COLORS = {"WT": (0.15, 0.55, 1.0), "TC": (1.0, 0.2, 0.85), "ET": (1.0, 0.9, 0.0)}


def region_colormap(region: str):
    """A napari colormap for a probability map: transparent at 0, the region's colour at 1, so
    that the maps drawn over one another (ET over TC over WT, as they nest) cover the scan
    only where they hold probability."""
    from napari.utils.colormaps import Colormap

    r, g, b = REGION_COLORS[region]
    return Colormap(colors=[[r, g, b, 0.0], [r, g, b, 1.0]], name=f"tumorseg {region}")


def probability_layer_data(volume: Volume, name: str) -> tuple:
    """napari layer-data tuple for one region's probability map (``volume.name`` is the
    region: WT, TC or ET)."""
    layer_kwargs = {
        "name": name,
        "colormap": region_colormap(volume.name),
        "blending": "translucent",
        "opacity": 0.7,
        "contrast_limits": (0.0, 1.0),
        "metadata": geometry_metadata(volume, region=volume.name),
        **volume.layer_transform(),
    }
    return volume.array, layer_kwargs, "image"


def brats_colormap():
    """napari DirectLabelColormap with the BraTS label colours (0 transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    colors.update({value: rgba for value, (_, _, rgba) in BRATS_LABELS.items()})
    colors[3] = colors[4]  # a painted 3 is enhancing tumour (`core.io.REGIONS`): shown as such
    return DirectLabelColormap(color_dict=colors)


def brats_features() -> dict:
    """Labels-layer features naming each BraTS label (shown in napari's status bar)."""
    return {
        "index": [0, *BRATS_LABELS],
        "region": ["background", *(short for short, _, _ in BRATS_LABELS.values())],
        "description": ["background", *(long for _, long, _ in BRATS_LABELS.values())],
    }


def labels_layer_data(volume: Volume, name: str = "labels", **kwargs) -> tuple:
    """napari layer-data tuple for a BraTS label map (labels layer, geometry of its scan)."""
    layer_kwargs = {
        "name": name,
        "colormap": brats_colormap(),
        "features": brats_features(),
        "opacity": 0.6,
        "metadata": geometry_metadata(volume),
        **volume.layer_transform(),
        **kwargs,
    }
    return volume.array, layer_kwargs, "labels"
