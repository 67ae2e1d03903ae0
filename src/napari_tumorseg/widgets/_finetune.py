"""The "Fine-tune on my corrections" section of the Segment tumour dock: the model learns
from the user's corrections of its map ("keep for next exams": a new network version;
"adapt to this exam": an exam head), with a bar that moves through every stage, the loss
curve, a summary of what changed, and Revert."""

from __future__ import annotations

import math
import time

import numpy as np
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
)

from .._layers import META_KEY, layer_key, painted_labels
from .._notify import notify
from ..core.errors import TumorSegError
from ..core.finetune import change_summary, finetune_and_save
from ..core.inference import check_one_grid
from ..core.io import Exam
from ..core.models import load_model
from ._layout import Section
from ._loss_curve import LossCurve
from ._pickers import volumes_of
from ._runner import PROGRESS_STEPS, Runner
from ._segmentation import edited_voxels, model_output

#: The share of the countdown's estimate after which the bar slows down (`_count_down`), and
#: how fast it still moves past the estimate's end (seconds of an exponential approach).
SLOWING = 0.95
OVERRUN_S = 10.0
#: What each fine-tuning mode does, in a line (shown under the mode picker).
MODE_HELP = {
    "keep": "trains the network on your corrections within the budget; the new version "
    "serves the next exams too",
    "adapt": "fits a small head on the slices you corrected, in seconds; it applies to "
    "this exam only",
}


def countdown_fraction(now: float, total: float) -> float:
    """The share of a fine-tune done after ``now`` of an estimated ``total`` seconds. Past
    `SLOWING` of the estimate (a step slower than the ones before) the bar slows down towards
    the end instead of stopping there, so that it still says "working"."""
    done = now / total
    if done <= SLOWING:
        return done
    over = now - SLOWING * total
    return 0.999 - (0.999 - SLOWING) * math.exp(-over / OVERRUN_S)


