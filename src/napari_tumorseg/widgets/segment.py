"""Dock widget "Segment tumour": run a U-Net and watch the probability maps fill in."""

from __future__ import annotations

import time
import uuid
from functools import partial

import numpy as np
from napari.layers import Layer
from napari.utils.notifications import show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QWidget,
)

from .._layers import (
    META_KEY,
    REGION_COLORS,
    find_layer,
    is_volume_layer,
    labels_layer_data,
    layer_key,
    layer_volume,
    probability_layer_data,
    same_layer,
)
from .._notify import notify
from .._warmup import warm_up_layers
from ..core.brain import INSTALL_HINT as BRAIN_HINT
from ..core.brain import BrainProgress, exam_in_brain
from ..core.brain import available as brain_available
from ..core.errors import TumorSegError
from ..core.inference import check_one_grid, segment
from ..core.io import REGIONS, SEQUENCES, Exam, case_name
from ..core.jobs import map_events
from ..core.models import learnt_from, list_models, load_model
from ..core.preprocess import is_skull_stripped
from ._finetune import FinetuneSection
from ._layout import Section, scrolling_form
from ._orientation import show_orientation
from ._pickers import SequencePickers, volumes_of
from ._runner import PROGRESS_STEPS, Runner, add_layer_in_turns, result_not_shown, run_in_turns
from ._segmentation import probability_layer_name

#: Seconds between two redraws of the live probability maps (redraws cost CPU on 2 cores).
REDRAW_INTERVAL = 0.3
#: The brain-extraction checkbox, offered when the scans still have their skull.
BRAIN_OFFER = "Extract the brain first (HD-BET)"
BRAIN_NOTE = "These scans still have their skull: the models were trained on brains alone."


def segmentation_name(model_label: str, exam_name: str) -> str:
    """A run's label map: which model (and version) made it first -- the layer list cuts long
    names at their end -- then the exam."""
    return f"{model_label} seg {exam_name}"


def legend_html() -> str:
    """A one-line legend of the probability maps' colours."""
    swatches = " ".join(
        f'<span style="color: rgb({int(255 * r)}, {int(255 * g)}, {int(255 * b)})">'
        f"&#9632;</span> {region}"
        for region, (r, g, b) in REGION_COLORS.items()
    )
    return f"probability maps {swatches}"


def with_previews(generator, interval: float = REDRAW_INTERVAL):
    """Pair each progress event of `segment` with a preview of the windows just computed,
    at most every ``interval`` seconds. Previews and the final boxes' probabilities are
    computed here -- in the worker thread -- so the main thread only copies arrays. Yields
    ``(event, (box, values) or None)``."""
    last = [0.0]

    def pair(event):
        if event.done == event.total:
            return event, None  # the whole map comes with the result (`_on_progress`)
        event.probabilities  # noqa: B018 -- computed on first read: read it in this thread
        now = time.perf_counter()
        if event.preview is None or now - last[0] < interval:
            return event, None
        last[0] = now
        return event, event.preview()

    return map_events(generator, pair)


class _ModelPicker(QComboBox):
    """The model picker: its list is read again each time it opens, so that versions saved
    meanwhile (by another window, the CLI) appear and deleted ones go."""

    def __init__(self, refresh) -> None:
        super().__init__()
        self._refresh = refresh
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(16)  # as `name_box`: long names do not widen the dock
        self.currentTextChanged.connect(self.setToolTip)

    def showPopup(self) -> None:  # noqa: N802 -- Qt's name
        self._refresh()
        super().showPopup()


#: The fine-tuning rounds the line under the model picker names (the tooltip names them all),
#: so that a long lineage does not stretch the dock.
MODEL_INFO_ROUNDS = 3


