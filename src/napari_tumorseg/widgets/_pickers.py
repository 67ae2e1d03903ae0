"""Sequence pickers: one combo box per MRI sequence, filled from the viewer's image layers."""

from __future__ import annotations

import weakref

from qtpy.QtWidgets import QFormLayout

from .._layers import is_volume_layer, layer_sequence, layer_volume
from ..core.io import SEQUENCES
from ._layout import name_box

NONE = "(none)"


class SequencePickers:
    """Four combo boxes (t1, t1ce, t2, flair) kept in sync with the viewer's 3D image layers.

    Each box is pre-set to the layer whose sequence matches -- by our metadata or by name --
    preferring layers whose name contains ``prefer`` (e.g. "(registered)"), and skipping
    layers whose name contains ``exclude``.
    """

    def __init__(self, viewer, form: QFormLayout, prefer: str = "", exclude: str = "") -> None:
        self.viewer = viewer
        self.prefer = prefer
        self.exclude = exclude
        self.boxes = {seq: name_box() for seq in SEQUENCES}
        for seq, box in self.boxes.items():
            form.addRow(seq, box)
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        follow_renames(viewer, self.refresh)
        self.refresh()

    def _candidates(self) -> list:
        return [
            layer
            for layer in self.viewer.layers
            if is_volume_layer(layer, "image")
            and layer_sequence(layer) is not None
            and not (self.exclude and self.exclude in layer.name)
        ]

    def refresh(self, event=None) -> None:
        layers = self._candidates()
        names = [layer.name for layer in layers]
        # A scan just added (another exam, a second registration) takes its sequence's box:
        # the boxes would otherwise stay on the older layers, and a run use them silently.
        added = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        for seq, box in self.boxes.items():
            current = box.currentText()
            matches = [lay.name for lay in layers if layer_sequence(lay) == seq]
            preferred = [n for n in matches if self.prefer and self.prefer in n]
            box.blockSignals(True)
            box.clear()
            box.addItems([NONE, *names])
            if (
                added is not None
                and added.name in matches
                and (not preferred or added.name in preferred)
            ):
                choice = added.name
            elif preferred and current not in preferred:
                choice = preferred[-1]
            elif current in names:
                choice = current
            else:
                choice = (matches or [NONE])[-1]
            box.setCurrentText(choice)
            box.blockSignals(False)

    def selected_layers(self) -> dict:
        """Sequence -> napari layer, for the boxes that name an open layer."""
        return {
            seq: self.viewer.layers[box.currentText()]
            for seq, box in self.boxes.items()
            if box.currentText() != NONE and box.currentText() in self.viewer.layers
        }

    def selected_volumes(self) -> dict:
        """Sequence -> Volume of the selected layers (named by sequence)."""
        return volumes_of(self.selected_layers())


def follow_renames(viewer, callback) -> None:
    """Call ``callback`` whenever a layer of ``viewer`` -- open now or added later -- is
    renamed: a dock's layer lists would otherwise keep the old name, and act on nothing (or
    on another layer) without a word."""
    for layer in viewer.layers:
        layer.events.name.connect(callback)  # napari holds a bound method weakly
    method = weakref.WeakMethod(callback)

    def follow(event) -> None:  # held by the viewer: it must not keep a closed dock alive
        bound = method()
        if bound is not None:
            event.value.events.name.connect(bound)

    viewer.layers.events.inserted.connect(follow)


def volumes_of(layers: dict) -> dict:
    """Sequence -> Volume of sequence -> napari layer (each volume named by its sequence)."""
    volumes = {}
    for seq, layer in layers.items():
        volume = layer_volume(layer)
        volume.name = seq
        volumes[seq] = volume
    return volumes
