"""Dock widget "Tumour volumes": volumes in mL of a labels layer, updated as the user edits."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QTableWidget, QTableWidgetItem, QWidget

from .._layers import layer_volume
from ..core.metrics import tumour_slice_range, tumour_volumes_ml

ROWS = ("NCR/NET", "ED", "ET", "TC", "WT")


class MeasureWidget(QWidget):
    """Volumes of NCR/NET, oedema, enhancing tumour, TC and WT, and the tumour's slice range."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._layer = None
        self.layer_box = QComboBox()
        self.table = QTableWidget(len(ROWS), 1)
        self.table.setHorizontalHeaderLabels(["volume (mL)"])
        self.table.setVerticalHeaderLabels(list(ROWS))
        self.slices = QLabel("-")
        form = QFormLayout(self)
        form.addRow("Label map", self.layer_box)
        form.addRow(self.table)
        form.addRow("Tumour slices (Z)", self.slices)
        # Edits arrive as bursts of paint events: recompute once the burst is over.
        self._timer = QTimer(self, singleShot=True, interval=120)
        self._timer.timeout.connect(self.update_measurements)
        self.layer_box.currentTextChanged.connect(self._select_layer)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        self._refresh_choices()

    def _refresh_choices(self, event=None) -> None:
        current = self.layer_box.currentText()
        names = [layer.name for layer in self.viewer.layers if layer._type_string == "labels"]
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        self.layer_box.addItems(names)
        self.layer_box.blockSignals(False)
        if current in names:
            self.layer_box.setCurrentText(current)
        self._select_layer(self.layer_box.currentText())

    def _select_layer(self, name: str) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is self._layer:
            return
        if self._layer is not None:
            self._layer.events.data.disconnect(self._schedule)
            self._layer.events.paint.disconnect(self._schedule)
        self._layer = layer
        if layer is not None:
            layer.events.data.connect(self._schedule)
            layer.events.paint.connect(self._schedule)
        self.update_measurements()

    def _schedule(self, event=None) -> None:
        self._timer.start()

    def current_volumes(self) -> dict[str, float] | None:
        """Volumes (mL) of the selected labels layer, or None when there is none."""
        if self._layer is None:
            return None
        volume = layer_volume(self._layer)
        return tumour_volumes_ml(np.asarray(self._layer.data), volume.voxel_volume_ml)

    def update_measurements(self) -> None:
        volumes = self.current_volumes()
        for row, name in enumerate(ROWS):
            text = "-" if volumes is None else f"{volumes[name]:.2f}"
            self.table.setItem(row, 0, QTableWidgetItem(text))
        span = None if self._layer is None else tumour_slice_range(np.asarray(self._layer.data))
        self.slices.setText("-" if span is None else f"{span[0]} - {span[1]}")
