"""What the Segment, Review and Tumour volumes docks share about a segmentation: its
probability layers' names, the map the model made and the user's edits since, and the
thresholds in force. (The docks stand side by side; none imports another.)"""

from __future__ import annotations

import numpy as np

from .._layers import META_KEY, edit_history, is_volume_layer
from ..core.labels import region_thresholds


def probability_layer_name(region: str) -> str:
    """The name of a region's (WT, TC, ET) probability layer."""
    return f"{region} probability"


def apply_labels(layer, new: np.ndarray) -> int:
    """Replace a labels layer's data by ``new`` as one undoable edit; returns voxels changed."""
    return put_label_changes(layer, label_changes(layer.data, new), new)


def label_changes(old, new: np.ndarray) -> tuple:
    """Indices of the voxels where ``new`` differs from ``old`` (a whole-volume comparison:
    the Review dock runs it in a worker thread)."""
    return np.nonzero(np.asarray(old) != new)


def put_label_changes(layer, changed: tuple, new: np.ndarray) -> int:
    """Write ``new`` at the ``changed`` voxels of a labels layer as one undoable edit
    (``Labels.data_setitem``); returns how many there are."""
    if changed[0].size:
        layer.data_setitem(changed, new[changed])
    return int(changed[0].size)


def edited_voxels(layer) -> np.ndarray | None:
    """Boolean map of the voxels the user changed since the model produced the layer (or since
    the thresholds applied last), or None when the layer does not come from a segmentation."""
    if layer.metadata.get(META_KEY, {}).get("model_labels") is None:
        return None
    data, model = np.asarray(layer.data), model_output(layer)
    # A 3 painted over the model's 4 changes nothing: 3 is enhancing tumour (`core.io.REGIONS`).
    return (data != model) & ~((data == 3) & (model == 4))


def model_output(layer) -> np.ndarray:
    """The map the user is editing from: the model's, or the thresholds applied last and still
    in force (`record_thresholds`; undone with Ctrl+Z, the map before them is the baseline
    again)."""
    applied = _applied_in_force(layer)
    return applied[0] if applied else layer.metadata[META_KEY]["model_labels"]


def thresholds_in_force(layer) -> tuple[float, float, float]:
    """The WT / TC / ET thresholds of the map the user is editing from (`model_output`): those
    applied last and still in force, else those that made the segmentation (the model card's,
    e.g. the bundled models' tumour-core cut above 0.5), else 0.5."""
    applied = _applied_in_force(layer)
    if applied and len(applied) > 2:
        return applied[2]
    rules = layer.metadata.get(META_KEY, {}).get("postprocess") or {}
    return region_thresholds(rules.get("thresholds", 0.5))


def _applied_in_force(layer) -> tuple | None:
    """The last ``(map, edit[, thresholds])`` of `record_thresholds` still in force, if any."""
    entries = layer.metadata.get(META_KEY, {}).get("threshold_labels", ())
    return next((e for e in reversed(entries) if _in_force(layer, e[1])), None)


def record_thresholds(layer, new: np.ndarray, thresholds=None) -> None:
    """Remember ``new``, just applied to ``layer`` as its newest edit (`apply_labels`), as the
    map later edits are counted against, and the ``thresholds`` that made it. Maps no longer
    in force are dropped: a new edit clears napari's redo history, so they cannot come back."""
    meta = layer.metadata.setdefault(META_KEY, {})
    kept = [e for e in meta.get("threshold_labels", ()) if _in_force(layer, e[1])]
    undo = edit_history(layer)
    entry = (new.copy(), undo[-1][0] if undo else None)
    if thresholds is not None:
        entry += (region_thresholds(thresholds),)
    meta["threshold_labels"] = [*kept, entry]


def _in_force(layer, edit) -> bool:
    """Whether an edit (the first atom of its napari history item) is still applied: in the
    undo history (redo puts the same atoms back), not in the redo history (undone). Gone from
    both, it was undone and replaced by a new edit -- or pushed out of napari's bounded history
    (100 edits) by later ones, which is taken to be the case when that history is full. Without
    a history to consult (``edit`` None), thresholds applied stay the baseline."""
    undo = edit_history(layer)
    if edit is None or undo is None:
        return True
    if any(atom is edit for item in undo for atom in item):
        return True
    if any(atom is edit for item in edit_history(layer, redo=True) or () for atom in item):
        return False
    maxlen = getattr(undo, "maxlen", None)
    return maxlen is not None and len(undo) == maxlen


def is_segmentation(layer) -> bool:
    """A labels layer made by the Segment tumour dock (it remembers the model's map)."""
    return (
        layer is not None
        and is_volume_layer(layer, "labels")
        and layer.metadata.get(META_KEY, {}).get("model_labels") is not None
    )
