"""Dock widget "Segment tumour": run a U-Net and watch the probability maps fill in."""

from __future__ import annotations

import time

import numpy as np
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QWidget,
)

from .._layers import META_KEY, geometry_metadata, labels_layer_data
from ..core.errors import TumorSegError
from ..core.inference import exam_to_channels, segment
from ..core.io import REGIONS, SEQUENCES, Exam, case_name
from ..core.models import list_models, load_model
from ._pickers import SequencePickers
from ._runner import Runner

#: Colour of each region's probability layer (the label colours of its main label).
REGION_COLORMAPS = {"WT": "green", "TC": "red", "ET": "yellow"}
#: Seconds between two redraws of the live probability maps (redraws cost CPU on 2 cores).
REDRAW_INTERVAL = 0.3


def probability_layer_name(region: str) -> str:
    return f"{region} probability"


class SegmentWidget(QWidget):
    """Pick the sequences and a model; Run fills WT/TC/ET probability layers live, then adds an
    editable BraTS labels layer."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.result = None
        self.labels_layer = None
        self._prob_layers: dict = {}
        self._last_redraw = 0.0

        form = QFormLayout(self)
        self.pickers = SequencePickers(napari_viewer, form, prefer="(registered)")
        self.model = QComboBox()
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.overlap = QDoubleSpinBox(minimum=0.0, maximum=0.9, singleStep=0.125, value=0.5)
        self.tta = QCheckBox("test-time mirroring (slower, smoother)")
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow("Model", self.model)
        form.addRow("Device", self.device)
        form.addRow("Window overlap", self.overlap)
        form.addRow(self.tta)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.status)

        self.runner = Runner("Segmenting", self._set_running)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.refresh_models()

    # ------------------------------------------------------------------ models
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the model picker: bundled 3D, bundled 2D, then user versions."""
        current = select or self.model.currentText()
        labels = [card["label"] for card in list_models()]
        self.model.clear()
        self.model.addItems(labels)
        if current in labels:
            self.model.setCurrentText(current)
        self.run_button.setEnabled(bool(labels))
        if not labels:
            self.status.setText("no model installed")

    # ------------------------------------------------------------------ running
    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running and self.model.count() > 0)
        self.cancel_button.setEnabled(running)

    def run(self):
        """Start segmenting the picked sequences; returns the worker (None if nothing to do)."""
        try:
            volumes = self.pickers.selected_volumes()
            channels = exam_to_channels(Exam(scans=volumes, name=self._case_name()))
            model = load_model(self.model.currentText())
        except TumorSegError as exc:
            show_warning(f"Segment tumour: {exc}")
            self.status.setText(str(exc))
            return None
        self._prob_layers = self._add_probability_layers(channels)
        self._last_redraw = 0.0
        missing = [s for s in SEQUENCES if s not in channels.channels]
        note = f" (missing: {', '.join(missing)})" if missing else ""
        used = ", ".join(channels.channels)
        self.status.setText(f"segmenting with {model.label} on {used}{note}")
        self._channels = channels
        self._model = model
        generator = segment(
            channels,
            model,
            device=self.device.currentText(),
            overlap=self.overlap.value(),
            tta=self.tta.isChecked(),
        )
        return self.runner.start(
            generator,
            on_yield=self._on_progress,
            on_return=self._on_done,
            on_cancel=self._discard_probability_layers,
            on_fail=self._discard_probability_layers,
        )

    def _add_probability_layers(self, channels) -> dict:
        grid = channels.with_array(np.zeros(channels.spatial_shape, np.float32), channels=())
        layers = {}
        for region in REGIONS:
            layers[region] = self.viewer.add_image(
                np.zeros(channels.spatial_shape, np.float32),
                name=f"{probability_layer_name(region)} (running)",
                colormap=REGION_COLORMAPS[region],
                blending="additive",
                opacity=0.6,
                contrast_limits=(0.0, 1.0),
                metadata=geometry_metadata(grid, region=region),
                **grid.layer_transform(),
            )
        return layers

    def _discard_probability_layers(self) -> None:
        for layer in self._prob_layers.values():
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._prob_layers = {}
        self.status.setText("cancelled: the layers are as they were before Run")

    def _on_progress(self, event) -> None:
        self.runner.set_progress(event.done, event.total, text=f"{event.done}/{event.total}")
        if event.box is not None and event.probabilities is not None:
            self._paint(event.box, event.probabilities)
        now = time.perf_counter()
        if now - self._last_redraw < REDRAW_INTERVAL and event.done != event.total:
            return
        self._last_redraw = now
        # The windows just computed, blended so far: the map fills in window by window.
        if event.preview is not None:
            box, values = event.preview()
            if box is not None:
                self._paint(box, values)
        for layer in self._prob_layers.values():
            layer.refresh()

    def _paint(self, box, probabilities) -> None:
        for index, region in enumerate(REGIONS):
            self._prob_layers[region].data[box] = probabilities[index]

    def _on_done(self, result) -> None:
        self.result = result
        # The previous run's probability maps make way for this run's.
        for region, layer in self._prob_layers.items():
            name = probability_layer_name(region)
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            layer.data = result.probabilities.array[list(REGIONS).index(region)]
            layer.name = name
        name = f"{self._channels.name} segmentation"
        data, kwargs, _ = labels_layer_data(result.labels, name=name)
        # Remember what the model said, so edits (the user's corrections) can be told apart.
        kwargs["metadata"][META_KEY].update(
            model=self._model.label,
            model_labels=result.labels.array.copy(),
            sequences=list(result.used_sequences),
        )
        # napari appends " [1]" to a taken name: an earlier (perhaps edited) layer is never
        # overwritten.
        self.labels_layer = self.viewer.add_labels(data, **kwargs)
        self._prob_layers = {}
        missing = list(result.missing_sequences)
        text = (
            f"done in {result.seconds:.1f} s with {self._model.label}; "
            f"based on {', '.join(result.used_sequences)}"
        )
        if missing:
            text += f"; missing {', '.join(missing)} (filled as the model card says)"
        self.status.setText(text)
        show_info(f"Segmentation ready: {self.labels_layer.name}")

    def _case_name(self) -> str:
        for layer in self.pickers.selected_layers().values():
            source = layer.metadata.get(META_KEY, {}).get("source_path")
            if source:
                return case_name(source)
        return "exam"
