"""Dock widget "Register sequences": align an exam's sequences and stack them on one grid."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from napari.layers import Layer
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from .._layers import geometry_metadata, scan_layer_data
from .._warmup import warm_up_layers
from ..core.io import SEQUENCES
from ..core.registration import POOR_QUALITY_DICE, stack_sequences
from ._layout import Section, name_box, scrolling_form
from ._orientation import show_orientation
from ._pickers import SequencePickers
from ._runner import Runner, add_layer_in_turns, result_not_shown, run_in_turns

REGISTERED = "(registered)"


def overlap_verdict(quality: float) -> str:
    """How well two heads overlap after registration (Dice of their masks), in words."""
    if quality >= 0.95:
        return "good"
    if quality >= POOR_QUALITY_DICE:
        return "fair: check by eye"
    return "poor: check by eye"


def checkerboard(a: np.ndarray, b: np.ndarray, block: int = 16) -> np.ndarray:
    """Interleave two (Z, Y, X) scans in in-plane squares of ``block`` voxels, each scaled to
    its 1st-99th percentile, so misaligned edges show as breaks at the square borders."""

    def scaled(x):
        values = x[x != 0] if np.any(x != 0) else x
        lo, hi = np.percentile(values, [1, 99])
        return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)

    y, x = np.indices(a.shape[1:])
    squares = ((y // block + x // block) % 2).astype(bool)
    return np.where(squares[None], scaled(a), scaled(b))


class RegisterWidget(QWidget):
    """Pick the sequence layers, register them to a reference and add them on its grid."""

    #: The registered layers, emitted once the last of them is in the viewer.
    registered = Signal(list)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.result = None
        self.reference = name_box()
        self.reference.addItems(["auto (t1ce, else flair)", *SEQUENCES])
        self.transform = QComboBox()
        self.transform.addItems(["rigid", "affine"])
        self.already = QCheckBox("already registered (only resample)")
        # Off by default: the registered layers then lie on the reference scan's own grid, so a
        # mask segmented on them is saved voxel for voxel like that scan (contract 2.1), as the
        # CLI's --register does. 1 mm is a new grid that belongs to no file.
        self.isotropic = QCheckBox("resample to a new 1 mm isotropic grid")
        self.isotropic.setChecked(False)
        self.run_button = QPushButton("Register")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.check_sequence = name_box()
        self.check_button = QPushButton("Checkerboard")
        self.check_button.setToolTip("Interleave the reference and a registered sequence")
        self.check_button.setEnabled(False)

        form = scrolling_form(self)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress_bar)
        form.addRow(self.status)
        check = QHBoxLayout()
        check.addWidget(self.check_sequence)
        check.addWidget(self.check_button)
        form.addRow("Check", check)
        self.options = Section("Scans and options")
        self.pickers = SequencePickers(napari_viewer, self.options.form, exclude=REGISTERED)
        self.options.form.addRow("Reference", self.reference)
        self.options.form.addRow("Transform", self.transform)
        self.options.form.addRow(self.already)
        self.options.form.addRow(self.isotropic)
        form.addRow(self.options)

        self.runner = Runner(
            "Registering sequences", self._set_running, owner=self, bar=self.progress_bar
        )
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.check_button.clicked.connect(self.show_checkerboard)
        show_orientation(napari_viewer)
        warm_up_layers()

    # ------------------------------------------------------------------ running
    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def run(self):
        """Start the registration in a worker thread; returns the worker."""
        scans = self.pickers.selected_volumes()
        if not scans:
            show_warning("Register sequences: pick at least one sequence layer")
            return None
        reference = self.reference.currentText()
        generator = stack_sequences(
            scans,
            reference=None if reference.startswith("auto") else reference,
            already_registered=self.already.isChecked(),
            transform=self.transform.currentText(),
            spacing_mm=1.0 if self.isotropic.isChecked() else None,
        )
        self.status.setText("registering ...")
        return self.runner.start(
            generator,
            on_yield=self._on_progress,
            on_return=self._on_done,
            on_cancel=lambda: self.status.setText("cancelled: no layer was changed"),
            on_fail=lambda: self.status.setText("failed: no layer was changed"),
        )

    def _on_progress(self, event) -> None:
        text = f"{event.sequence} ({event.step + 1}/{event.steps}) {event.stage}"
        if event.stage == "optimise":
            text += f", level {event.level + 1}/{event.levels}"
        self.runner.set_progress(int(100 * event.fraction), text=text)

    def _on_done(self, result) -> None:
        # The checkerboard pairs the result with its sequence list: both change in `_announce`,
        # once the layers are in.
        self.check_button.setEnabled(False)
        volume = result.volume
        added: list = []
        # A layer add stalls the viewer (60-100 ms on 2 cores): each is split over event-loop
        # turns, and the last one added is the selected layer, as with napari's own adds.
        steps = [
            add_layer_in_turns(
                self,
                partial(self._make_registered_layer, volume, index, result.reference),
                added.append,
                select=index == len(volume.channels) - 1,
            )
            for index in range(len(volume.channels))
        ]
        run_in_turns(
            [*steps, partial(self._announce, result, added)],
            on_error=result_not_shown("Register sequences", self.status),
        )

    @staticmethod
    def _make_registered_layer(volume, index: int, reference: str):
        seq = volume.channels[index]
        channel = volume.with_array(volume.array[index], name=seq, channels=())
        return Layer.create(
            *scan_layer_data(
                channel,
                name=f"{seq} {REGISTERED}",
                metadata=geometry_metadata(channel, registered_to=reference),
            )
        )

    def _announce(self, result, added: list) -> None:
        self.result = result
        volume = result.volume
        lines = [f"reference: {result.reference}"]
        for seq, r in result.results.items():
            if seq == result.reference:
                continue
            if math.isnan(r.metric):  # "already registered": resampled, not registered
                lines.append(f"{seq}: resampled onto the reference grid only")
                continue
            # Mutual information ("MI -0.732") means nothing to a clinician: how well the two
            # heads overlap does (Dice of their masks, before and after).
            before = "" if math.isnan(r.quality_before) else f", {r.quality_before:.0%} before"
            lines.append(
                f"{seq}: heads overlap {r.quality:.0%} ({overlap_verdict(r.quality)}{before})"
            )
        lines += [f"WARNING {w}" for w in result.warnings]
        self.status.setText("\n".join(lines))
        for warning in result.warnings:
            show_warning(f"Register sequences: {warning}")
        if not result.warnings:
            show_info("Sequences registered: check the alignment with the checkerboard")
        self.check_sequence.clear()
        self.check_sequence.addItems([s for s in volume.channels if s != result.reference])
        self.check_button.setEnabled(self.check_sequence.count() > 0)
        self.registered.emit(added)

    def show_checkerboard(self) -> None:
        """Add a checkerboard of the reference and the chosen sequence on the result grid."""
        if self.result is None or not self.check_sequence.currentText():
            return
        volume = self.result.volume
        channels = list(volume.channels)
        seq = self.check_sequence.currentText()
        board = checkerboard(
            volume.array[channels.index(self.result.reference)], volume.array[channels.index(seq)]
        )
        self.viewer.add_image(
            board,
            name=f"checkerboard {self.result.reference}/{seq}",
            colormap="gray",
            contrast_limits=(0, 1),
            **volume.layer_transform(),
        )
