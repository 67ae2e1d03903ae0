"""Dock widget "Tumour volumes": volumes of a label map as the user edits it, evaluation against a
reference label map, and saving the mask with a report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from .._layers import (
    META_KEY,
    edit_depth,
    is_volume_layer,
    layer_key,
    layer_volume,
    painted_labels,
    same_layer,
)
from .._notify import notify
from .._warmup import warm_up_layers
from .._writer import save_target
from ..core.errors import TumorSegError
from ..core.io import REGIONS, OutputFiles, case_name, write_labels
from ..core.metrics import evaluate_labels, tumour_slice_range, tumour_volumes_ml
from ..pipeline import label_map_report, report_paths, thresholds_text, write_report
from ._layout import name_box, scrolling_form
from ._orientation import show_orientation
from ._pickers import follow_renames
from ._runner import Background
from ._segmentation import is_segmentation, thresholds_in_force

ROWS = ("NCR/NET", "ED", "ET", "TC", "WT")
NO_REFERENCE = "(no reference)"
#: A brush stroke sends many paint events; the volumes are recomputed once it pauses this long.
DEBOUNCE_MS = 50


def _fit_table(table: QTableWidget) -> QTableWidget:
    """Show every row without scrolling, and every column's title whole (the tables are small
    and fixed; a narrow dock column cut "HD95 (mm)")."""
    header = table.horizontalHeader()
    header.setSectionResizeMode(header.Stretch)
    table.verticalHeader().setDefaultSectionSize(24)
    height = header.sizeHint().height() + 6 + 24 * table.rowCount()
    table.setFixedHeight(height)
    columns = sum(header.sectionSizeHint(c) for c in range(table.columnCount()))
    frame = 2 * table.frameWidth() + 4
    table.setMinimumWidth(table.verticalHeader().sizeHint().width() + columns + frame)
    return table


class MeasureWidget(QWidget):
    """Volumes (mL) of NCR/NET, oedema, enhancing tumour, TC and WT and the tumour's slice range,
    Dice and HD95 against a reference labels layer, and "Save mask" with a JSON/CSV report."""

    #: The files a save wrote (an empty list: declined or failed), when it has ended.
    saved = Signal(list)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._layer = None
        self.scores: dict | None = None
        self._scored_reference = None  # the reference layer the scores were measured against
        self._reference = None  # the reference layer chosen
        self._scored_history: tuple = ()
        self._history: tuple = ()
        self.layer_box = name_box()
        self.table = QTableWidget(len(ROWS), 1)
        self.table.setHorizontalHeaderLabels(["volume (mL)"])
        self.table.setVerticalHeaderLabels(list(ROWS))
        self.slices = QLabel("-")
        self.reference_box = name_box()
        self.evaluate_button = QPushButton("Evaluate")
        self.scores_table = QTableWidget(len(REGIONS), 2)
        self.scores_table.setHorizontalHeaderLabels(["Dice", "HD95 (mm)"])
        self.scores_table.setVerticalHeaderLabels(list(REGIONS))
        self.save_button = QPushButton("Save mask and report...")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        _fit_table(self.table)
        _fit_table(self.scores_table)
        self.background = Background("Evaluate", [self.evaluate_button], self.status)
        self.saving = Background("Save mask", [self.save_button], self.status)

        form = scrolling_form(self)
        form.addRow("Label map", self.layer_box)
        form.addRow(self.table)
        form.addRow("Tumour slices (Z)", self.slices)
        row = QHBoxLayout()
        row.addWidget(self.reference_box)
        row.addWidget(self.evaluate_button)
        form.addRow("Reference", row)
        form.addRow(self.scores_table)
        form.addRow(self.status)
        form.addRow(self.save_button)

        # Edits arrive as bursts of paint events: recompute once the burst is over.
        self._timer = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_measurements)
        self.layer_box.currentTextChanged.connect(self._select_layer)
        self.reference_box.currentTextChanged.connect(self._select_reference)
        self.evaluate_button.clicked.connect(self.evaluate)
        self.save_button.clicked.connect(self._save_clicked)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        follow_renames(self.viewer, self._refresh_choices)
        self._refresh_choices()
        show_orientation(napari_viewer)
        warm_up_layers()

    # ------------------------------------------------------------------ layers
    def _labels_names(self) -> list[str]:
        return [layer.name for layer in self.viewer.layers if is_volume_layer(layer, "labels")]

    def _refresh_choices(self, event=None) -> None:
        names = self._labels_names()
        # The chosen layers keep their place under a new name (napari's rename).
        chosen = {self.layer_box: self._layer, self.reference_box: self._reference}
        inserted = event.value if getattr(event, "type", None) == "inserted" else None
        for box, extra in ((self.layer_box, []), (self.reference_box, [NO_REFERENCE])):
            layer = chosen[box]
            current = layer.name if layer in self.viewer.layers else box.currentText()
            if box is self.layer_box and is_segmentation(inserted):
                # A new segmentation (a run, a fine-tune's): the volumes are its own, not the
                # expert's map or an earlier run's, which a user would read as the model's.
                current = inserted.name
            box.blockSignals(True)
            box.clear()
            box.addItems([*extra, *names])
            if current in names or current in extra:
                box.setCurrentText(current)
            elif box is self.layer_box and names:
                box.setCurrentText(names[-1])  # the newest map, e.g. a fresh segmentation
            box.blockSignals(False)
        self._select_reference(self.reference_box.currentText())
        self._select_layer(self.layer_box.currentText())

    def _select_reference(self, name: str) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if same_layer(layer, self._reference):
            return
        _rewire(self._reference, layer, self._reference_edited, self._reference_refreshed)
        self._reference = layer

    def _reference_edited(self, event=None) -> None:
        # Dice/HD95 against the reference as it was would go into the report.
        if self.scores is not None and same_layer(self._scored_reference, self._reference):
            self._clear_scores()

    def _reference_refreshed(self, event=None) -> None:
        # Undo and redo only refresh the layer (as every slice change does): its edit
        # history tells them apart.
        if self._history_state(self._reference) != self._scored_history:
            self._reference_edited()

    def _select_layer(self, name: str) -> None:
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if same_layer(layer, self._layer):
            return
        _rewire(self._layer, layer, self._data_changed, self._refreshed)
        self._layer = layer
        self._history = self._history_state()
        self._clear_scores()
        self.update_measurements()

    def _history_state(self, layer=None) -> tuple:
        layer = self._layer if layer is None else layer
        key = None if layer is None else layer_key(layer)
        return (key, edit_depth(layer), edit_depth(layer, redo=True))

    def _refreshed(self, event=None) -> None:
        # Undo and redo only refresh the layer (``set_data``), as every slice change does: the
        # edit history tells them apart.
        if self._history_state() != self._history:
            self._data_changed()

    def _data_changed(self, event=None) -> None:
        self._history = self._history_state()
        self._clear_scores()  # Dice/HD95 of the map as it was would go into the report
        self._timer.start()

    def _clear_scores(self) -> None:
        self.scores = None
        self._scored_reference = None
        for row in range(len(REGIONS)):
            for column in range(2):
                self.scores_table.setItem(row, column, QTableWidgetItem("-"))

    # ------------------------------------------------------------------ volumes
    def current_volumes(self) -> dict[str, float] | None:
        """Volumes (mL) of the selected labels layer, or None when there is none."""
        if self._layer is None:
            return None
        voxel_ml = layer_volume(self._layer).voxel_volume_ml
        return tumour_volumes_ml(np.asarray(self._layer.data), voxel_ml)

    def update_measurements(self) -> None:
        volumes = self.current_volumes()
        for row, name in enumerate(ROWS):
            text = "-" if volumes is None else f"{volumes[name]:.2f}"
            self.table.setItem(row, 0, QTableWidgetItem(text))
        span = None if self._layer is None else tumour_slice_range(np.asarray(self._layer.data))
        self.slices.setText("-" if span is None else f"{span[0]} - {span[1]}")

    # ------------------------------------------------------------------ evaluation
    @property
    def busy(self) -> bool:
        """Whether an evaluation or a save is still running."""
        return self.background.busy or self.saving.busy

    def evaluate(self):
        """Dice and HD95 of the selected map against the reference layer, computed in a
        worker thread and shown in the table (``scores``); returns the worker."""
        self._clear_scores()
        if self._layer is None or self._reference is None:
            return None
        layer, reference_layer = self._layer, self._reference
        reference = layer_volume(reference_layer)
        labels = layer_volume(layer)
        if not labels.same_grid(reference):
            notify(f"{layer.name} and {reference_layer.name} lie on different grids", "Evaluate")
            return None
        history = (self._history_state(layer), self._history_state(reference_layer))

        def compute():
            return evaluate_labels(
                np.asarray(labels.array), np.asarray(reference.array), labels.spacing
            )

        def show(scores) -> None:
            # Scores of maps edited meanwhile, or of other layers, would be wrong: dropped.
            now = (self._history_state(self._layer), self._history_state(self._reference))
            if now != history:
                self.status.setText("Evaluate: the maps changed meanwhile; press again")
                return
            self.scores = scores
            self._scored_reference = reference_layer
            self._scored_history = history[1]
            for row, region in enumerate(REGIONS):
                s = scores[region]
                self.scores_table.setItem(row, 0, QTableWidgetItem(f"{s['dice']:.3f}"))
                self.scores_table.setItem(row, 1, QTableWidgetItem(f"{s['hd95_mm']:.1f}"))
            self.status.setText(f"{layer.name} against {reference_layer.name}")

        return self.background.start("Evaluating", compute, show)

    # ------------------------------------------------------------------ saving
    def _save_clicked(self) -> None:
        if self._layer is None:
            return
        # Qt's own "replace?" question is off: `save` asks once, for the mask and its reports.
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save mask",
            str(default_save_path(self._layer)),
            "NIfTI (*.nii.gz *.nii)",
            options=QFileDialog.DontConfirmOverwrite,
        )
        if path:
            self.save(Path(path), confirm_overwrite=_ask_overwrite)

    def save(self, path: Path, confirm_overwrite=lambda paths: False):
        """Write the mask (scan geometry) and its report next to it (``.json`` and ``.csv``),
        in a worker thread; `saved` says which files were written (none: declined or failed).

        Existing files are replaced only if ``confirm_overwrite(existing_paths)`` says so; every
        file is written to a temporary name first and renamed into place. Returns the worker,
        or None when nothing is written.
        """
        if self._layer is None:
            return self._saved([])
        name = path.name
        if not name.endswith((".nii", ".nii.gz")):
            name = f"{name}.nii.gz"  # the name as typed, dots and all ("sub-01.ses-1")
            path = path.with_name(name)
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
        report_base = path.with_name(f"{stem}_report")
        targets = [path, *report_paths(report_base)]
        existing = [p for p in targets if p.exists()]
        if existing and not confirm_overwrite(existing):
            show_info("Save mask: nothing written (existing files kept)")
            return self._saved([])
        layer = self._layer
        volume = layer_volume(layer)
        meta = layer.metadata.get(META_KEY, {})
        # A segmentation's report says which thresholds made its map (those in force).
        made = meta.get("model_labels") is not None
        thresholds = thresholds_text(thresholds_in_force(layer)) if made else None
        scores, reference = self.scores, self._scored_reference
        try:
            # The map as it is now: painting goes on while the files are written.
            volume = save_target(
                path, volume.with_array(np.array(volume.array)), layer.name, self.viewer
            )
        except TumorSegError as exc:
            notify(exc, "Save mask")
            return self._saved([])

        def write():
            try:
                array = painted_labels(volume.array, layer.name)
                report = label_map_report(
                    array,
                    volume.voxel_volume_ml,
                    exam=meta.get("source_path") or layer.name,
                    layer=layer.name,
                    model=meta.get("model"),
                    thresholds=thresholds,
                    mask_file=str(path),
                    reference=reference.name if scores else None,
                    metrics=scores,
                )
                # The mask and its report replace earlier files together or not at all: a
                # report beside a mask it does not describe would be worse than the old pair.
                with OutputFiles() as outputs:
                    written = [write_labels(path, array, volume, outputs=outputs)]
                    written += write_report(report_base, report, outputs)
            except (TumorSegError, OSError) as exc:
                return [], exc  # (a returned exception would be taken for a crash)
            return written, None

        def done(outcome):
            written, problem = outcome
            if problem is not None:
                self.status.setText(f"not saved: {notify(problem, 'Save mask')}")
            else:
                self.status.setText(f"saved {path.name} and its report")
                show_info(f"Saved {path.name} and its report")
            self._saved(written)

        return self.saving.start(f"Saving {path.name}", write, done)

    def _saved(self, written: list[Path]) -> None:
        self.saved.emit(written)


def default_save_path(layer) -> Path:
    """Where the save dialog starts: the exam's folder (that of the scan the map belongs to,
    else the working folder) and a file name without spaces, e.g. ``<case>_seg_3d.nii.gz``."""
    meta = layer.metadata.get(META_KEY, {})
    source = meta.get("source_path")
    folder = Path(source).parent if source else Path.cwd()
    if source and meta.get("model"):
        stem = f"{case_name(source)}_seg_{meta['model']}"
    else:
        stem = layer.name
    stem = re.sub(r"[^\w.@-]+", "_", stem).strip("_") or "mask"
    return folder / f"{stem}.nii.gz"


def _rewire(old, new, edited, refreshed) -> None:
    """Move a labels layer's edit callbacks from layer ``old`` to ``new`` (either may be None):
    ``edited`` on paint and data events, ``refreshed`` on set_data (undo and redo only refresh
    the layer, as every slice change does)."""
    for layer, method in ((old, "disconnect"), (new, "connect")):
        if layer is not None:
            for event, callback in (("paint", edited), ("data", edited), ("set_data", refreshed)):
                getattr(getattr(layer.events, event), method)(callback)


def _ask_overwrite(paths: list[Path]) -> bool:
    names = "\n".join(str(p) for p in paths)
    answer = QMessageBox.question(
        None, "Replace files?", f"These files exist and would be replaced:\n{names}"
    )
    return answer == QMessageBox.Yes
