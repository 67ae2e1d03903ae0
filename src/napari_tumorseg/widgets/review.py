"""Dock widget "Review and correct": thresholds, clean-up and where the model is unsure.

Painting, filling and erasing stay napari's own label tools. Every change made here goes through
``Labels.data_setitem``, so napari's undo (Ctrl+Z) takes it back.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from napari.layers import Layer
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSlider,
    QWidget,
)

from .._layers import (
    META_KEY,
    edit_depth,
    find_layer,
    is_volume_layer,
    layer_key,
    layer_volume,
)
from .._warmup import warm_up_layers
from ..core.io import REGIONS
from ..core.labels import card_labels
from ..core.postprocess import (
    entropy_map,
    fill_holes,
    keep_largest_component,
    remove_small_islands,
    uncertain_slices,
)
from ._layout import name_box, scrolling_form
from ._orientation import show_orientation
from ._pickers import follow_renames
from ._runner import Background, add_layer_in_turns, result_not_shown, run_in_turns
from ._segmentation import (
    edited_voxels,
    is_segmentation,
    label_changes,
    probability_layer_name,
    put_label_changes,
    record_thresholds,
    thresholds_in_force,
)

UNCERTAINTY = "uncertainty"


class ReviewWidget(QWidget):
    """Per-region thresholds over the probability maps, clean-up, and an uncertainty map with
    "next uncertain slice". The work behind each button runs in a worker thread (`Background`);
    the map changes on the main thread, as one undoable edit."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: Asked before thresholds replace a map edited by hand (a test can answer instead).
        self.confirm = _ask
        self._slice_order: list[int] = []
        self._slice_pos = -1
        self._chosen_key = None  # the label map the dock is on (followed through renames)
        self._adding = False  # the uncertainty layer is being added (over event-loop turns)

        self.layer_box = name_box()
        self.sliders = {}
        form = scrolling_form(self)
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
        self.islands_button = QPushButton("Remove islands under")
        row = QHBoxLayout()
        row.addWidget(self.islands_button)
        row.addWidget(self.island_ml)
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
        self.background = Background(
            "Review and correct",
            [
                self.threshold_button,
                self.largest_button,
                self.holes_button,
                self.islands_button,
                self.uncertainty_button,
                self.next_button,
            ],
            self.status,
        )

        self.threshold_button.clicked.connect(self.apply_thresholds)
        self.largest_button.clicked.connect(
            lambda: self._clean("Keep largest tumour", keep_largest_component)
        )
        self.holes_button.clicked.connect(lambda: self._clean("Fill holes", fill_holes))
        self.islands_button.clicked.connect(self._remove_islands)
        self.uncertainty_button.clicked.connect(lambda: self.show_uncertainty())
        self.next_button.clicked.connect(self.next_uncertain_slice)
        self.layer_box.currentTextChanged.connect(self._on_layer_chosen)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        follow_renames(self.viewer, self._refresh_choices)
        self._refresh_choices()
        show_orientation(napari_viewer)
        warm_up_layers()

    @property
    def busy(self) -> bool:
        """Whether a button's work is still running (its result not yet in place)."""
        return self.background.busy or self._adding

    # ------------------------------------------------------------------ layers
    def _refresh_choices(self, event=None) -> None:
        shown = self.layer_box.currentText()
        # The chosen map keeps its place under a new name (napari's rename).
        chosen = find_layer(self.viewer.layers, self._chosen_key)
        current = chosen.name if chosen is not None else shown
        names = [layer.name for layer in self.viewer.layers if is_volume_layer(layer, "labels")]
        inserted = event.value if getattr(event, "type", None) == "inserted" else None
        if is_segmentation(inserted):
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
            layer = self.labels_layer
            self._chosen_key = None if layer is None else layer_key(layer)

    def _on_layer_chosen(self, name: str) -> None:
        """Set the sliders to the thresholds of the map the dock is on (`thresholds_in_force`),
        so that "Apply thresholds" starts from them; a map no model made leaves them alone."""
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        self._chosen_key = None if layer is None else layer_key(layer)
        if is_segmentation(layer):
            for region, value in zip(REGIONS, thresholds_in_force(layer)):
                self.sliders[region].setValue(round(value * 100))

    @property
    def labels_layer(self):
        name = self.layer_box.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _probability_layers(self) -> list | None:
        """The WT, TC and ET probability layers, if all are open."""
        names = [probability_layer_name(region) for region in REGIONS]
        if not all(name in self.viewer.layers for name in names):
            return None
        return [self.viewer.layers[name] for name in names]

    # ------------------------------------------------------------------ thresholds
    def thresholds(self) -> tuple[float, ...]:
        return tuple(self.sliders[region].value() / 100 for region in REGIONS)

    def apply_thresholds(self):
        """Re-derive the label map from the probabilities (in a worker thread); asks before
        discarding manual edits. Returns the worker, or None when nothing is done."""
        layer = self.labels_layer
        layers = self._probability_layers()
        if layer is None or layers is None:
            show_warning("Apply thresholds: needs a segmentation and its probability layers")
            return None
        if not is_segmentation(layer):
            # Expert labels, or a map drawn by hand: thresholds would overwrite it unasked.
            show_warning(
                f"Apply thresholds: {layer.name} was not made by Segment tumour; pick the "
                "segmentation in 'Label map'"
            )
            return None
        run = layer.metadata.get(META_KEY, {}).get("run")
        if run is None or layers[0].metadata.get(META_KEY, {}).get("run") != run:
            # Exams on one grid (BraTS, follow-ups registered to a baseline) share the
            # probability layers' shape: the run that made them tells them apart.
            show_warning(
                f"Apply thresholds: the probability layers come from another run than "
                f"{layer.name}; segment this exam again first"
            )
            return None
        edits = edited_voxels(layer)
        if edits is not None and edits.any():
            question = (
                f"{int(edits.sum())} voxels of {layer.name} were edited by hand. New thresholds "
                "replace the whole map (Ctrl+Z takes it back). Continue?"
            )
            if not self.confirm(question):
                self.status.setText("thresholds not applied: your edits are kept")
                return None
        # With the rules of the model's card (e.g. the 2D model's small-island removal), as the
        # segmentation itself was made.
        rules = layer.metadata.get(META_KEY, {}).get("postprocess")
        voxel_ml = layer_volume(layer).voxel_volume_ml
        thresholds = self.thresholds()
        maps = [probability.data for probability in layers]

        def compute(data):
            return card_labels(_stacked(maps), rules, voxel_ml, thresholds)

        def done(new, changes):
            if changes:
                record_thresholds(layer, new, thresholds)

        text = f"Thresholds {', '.join(f'{t:.2f}' for t in thresholds)}"
        return self._edit(text, layer, compute, done)

    # ------------------------------------------------------------------ clean-up
    def _clean(self, title: str, function):
        """Apply ``function`` (labels -> labels) to the map in a worker thread, then put the
        voxels it changed in place as one undoable edit; returns the worker."""
        layer = self.labels_layer
        if layer is None:
            return None
        return self._edit(title, layer, lambda data: function(np.asarray(data)))

    def _remove_islands(self):
        layer = self.labels_layer
        if layer is None:
            return None
        voxel_ml = layer_volume(layer).voxel_volume_ml
        min_ml = self.island_ml.value()
        return self._clean(
            f"Remove islands under {min_ml:g} mL",
            lambda labels: remove_small_islands(labels, min_ml, voxel_ml),
        )

    def _edit(self, title: str, layer, compute, done=None):
        """Compute a new map for ``layer`` (``compute(data)``, from its data as it is now) and
        the voxels it changes in a worker thread; on the main thread, put them in place as one
        undoable edit (`put_label_changes`) -- unless the map was edited meanwhile (the new map
        was computed from the old one)."""
        depth = edit_depth(layer)
        data = layer.data

        def work():
            new = compute(data)
            return new, label_changes(data, new)

        def apply(result) -> None:
            new, changed = result
            if edit_depth(layer) != depth or layer not in self.viewer.layers:
                self.status.setText(f"{title}: the map changed meanwhile; press again")
                return
            count = put_label_changes(layer, changed, new)
            if done is not None:
                done(new, count)
            self.status.setText(f"{title}: {count} voxels changed")

        return self.background.start(title, work, apply)

    # ------------------------------------------------------------------ uncertainty
    def show_uncertainty(self, then=None):
        """Add (or update) the uncertainty layer -- the mean entropy of the region
        probabilities, computed in a worker thread -- then call ``then()``; returns the
        worker."""
        layers = self._probability_layers()
        if layers is None:
            show_warning("Show uncertainty: run a segmentation first")
            return None
        source = layers[0]
        maps = [layer.data for layer in layers]

        def compute():
            uncertainty = entropy_map(_stacked(maps))
            return uncertainty, [int(z) for z in uncertain_slices(uncertainty)]

        def make(uncertainty):
            return Layer.create(
                uncertainty,
                {
                    "name": UNCERTAINTY,
                    "colormap": "magma",
                    "blending": "additive",
                    "contrast_limits": (0.0, 1.0),
                    "opacity": 0.7,
                    "metadata": {
                        META_KEY: {**source.metadata.get(META_KEY, {}), "role": UNCERTAINTY}
                    },
                    "scale": source.scale,
                    "translate": source.translate,
                    "rotate": source.rotate,
                },
                "image",
            )

        def shown(order) -> None:
            self._adding = False
            self._slice_order = order
            self._slice_pos = -1
            self.status.setText(f"{len(order)} slices hold uncertain voxels")
            if then is not None:
                then()

        def done(result) -> None:
            uncertainty, order = result
            layer = self._uncertainty_layer()
            if layer is not None and layer_volume(layer).same_grid(layer_volume(source)):
                layer.data = uncertainty
                shown(order)
                return
            if layer is not None:  # an earlier exam's map, on another grid
                self.viewer.layers.remove(layer)
            # A layer add stalls the viewer: split over event-loop turns (`add_layer_in_turns`).
            self._adding = True
            run_in_turns(
                [
                    add_layer_in_turns(self, partial(make, uncertainty), lambda layer: None),
                    partial(shown, order),
                ],
                on_error=lambda exc: (
                    setattr(self, "_adding", False),
                    result_not_shown("Show uncertainty", self.status)(exc),
                ),
            )

        return self.background.start("Computing the uncertainty", compute, done)

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
        """Move the viewer to the next most uncertain axial slice (cycling); returns it, or
        None when the uncertainty map must be computed first (the move follows it)."""
        layer = self._uncertainty_layer()
        if not self._slice_order or layer is None:
            self.show_uncertainty(then=self._next_slice)
            return None
        return self._next_slice()

    def _next_slice(self) -> int | None:
        layer = self._uncertainty_layer()
        if not self._slice_order or layer is None:
            show_info("The model is sure everywhere")
            return None
        self._slice_pos = (self._slice_pos + 1) % len(self._slice_order)
        z = self._slice_order[self._slice_pos]
        self.viewer.dims.set_point(0, _world_z_of_slice(layer, z))
        self.status.setText(
            f"slice {z} ({self._slice_pos + 1} of {len(self._slice_order)} uncertain slices)"
        )
        return z


def _stacked(maps) -> np.ndarray:
    """(3, Z, Y, X) float32 from the three probability layers' data (a 100 MB copy: in a
    worker thread)."""
    return np.stack([np.asarray(m, dtype=np.float32) for m in maps])


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