class SegmentWidget(FinetuneSection, QWidget):
    """Pick the sequences and a model; Run fills WT/TC/ET probability layers live, then adds an
    editable BraTS labels layer and emits ``segmented`` with it."""

    #: Emitted with the new labels layer once a run's layers are all in place.
    segmented = Signal(object)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.result = None
        self.labels_layer = None
        self._prob_layers: dict = {}
        # region -> (data, visible) of a reused layer, restored on cancel
        self._reused: dict = {}
        self._last_redraw = 0.0
        self._painted = False

        form = scrolling_form(self)
        self.model = _ModelPicker(self.refresh_models)
        self._reported: set[str] = set()  # model folders already warned about
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.legend = QLabel(legend_html())
        self.legend.setWordWrap(True)
        form.addRow("Model", self.model)
        # What the picked model learnt from (a fine-tuned version: its exams and slices).
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self._cards: dict[str, dict] = {}
        self.model.currentTextChanged.connect(self._show_model_info)
        form.addRow(self.model_info)
        # Offered before the run when the picked scans still have their skull (`_offer_brain`).
        self.brain = QCheckBox(BRAIN_OFFER)
        self.brain.setToolTip(
            "The bundled models were trained on skull-stripped brains: on a head with its "
            "skull they mark tumour in the orbits, sinuses and scalp. HD-BET (Isensee et al. "
            "2019) masks the scans to the brain first, in about 25 s on 2 CPU cores."
        )
        self.brain.setVisible(False)
        self.brain_note = QLabel("")
        self.brain_note.setWordWrap(True)
        self.brain_note.setVisible(False)
        form.addRow(self.brain)
        form.addRow(self.brain_note)
        self.brain_result = None  # the last run's brain extraction (`core.brain.BrainResult`)
        self._brain_offered_for = None  # `layer_key`s of the scans the offer was made for
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress_bar)
        form.addRow(self.status)
        form.addRow(self.legend)

        # The scans and the run's settings: chosen for the user, folded away.
        self.options = Section("Scans and options")
        self.pickers = SequencePickers(napari_viewer, self.options.form, prefer="(registered)")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.overlap = QDoubleSpinBox(minimum=0.0, maximum=0.9, singleStep=0.125, value=0.5)
        self.tta = QCheckBox("test-time mirroring (slower)")
        self.options.form.addRow("Device", self.device)
        self.options.form.addRow("Window overlap", self.overlap)
        self.options.form.addRow(self.tta)
        form.addRow(self.options)

        self._build_finetune_section(form)

        self.runner = Runner("Segmenting", self._set_running, owner=self, bar=self.progress_bar)
        self._scan_keys: dict = {}
        self.run_button.clicked.connect(lambda: self.run())  # not clicked(bool) as scan_layers
        self.cancel_button.clicked.connect(self.cancel)
        self.refresh_models()
        # After the pickers' own refresh (connected first), and when the user picks a scan.
        napari_viewer.layers.events.inserted.connect(self._offer_brain)
        napari_viewer.layers.events.removed.connect(self._offer_brain)
        for box in self.pickers.boxes.values():
            box.currentTextChanged.connect(self._offer_brain)
        self._offer_brain()
        show_orientation(napari_viewer)
        warm_up_layers()

    def _offer_brain(self, *_) -> None:
        """Show "Extract the brain first" when the picked scans are not skull-stripped (their
        faces hold voxels); checked when HD-BET is installed, else say how to install it. The
        user's choice stays while the picked scans do."""
        layers = list(self.pickers.selected_layers().values())
        # The test `pipeline.extract_brain_if_needed` makes; scans on other grids are refused
        # at Run anyway.
        shapes = {np.shape(layer.data) for layer in layers}
        skull_on = len(shapes) == 1 and not is_skull_stripped(
            [np.asarray(layer.data) for layer in layers]
        )
        self.brain.setVisible(skull_on)
        self.brain_note.setVisible(skull_on)
        key = tuple(layer_key(layer) for layer in layers) if skull_on else None
        if key == self._brain_offered_for:  # the user's choice stays while the scan does
            return
        self._brain_offered_for = key
        if skull_on:
            installed = brain_available()
            self.brain.setEnabled(installed)
            self.brain.setChecked(installed)
            self.brain_note.setText(
                BRAIN_NOTE if installed else f"{BRAIN_NOTE} Not installed: {BRAIN_HINT}"
            )

    # ------------------------------------------------------------------ models
    def refresh_models(self, select: str | None = None) -> None:
        """Fill the model picker: bundled 3D, bundled 2D, then user versions."""
        current = select or self.model.currentText()
        problems: list[str] = []
        self._cards = {card["label"]: card for card in list_models(problems)}
        labels = list(self._cards)
        for problem in problems:
            if problem not in self._reported:  # once, not at every opening of the picker
                self._reported.add(problem)
                notify(f"a model was left out: {problem}", "Segment tumour", "warning")
        self.model.clear()
        self.model.addItems(labels)
        if current in labels:
            self.model.setCurrentText(current)
        self._set_running(False)  # Run stays disabled while a job runs
        if not labels:
            self.status.setText("no model installed")

    def _show_model_info(self, label: str) -> None:
        card = self._cards.get(label, {})
        text = learnt_from(card, latest=MODEL_INFO_ROUNDS)
        self.model_info.setText(text)
        self.model_info.setToolTip(learnt_from(card))  # every round
        self.model_info.setVisible(bool(text))

    # ------------------------------------------------------------------ running
    def _set_running(self, running: bool) -> None:
        busy = self.runner.running or self.tuner.running
        self.run_button.setEnabled(not busy and self.model.count() > 0)
        self.finetune_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if not busy:
            self.cancel_button.setText("Cancel")
            self._countdown.stop()
            self._estimate = None

    def cancel(self) -> None:
        """Stop the running segmentation or fine-tuning (at its next convolution or step);
        the dock says "cancelling..." until it has."""
        if not (self.runner.running or self.tuner.running):
            return
        self.runner.cancel()
        self.tuner.cancel()
        self.cancel_button.setText("Cancelling...")
        self.cancel_button.setEnabled(False)

    def run(self, scan_layers: dict | None = None):
        """Start segmenting the picked sequences (or ``scan_layers``: sequence -> `layer_key`
        of a scan layer, those a segmentation was made from); returns the worker (None if
        nothing to do)."""
        try:
            layers = self._scan_layers(scan_layers)
            exam = Exam(scans=volumes_of(layers), name=self._case_name(layers))
            reference = check_one_grid(exam)
            model = load_model(self.model.currentText())
        except TumorSegError as exc:
            notify(exc, "Segment tumour", "warning")
            self.status.setText(exc.headline)
            self._after_finetune = None
            return None
        self._scan_keys = {seq: layer_key(layer) for seq, layer in layers.items()}
        self._prob_layers, self._reused = {}, {}
        self._last_redraw = 0.0
        self._painted = False
        missing = [s for s in SEQUENCES if s not in exam.scans]
        note = f" (missing: {', '.join(missing)})" if missing else ""
        used = ", ".join(s for s in SEQUENCES if s in exam.scans)
        self.status.setText(f"segmenting with {model.label} on {used}{note}")
        self._unit = "window" if model.card.get("spatial_dims") == 3 else "slice"
        self._exam_name = exam.name
        self._model = model
        # The layers take the reference scan's grid; the four sequences are stacked into the
        # model input inside the worker (`segment` accepts the Exam): it takes ~0.1-0.3 s.
        grid = reference.with_array(reference.array, name=exam.name, channels=())
        options = {
            "model": model,
            "device": self.device.currentText(),
            "overlap": self.overlap.value(),
            "tta": self.tta.isChecked(),
        }
        self.brain_result = None
        if self.brain.isVisibleTo(self) and self.brain.isEnabled() and self.brain.isChecked():
            self.status.setText(f"{self.status.text()}, the brain extracted first (HD-BET)")
            generator = self._brain_then_segment(exam, options)
        else:
            generator = with_previews(segment(exam, **options))
        return self.runner.start(
            generator,
            on_yield=self._on_progress,
            on_return=self._on_done,
            on_cancel=self._discard_probability_layers,
            on_fail=partial(self._discard_probability_layers, "failed"),
            # Layers added a part per event-loop turn (an add stalls the viewer); then the
            # worker starts.
            prepare=[
                add_layer_in_turns(
                    self,
                    partial(self._make_probability_layer, grid, r),
                    partial(self._prob_layers.__setitem__, r),
                    # The user's selected layer (a scan, say) stays selected during the run.
                    select=False,
                )
                for r in REGIONS
            ],
        )

    def _brain_then_segment(self, exam: Exam, options: dict):
        """HD-BET's brain mask, then the segmentation of the masked scans; yields what
        `_on_progress` takes, and returns the segmentation's result."""
        job = exam_in_brain(exam)
        try:
            event = next(job)
            while True:
                yield event, None
                event = next(job)
        except StopIteration as stop:
            masked, self.brain_result = stop.value
        finally:
            job.close()  # closed early (Cancel): stops the network between two stages
        return (yield from with_previews(segment(masked, **options)))

    def _make_probability_layer(self, grid, region: str):
        """The region's probability layer for a new run: None where the previous run's layer
        is refilled instead (it is then already in ``_prob_layers``)."""
        name = probability_layer_name(region)
        previous = self.viewer.layers[name] if name in self.viewer.layers else None
        if previous is not None and layer_volume(previous).same_grid(grid):
            # The previous run's map is refilled: adding a napari layer stalls the viewer, and
            # the user's display settings (visibility, opacity, colormap) stay. Cancel restores it.
            self._reused[region] = (previous.data, previous.visible)
            previous.data = np.zeros(grid.spatial_shape, np.float32)
            previous.name = f"{name} (running)"
            previous.visible = True  # hidden after the last run: this one fills in live
            self._prob_layers[region] = previous
            return None
        empty = grid.with_array(np.zeros(grid.spatial_shape, np.float32), name=region)
        return Layer.create(
            *probability_layer_data(empty, name=f"{probability_layer_name(region)} (running)")
        )

    def _scan_layers(self, keys: dict | None) -> dict:
        """Sequence -> layer: the pickers' choice, or the layers of ``keys`` (`layer_key` of
        the scans a segmentation was made from), which must still be open.

        The layers themselves, not their names: another exam opened under the same layer
        names (t1, t1ce, ...) must not be taken for this one, and a renamed scan is the
        same scan."""
        if keys is None:
            return self.pickers.selected_layers()
        layers = {seq: find_layer(self.viewer.layers, key) for seq, key in keys.items()}
        gone = [seq for seq, layer in layers.items() if layer is None]
        if gone:
            several = len(gone) > 1
            raise TumorSegError(
                f"the {', '.join(gone)} scan{'s' if several else ''} this segmentation was made "
                f"from {'are' if several else 'is'} no longer open (closed, or replaced by "
                "another exam's): segment the open scans first"
            )
        return layers

    def _discard_probability_layers(self, outcome: str = "cancelled") -> None:
        self._after_finetune = None
        for region, layer in self._prob_layers.items():
            if region in self._reused:
                layer.data, layer.visible = self._reused[region]
                layer.name = probability_layer_name(region)
            elif layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self._prob_layers, self._reused = {}, {}
        self.status.setText(f"{outcome}: the layers are as they were before Run")

    def _on_progress(self, item) -> None:
        event, preview = item
        if isinstance(event, BrainProgress):
            self.runner.set_progress(
                event.done, event.total, text=f"brain extraction {event.done}/{event.total}"
            )
            return
        for warning in event.warnings:  # before the wait, not after it (a skull still on)
            notify(warning, "Segment tumour", "warning")
            self.status.setText(f"{self.status.text()}\nWARNING {warning}")
        current = min(event.done + 1, event.total) if event.total else 0
        text = f"{self._unit} {current}/{event.total}"
        if event.finishing:
            text = "applying the exam head"
        self.runner.set_progress(round(PROGRESS_STEPS * event.fraction), PROGRESS_STEPS, text=text)
        if event.done == event.total:
            # The whole map arrives with the result right after (`_finish_probability_layer`):
            # painting the last boxes first would copy up to the whole brain twice (~100 ms of
            # stalled viewer measured).
            return
        if event.box is not None and event.probabilities is not None:
            self._paint(event.box, event.probabilities)
        # The windows just computed, blended so far: the map fills in window by window.
        if preview is not None and preview[0] is not None:
            self._paint(*preview)
        now = time.perf_counter()
        # Redrawn only when something was painted: most events come from inside a window
        # (`part`), and each redraw of three maps costs the CPU the network runs on (software
        # rendering: the dock segmented at half the speed of a plain script).
        if self._painted and now - self._last_redraw >= REDRAW_INTERVAL:
            self._last_redraw = now
            self._painted = False
            for layer in self._prob_layers.values():
                layer.refresh()

    def _paint(self, box, probabilities) -> None:
        self._painted = True
        for index, region in enumerate(REGIONS):
            self._prob_layers[region].data[box] = probabilities[index]

    def _on_done(self, result) -> None:
        self.result = result
        layers, self._prob_layers, self._reused = self._prob_layers, {}, {}
        # Stamped on the probability layers and the label map of this run: the Review dock
        # re-thresholds a map only with its own run's probabilities (exams on one grid look
        # alike otherwise).
        run = uuid.uuid4().hex
        steps = []
        for region, layer in layers.items():
            steps += [
                # A previous run's probability map that was not reused makes way for this one.
                partial(self._remove_layer, probability_layer_name(region)),
                partial(self._finish_probability_layer, layer, region, result, run),
            ]
        steps.append(
            add_layer_in_turns(
                self,
                partial(
                    self._make_labels_layer,
                    result,
                    self._exam_name,
                    self._model,
                    self._scan_keys,
                    run,
                ),
                partial(setattr, self, "labels_layer"),
            )
        )
        # What the user sees over the scan now: the new map (the probability maps and the
        # earlier maps of this exam are a click away in the layer list).
        steps.append(partial(self._show_new_map, [*layers.values()]))
        # Its own turn: napari's notification toast and the listeners of ``segmented`` (the
        # measurement dock) would lengthen the labels layer's stall.
        steps.append(partial(self._announce, result, self._model))
        run_in_turns(steps, on_error=result_not_shown("Segment tumour", self.status))

    def _remove_layer(self, name: str) -> None:
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)

    def _finish_probability_layer(self, layer, region: str, result, run: str) -> None:
        layer.data = result.probabilities.array[list(REGIONS).index(region)]
        layer.name = probability_layer_name(region)
        layer.metadata.setdefault(META_KEY, {})["run"] = run

    def _show_new_map(self, probability_layers: list) -> None:
        """Hide the probability maps and the other label maps on the new map's grid (the
        expert's, earlier runs'), so the new map is what shows over the scan."""
        new = self.labels_layer
        if new is None:
            return
        grid = layer_volume(new)
        for layer in probability_layers:
            layer.visible = False
        for layer in self.viewer.layers:
            if (
                is_volume_layer(layer, "labels")
                and layer.visible
                and not same_layer(layer, new)
                and layer_volume(layer).same_grid(grid)
            ):
                layer.visible = False

    def _make_labels_layer(self, result, exam_name: str, model, scan_keys: dict, run: str):
        name = segmentation_name(model.label, exam_name)
        data, kwargs, _ = labels_layer_data(result.labels, name=name)
        # Remember what the model said, so edits (the user's corrections) can be told apart.
        kwargs["metadata"][META_KEY].update(
            model=model.label,
            model_labels=result.labels.array.copy(),
            sequences=list(result.used_sequences),
            # The scan layers it was made from (`layer_key`s): fine-tuning learns from these,
            # whatever the pickers show by then.
            scan_layers=dict(scan_keys),
            # The rules that made the map (the card's post-processing and the thresholds
            # used), so that new thresholds (Review dock) start from them and apply the rest.
            postprocess=result.postprocess,
            run=run,
        )
        # Always a new layer: napari appends " [1]" to a taken name, so an earlier (perhaps
        # edited) layer is never overwritten.
        return Layer.create(data, kwargs, "labels")

    def _announce(self, result, model) -> None:
        missing = list(result.missing_sequences)
        text = (
            f"done in {result.seconds:.1f} s with {model.label} on {result.device} "
            f"({result.precision}); "
            f"based on {', '.join(result.used_sequences)}"
        )
        if missing:
            text += f"; missing {', '.join(missing)} (filled as the model card says)"
        text += "".join(f"; {note}" for note in result.notes)
        text += "; the probability maps are hidden (their eyes in the layer list)"
        self.status.setText(text)
        show_info(f"Segmentation ready: {self.labels_layer.name}")
        for warning in result.warnings:
            if warning not in self.status.text():  # not said already, before the run
                notify(warning, "Segment tumour", "warning")
        if self._after_finetune is not None:
            self._show_changes(self._after_finetune, result.labels.array)
            self._after_finetune = None
        self.segmented.emit(self.labels_layer)

    def _case_name(self, layers: dict) -> str:
        for layer in layers.values():
            source = layer.metadata.get(META_KEY, {}).get("source_path")
            if source:
                return case_name(source)
        return "exam"
