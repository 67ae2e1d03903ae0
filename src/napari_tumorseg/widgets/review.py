"""Dock widget "Review and correct": thresholds, clean-up and where the model is unsure.

Painting, filling and erasing stay napari's own label tools. Every change made here goes through
``Labels.data_setitem``, so napari's undo (Ctrl+Z) takes it back.
"""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSlider,
    QWidget,
)

from .._layers import META_KEY, edit_history, is_volume_layer, layer_volume
from ..core.inference import card_labels, region_thresholds
from ..core.io import REGIONS
from ..core.postprocess import (
    entropy_map,
    fill_holes,
    keep_largest_component,
    remove_small_islands,
    uncertain_slices,
)
from ._pickers import follow_renames
from .segment import probability_layer_name

UNCERTAINTY = "uncertainty"


def apply_labels(layer, new: np.ndarray) -> int:
    """Replace a labels layer's data by ``new`` as one undoable edit; returns voxels changed."""
    changed = np.nonzero(np.asarray(layer.data) != new)
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


class ReviewWidget(QWidget):
    """Per-region thresholds over the probability maps, clean-up, and an uncertainty map with
    "next uncertain slice"."""

    def __init__(self, napari_viewer, confirm=None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.confirm = confirm or _ask
        self._slice_order: list[int] = []
        self._slice_pos = -1
        self._chosen = None  # the label map the dock is on (followed through renames)

        self.layer_box = QComboBox()
        self.sliders = {}
        form = QFormLayout(self)
        form.addRow("Label map", self.layer_box)
        for region in REGIONS:
            slider = QSlider(Qt.Horizontal)
            slider.setRange(5, 95)
            slider.setValue(50)
            value = QLabel("0.50")
            slider.valueChanged.connect(lambda v, label=value: label.setText(f"{v / 100:.2f}"))
            row = QHBoxLayout()
            row.addWidget(slider)
            row.addWidget(value)
            form.addRow(f"{region} threshold", row)
            self.sliders[region] = slider
        self.threshold_button = QPushButton("Apply thresholds")
        form.addRow(self.threshold_button)
        self.largest_button = QPushButton("Keep largest tumour")
        self.holes_button = QPushButton("Fill holes")
        row = QHBoxLayout()
        row.addWidget(self.largest_button)
        row.addWidget(self.holes_button)
        form.addRow(row)
        self.island_ml = QDoubleSpinBox(minimum=0.0, maximum=50.0, singleStep=0.1, value=0.5)
        self.island_ml.setSuffix(" mL")
        self.islands_button = QPushButton("Remove smaller islands")
        row = QHBoxLayout()
        row.addWidget(self.island_ml)
        row.addWidget(self.islands_button)
        form.addRow(row)
        self.uncertainty_button = QPushButton("Show uncertainty")
        self.next_button = QPushButton("Next uncertain slice")
        row = QHBoxLayout()
        row.addWidget(self.uncertainty_button)
        row.addWidget(self.next_button)
        form.addRow(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow(self.status)

        self.threshold_button.clicked.connect(self.apply_thresholds)
        self.largest_button.clicked.connect(lambda: self._clean(keep_largest_component))
        self.holes_button.clicked.connect(lambda: self._clean(fill_holes))
        self.islands_button.clicked.connect(self._remove_islands)
        self.uncertainty_button.clicked.connect(self.show_uncertainty)
        self.next_button.clicked.connect(self.next_uncertain_slice)
        self.layer_box.currentTextChanged.connect(self._on_layer_chosen)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        follow_renames(self.viewer, self._refresh_choices)
        self._refresh_choices()

    # ------------------------------------------------------------------ layers
    def _refresh_choices(self, event=None) -> None:
        shown = self.layer_box.currentText()
        # The chosen map keeps its place under a new name (napari's rename).
        chosen = self._chosen
        current = chosen.name if chosen is not None and chosen in self.viewer.layers else shown
        names = [layer.name for layer in self.viewer.layers if is_volume_layer(layer, "labels")]
        inserted = event.value if getattr(event, "type", None) == "inserted" else None
        if _is_segmentation(inserted):
            # A new segmentation: the dock turns to it (staying on, say, the expert labels
            # would let "Apply thresholds" act on the wrong map), and its uncertain slices are
            # those of the new probabilities.
            current = inserted.name
            self._slice_order, self._slice_pos = [], -1
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        self.layer_box.addItems(names)
        if current in names:
            self.layer_box.setCurrentText(current)
        elif names:
            self.layer_box.setCurrentText(names[-1])
        self.layer_box.blockSignals(False)
        name = self.layer_box.currentText()
        if event is None or name != current or (inserted is not None and name == inserted.name):
            self._on_layer_chosen(name)
        else:
            self._chosen = self.labels_layer

    def _on_layer_chosen(self, name: str) -> None:
        """Set the sliders to the thresholds of the map the dock is on (`thresholds_in_force`),
        so that "Apply thresholds" starts from them; a map no model made leaves them alone."""
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        self._chosen = layer
        if _is_segmentation(layer):
            for region, value in zip(REGIONS, thresholds_in_force(layer)):
                self.sliders[region].setValue(round(value * 100))

    @property
    def labels_layer(self):
        name = self.layer_box.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def probabilities(self) -> np.ndarray | None:
        """(3, Z, Y, X) WT/TC/ET probabilities from the probability layers, if all are open."""
        names = [probability_layer_name(region) for region in REGIONS]
        if not all(name in self.viewer.layers for name in names):
            return None
        return np.stack([np.asarray(self.viewer.layers[name].data) for name in names])

    # ------------------------------------------------------------------ thresholds
    def thresholds(self) -> tuple[float, ...]:
        return tuple(self.sliders[region].value() / 100 for region in REGIONS)

    def apply_thresholds(self) -> int:
        """Re-derive the label map from the probabilities; asks before discarding manual edits.

        Returns the number of voxels changed (0 when nothing was done).
        """
        layer = self.labels_layer
        if layer is None or probability_layer_name("WT") not in self.viewer.layers:
            show_warning("Apply thresholds: needs a segmentation and its probability layers")
            return 0
        if not _is_segmentation(layer):
            # Expert labels, or a map drawn by hand: thresholds would overwrite it unasked.
            show_warning(
                f"Apply thresholds: {layer.name} was not made by Segment tumour; pick the "
                "segmentation in 'Label map'"
            )
            return 0
        source = self.viewer.layers[probability_layer_name("WT")]
        run = layer.metadata.get(META_KEY, {}).get("run")
        if run is None or source.metadata.get(META_KEY, {}).get("run") != run:
            # Exams on one grid (BraTS, follow-ups registered to a baseline) share the
            # probability layers' shape: the run that made them tells them apart.
            show_warning(
                f"Apply thresholds: the probability layers come from another run than "
                f"{layer.name}; segment this exam again first"
            )
            return 0
        prob = self.probabilities()  # the three maps stacked: only once the map qualifies
        if prob is None:
            show_warning("Apply thresholds: needs a segmentation and its probability layers")
            return 0
        edits = edited_voxels(layer)
        if edits is not None and edits.any():
            question = (
                f"{int(edits.sum())} voxels of {layer.name} were edited by hand. New thresholds "
                "replace the whole map (Ctrl+Z takes it back). Continue?"
            )
            if not self.confirm(question):
                self.status.setText("thresholds not applied: your edits are kept")
                return 0
        # With the rules of the model's card (e.g. the 2D model's small-island removal), as the
        # segmentation itself was made.
        rules = layer.metadata.get(META_KEY, {}).get("postprocess")
        voxel_ml = layer_volume(layer).voxel_volume_ml
        new = card_labels(prob, rules, voxel_ml, self.thresholds())
        changed = apply_labels(layer, new)
        if changed:
            record_thresholds(layer, new, self.thresholds())
        self.status.setText(f"thresholds {self.thresholds()}: {changed} voxels changed")
        return changed

    # ------------------------------------------------------------------ clean-up
    def _clean(self, function) -> int:
        layer = self.labels_layer
        if layer is None:
            return 0
        changed = apply_labels(layer, function(np.asarray(layer.data)))
        self.status.setText(f"{function.__name__.replace('_', ' ')}: {changed} voxels changed")
        return changed

    def _remove_islands(self) -> int:
        layer = self.labels_layer
        if layer is None:
            return 0
        voxel_ml = layer_volume(layer).voxel_volume_ml
        min_ml = self.island_ml.value()
        return self._clean(lambda labels: remove_small_islands(labels, min_ml, voxel_ml))

    # ------------------------------------------------------------------ uncertainty
    def show_uncertainty(self):
        """Add (or update) the uncertainty layer: mean entropy of the region probabilities."""
        prob = self.probabilities()
        if prob is None:
            show_warning("Show uncertainty: run a segmentation first")
            return None
        uncertainty = entropy_map(prob)
        source = self.viewer.layers[probability_layer_name("WT")]
        layer = self._uncertainty_layer()
        if layer is not None and layer_volume(layer).same_grid(layer_volume(source)):
            layer.data = uncertainty
        else:
            if layer is not None:  # an earlier exam's map, on another grid
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_image(
                uncertainty,
                name=UNCERTAINTY,
                colormap="magma",
                blending="additive",
                contrast_limits=(0.0, 1.0),
                opacity=0.7,
                metadata={META_KEY: {**source.metadata.get(META_KEY, {}), "role": UNCERTAINTY}},
                scale=source.scale,
                translate=source.translate,
                rotate=source.rotate,
            )
        self._slice_order = [int(z) for z in uncertain_slices(uncertainty)]
        self._slice_pos = -1
        self.status.setText(f"{len(self._slice_order)} slices hold uncertain voxels")
        return layer

    def _uncertainty_layer(self):
        """The uncertainty map this dock made, whatever it is called now: a layer the user
        opened under the same name is left alone (napari names ours "uncertainty [1]")."""
        return next(
            (
                layer
                for layer in self.viewer.layers
                if layer.metadata.get(META_KEY, {}).get("role") == UNCERTAINTY
            ),
            None,
        )

    def next_uncertain_slice(self) -> int | None:
        """Move the viewer to the next most uncertain axial slice (cycling); returns it."""
        layer = self._uncertainty_layer()
        if not self._slice_order or layer is None:
            layer = self.show_uncertainty()
            if layer is None:
                return None
        if not self._slice_order:
            show_info("The model is sure everywhere")
            return None
        self._slice_pos = (self._slice_pos + 1) % len(self._slice_order)
        z = self._slice_order[self._slice_pos]
        self.viewer.dims.set_point(0, _world_z_of_slice(layer, z))
        self.status.setText(
            f"slice {z} ({self._slice_pos + 1} of {len(self._slice_order)} uncertain slices)"
        )
        return z


def _is_segmentation(layer) -> bool:
    """A labels layer made by the Segment tumour dock (it remembers the model's map)."""
    return (
        layer is not None
        and is_volume_layer(layer, "labels")
        and layer.metadata.get(META_KEY, {}).get("model_labels") is not None
    )


def _world_z_of_slice(layer, z: int) -> float:
    """The world z at which napari shows data slice ``z`` of ``layer``.

    napari slices through the inverse transform restricted to the sliced axis; on an oblique
    grid that differs from ``data_to_world((z, 0, 0))[0]`` by the tilt of the other axes (16
    slices on the raw exam's 1 mm grid).
    """
    try:
        inverse = layer._data_to_world.inverse.set_slice([0])
        (a, b), _ = inverse.affine_matrix
        return float((z - b) / a)
    except (AttributeError, ValueError, ZeroDivisionError):  # napari's internals changed
        return float(layer.data_to_world((z, 0, 0))[0])


def _ask(question: str) -> bool:
    return QMessageBox.question(None, "Review and correct", question) == QMessageBox.Yes