class FinetuneSection:
    """The fine-tuning half of `segment.SegmentWidget` (a mixin: it reads the dock's viewer,
    model picker, run settings and latest segmentation, and re-segments with the new model
    through the dock's ``run``)."""

    def _build_finetune_section(self, form) -> None:
        self.tuning = Section("Fine-tune on my corrections", expanded=True)
        tune = self.tuning.form
        self.ft_mode = QComboBox()
        self.ft_mode.addItems(["keep for next exams", "adapt to this exam"])
        self.ft_help = QLabel(MODE_HELP["keep"])
        self.ft_help.setWordWrap(True)
        self.ft_seconds = QSpinBox(minimum=5, maximum=3600, value=60)
        self.ft_seconds.setSuffix(" s")
        self.ft_name = QLineEdit("my-model")
        self.finetune_button = QPushButton("Fine-tune on my corrections")
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Select the model used before the last fine-tuning")
        self.revert_button.setEnabled(False)
        self.ft_progress = QProgressBar()
        self.loss_curve = LossCurve()
        self.changes = QLabel("")
        self.changes.setWordWrap(True)
        tune.addRow("Mode", self.ft_mode)
        tune.addRow(self.ft_help)
        tune.addRow("Budget", self.ft_seconds)
        # "adapt" fits the exam head in seconds whatever the budget (`core.refine`).
        self.ft_mode.currentIndexChanged.connect(self._mode_changed)
        tune.addRow("Save as", self.ft_name)
        row = QHBoxLayout()
        row.addWidget(self.finetune_button, 3)
        row.addWidget(self.revert_button, 1)
        tune.addRow(row)
        tune.addRow(self.ft_progress)
        tune.addRow(self.loss_curve)
        tune.addRow(self.changes)
        form.addRow(self.tuning)

        self.tuner = Runner("Fine-tuning", self._set_running, owner=self, bar=self.ft_progress)
        self._previous_model: str | None = None
        self._after_finetune: dict | None = None
        # A "keep" step takes 1-16 s on 2 cores: between steps the bar counts the time left
        # down from the last step's estimate (`_count_down`), so it moves all the same.
        self._estimate: tuple | None = None
        self._job_started = 0.0
        self._countdown = QTimer(self, interval=500)
        self._countdown.timeout.connect(self._count_down)
        self.finetune_button.clicked.connect(self.finetune)
        self.revert_button.clicked.connect(self.revert_model)

    def _mode_changed(self, index: int) -> None:
        self.ft_seconds.setEnabled(index == 0)
        self.ft_help.setText(MODE_HELP["keep" if index == 0 else "adapt"])

    def finetune(self):
        """Fine-tune the model on the edits of the current segmentation; returns the worker."""
        layer = self._corrected_layer()
        if layer is None:
            notify("segment the exam first, then correct the label map", "Fine-tune", "warning")
            return None
        edited = edited_voxels(layer)
        if edited is None or not edited.any():
            notify(
                "no correction yet: edit the label map with napari's tools",
                "Fine-tune",
                "warning",
            )
            return None
        meta = layer.metadata.get(META_KEY, {})
        try:
            # The model the picker shows (after "Revert", the one reverted to), which may not
            # be the one that made the map: the corrected labels are what it learns.
            model = load_model(self.model.currentText())
            scans = self._scan_layers(meta.get("scan_layers"))
            exam = Exam(scans=volumes_of(scans), name=self._case_name(scans))
            check_one_grid(exam)  # same grid check as for segmenting
            # Values outside the BraTS convention (napari's "new label" button paints 5, 6,
            # ...) would be learnt as background: refused, naming the layer; 3 is read as 4.
            corrected = painted_labels(layer.data, layer.name)
        except TumorSegError as exc:
            notify(exc, "Fine-tune", "warning")
            return None
        mode = "keep" if self.ft_mode.currentIndex() == 0 else "adapt"
        self._finetune_context = {
            "before": np.array(model_output(layer), copy=True),
            "corrected": corrected,
            "edited": edited,
            "spacing": exam.reference.spacing,
            "parent": model.label,
            "scan_layers": {seq: layer_key(scan) for seq, scan in scans.items()},
        }
        self.loss_curve.clear()
        made_by = meta.get("model")
        self.changes.setText(
            f"fine-tuning {model.label} on {int(edited.sum())} corrected voxels of "
            f"{layer.name!r}"
            + (f" (a map made by {made_by})" if made_by and made_by != model.label else "")
        )
        generator = finetune_and_save(
            model,
            exam,
            corrected,
            edited,
            name=self.ft_name.text().strip(),
            mode=mode,
            seconds=float(self.ft_seconds.value()),
            # As the re-segmentation after it will run ("adapt" fits its head on this output).
            device=self.device.currentText(),
            overlap=self.overlap.value(),
            tta=self.tta.isChecked(),
        )
        worker = self.tuner.start(
            generator,
            on_yield=self._on_finetune_step,
            on_return=self._on_finetuned,
            on_cancel=lambda: self.changes.setText(
                "fine-tuning cancelled: the previous model stays selected, nothing was saved"
            ),
            on_fail=lambda: self.changes.setText("fine-tuning failed: nothing was saved"),
        )
        self._job_started = time.perf_counter()
        if worker is not None and mode == "keep":
            # Counted down against the budget from the click: preparing the corrections takes
            # seconds before the first event (2.7 s without a move, bench_viewer).
            budget = float(self.ft_seconds.value())
            self._estimate = (self._job_started, 0.0, budget, "preparing the corrections")
            self._count_down()
            self._countdown.start()
        return worker

    def _corrected_layer(self):
        """The label map to learn from: the selected layer when it is a segmentation of this
        plugin (the user may have corrected an earlier one), else the latest segmentation."""
        selected = self.viewer.layers.selection.active
        if selected is not None and "model_labels" in selected.metadata.get(META_KEY, {}):
            return selected
        layer = self.labels_layer
        return layer if layer is not None and layer in self.viewer.layers else None

    def _on_finetune_step(self, progress) -> None:
        if progress.loss is None:
            if progress.fraction is not None:  # "adapt": the parent segments the exam first
                text = {"features": "computing the exam's features"}.get(
                    progress.stage, "segmenting with the parent model"
                )
                done = round(PROGRESS_STEPS * progress.fraction)
                self.tuner.set_progress(done, PROGRESS_STEPS, text=text)
            elif progress.seconds:  # "keep": counted down against the budget since the click
                self._estimate = (self._job_started, 0.0, progress.seconds, "first step")
                self._count_down()
                self._countdown.start()
            else:
                self.tuner.set_progress(0, PROGRESS_STEPS, text="preparing the corrections")
            return
        self.loss_curve.add(progress.loss, progress.step)
        if progress.seconds is None:  # the exam head: its iterations
            done = progress.step / progress.steps if progress.steps else 0.0
            text = f"iteration {progress.step}/{progress.steps}"
            self.tuner.set_progress(round(PROGRESS_STEPS * done), PROGRESS_STEPS, text=text)
            return
        text = f"step {progress.step}"
        if progress.step < progress.min_steps and progress.elapsed >= progress.seconds:
            # The budget is spent before the fewest steps that teach anything: said, and the
            # run goes on to them.
            text += f" of at least {progress.min_steps} (past the {progress.seconds:.0f} s)"
        left = progress.remaining_seconds() or 0.0
        now = time.perf_counter()
        self._estimate = (now, now - self._job_started, left, text)  # the job's time, all of it
        self._count_down()
        if not self._countdown.isActive():
            self._countdown.start()

    def _count_down(self) -> None:
        """Move the fine-tuning bar by the time spent since the last step, against the time
        that step estimated was left."""
        if self._estimate is None or self.tuner.cancelling:
            return
        since, elapsed, left, text = self._estimate
        now = elapsed + time.perf_counter() - since
        total = max(elapsed + left, 1e-6)
        done = countdown_fraction(now, total)
        text += f", about {max(total - now, 0.0):.0f} s left"
        self.tuner.set_progress(round(PROGRESS_STEPS * done), PROGRESS_STEPS, text=text)

    def _on_finetuned(self, outcome) -> None:
        folder, result = outcome
        label = f"{folder.parent.name}@{folder.name}"
        self._previous_model = self._finetune_context["parent"]
        self.refresh_models(select=label)
        self.revert_button.setEnabled(True)
        self.changes.setText(
            f"saved {label} ({result.steps} steps, {result.seconds:.0f} s); re-segmenting ..."
        )
        show_info(f"Fine-tuned model saved as {label}")
        self._after_finetune = self._finetune_context
        self.run(scan_layers=self._finetune_context["scan_layers"])

    def _show_changes(self, context: dict, new_labels: np.ndarray) -> None:
        summary = change_summary(
            context["before"],
            new_labels,
            context["corrected"],
            context["edited"],
            context["spacing"],
        )
        self.last_changes = summary
        lines = [
            "voxels added / removed: "
            + ", ".join(
                f"{region} +{c['added']} / -{c['removed']}"
                for region, c in summary["changes"].items()
            )
        ]
        if "dice_after" in summary:
            # On the slices the user left alone the old map is their map: how much of it the
            # new model keeps there. Read as "Dice vs your labels" it looked like a failure
            # (0.74) while the map had improved against the expert (0.72 -> 0.93).
            lines.append(
                f"on the {summary['uncorrected_slices']} slices you did not correct, the new "
                "map keeps "
                + ", ".join(f"{r} {d:.0%}" for r, d in summary["dice_after"].items())
                + " of the old one (Dice): check those slices; Tumour volumes > Evaluate "
                "scores it against a reference"
            )
        self.changes.setText("\n".join(lines))

    def revert_model(self) -> None:
        """Select the model that was used before the last fine-tuning (one click)."""
        if self._previous_model is not None:
            self.refresh_models(select=self._previous_model)
            if self.model.currentText() == self._previous_model:
                self.changes.setText(f"reverted to {self._previous_model}")
            else:
                self.changes.setText(
                    f"{self._previous_model} is no longer installed: pick a model above"
                )
                notify(
                    f"{self._previous_model} is no longer installed", "Segment tumour", "warning"
                )
            self.revert_button.setEnabled(False)
