""" "Fine-tune on my corrections" in the Segment tumour dock."""

import hashlib

import numpy as np
import pytest

from napari_tumorseg.core.models import user_models_dir
from napari_tumorseg.core.refine import ITERATIONS

from ..conftest import BRATS, BRATS2023, open_dock


def _recorder(messages):
    """Stands in for `_notify.notify`: records the message a user would read."""
    from napari_tumorseg._notify import problem_text

    return lambda problem, title=None, severity="error": messages.append(
        problem_text(problem, title)[0]
    )


def _digest(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def corrected_dock(make_napari_viewer, tiny_model, qtbot, monkeypatch):
    # "keep" makes at least MIN_KEEP_STEPS steps whatever its budget: a few suffice here.
    monkeypatch.setattr("napari_tumorseg.core.finetune.MIN_KEEP_STEPS", 3)
    viewer = make_napari_viewer()
    viewer.open(str(BRATS), plugin="napari-tumorseg")
    widget = open_dock(viewer, "segment")
    widget.refresh_models(select=tiny_model)
    widget.run()
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        pass
    labels = widget.labels_layer
    expert = viewer.layers["Brats18_TCIA01_378_1 labels"].data
    # The user paints the expert labels on 3 axial slices through the tumour.
    for z in (70, 85, 100):
        idx = np.nonzero(np.ones(expert[z].shape, bool))
        labels.data_setitem((np.full(idx[0].shape, z), *idx), expert[z][idx])
    widget.ft_seconds.setValue(5)
    widget.ft_name.setText("mine")
    return viewer, widget, labels


def test_finetune_saves_selects_resegments_and_reverts(corrected_dock, qtbot):
    viewer, widget, labels = corrected_dock
    parent = widget.model.currentText()
    n_layers = len(viewer.layers)
    # The pickers move on (here: T1 unpicked); fine-tuning still learns from the scans the
    # segmentation was made from, and re-segments those.
    used = dict(labels.metadata["tumorseg"]["scan_layers"])
    assert set(used) == {"t1", "t1ce", "t2", "flair"}
    widget.pickers.boxes["t1"].setCurrentIndex(0)
    assert "t1" not in widget.pickers.selected_layers()
    # Fine-tuning, then the exam segmented again with the new model.
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        assert widget.finetune() is not None
    assert widget.model.currentText() == "mine@v1"
    assert widget._finetune_context["scan_layers"] == used
    assert widget.labels_layer.metadata["tumorseg"]["scan_layers"] == used
    assert len(widget.loss_curve.losses) >= 1
    assert widget.labels_layer is not labels
    assert len(viewer.layers) == n_layers + 1  # a new label map; the edited one stays
    assert "slices you did not correct, the new map keeps" in widget.changes.text()
    assert set(widget.last_changes["changes"]) == {"WT", "TC", "ET"}
    widget.revert_model()
    assert widget.model.currentText() == parent
    # The next fine-tune builds on the model reverted to, and learns from the map the user
    # selected: here the corrected one, not the newest (unedited) segmentation.
    viewer.layers.selection.active = labels
    worker = widget.finetune()
    assert worker is not None
    assert widget._finetune_context["parent"] == parent
    np.testing.assert_array_equal(widget._finetune_context["corrected"], labels.data)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        widget.cancel()


def test_scans_are_known_by_their_layers_not_their_names(corrected_dock, qtbot, monkeypatch):
    """A renamed scan is the same scan; another exam opened under the same layer names (t1,
    t1ce, ...) on the same grid is not the exam the corrections were drawn on."""
    import napari_tumorseg.widgets._finetune as finetune_module

    viewer, widget, labels = corrected_dock
    warnings = []
    monkeypatch.setattr(finetune_module, "notify", _recorder(warnings))
    viewer.layers["t1"].name = "T1 native"
    worker = widget.finetune()
    assert worker is not None, warnings
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        widget.cancel()
    for name in ("T1 native", "t1ce", "t2", "flair"):
        viewer.layers.remove(name)
    viewer.open(str(BRATS2023), plugin="napari-tumorseg")
    assert {"t1", "t1ce", "t2", "flair"} <= {layer.name for layer in viewer.layers}
    root = user_models_dir()
    before = _digest(root)
    viewer.layers.selection.active = labels
    assert widget.finetune() is None
    assert "no longer open" in warnings[-1]
    assert _digest(root) == before


def test_closing_the_dock_cancels_its_finetune(corrected_dock, qtbot):
    """Closed by its title bar's button, the dock is gone: its job stops, nothing is saved and
    no segmentation appears afterwards."""
    viewer, widget, labels = corrected_dock
    widget.ft_seconds.setValue(60)
    viewer.window.add_dock_widget(widget)
    root = user_models_dir()
    before = _digest(root)
    names = [layer.name for layer in viewer.layers]
    worker = widget.finetune()
    with qtbot.waitSignal(worker.yielded, timeout=120_000):
        pass
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        viewer.window.remove_dock_widget(widget)
    qtbot.wait(200)
    assert _digest(root) == before
    assert [layer.name for layer in viewer.layers] == names


def test_adapt_to_this_exam_fits_the_exam_head_and_resegments(corrected_dock, qtbot):
    viewer, widget, labels = corrected_dock
    widget.ft_mode.setCurrentIndex(1)  # adapt to this exam
    assert not widget.ft_seconds.isEnabled()  # the head takes seconds whatever the budget
    expert = viewer.layers["Brats18_TCIA01_378_1 labels"].data
    before = labels.metadata["tumorseg"]["model_labels"]
    shown = []
    widget.ft_progress.valueChanged.connect(lambda v: shown.append(widget.ft_progress.format()))
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        assert widget.finetune() is not None
    # Each stage before the head's iterations moves the bar, under its own name.
    assert any(t.startswith("segmenting with the parent model") for t in shown)
    assert sum(t.startswith("computing the exam's features") for t in shown) > 5
    assert widget.model.currentText() == "mine@v1"
    assert "exam head fitted on the corrections" in widget.status.text()
    assert len(widget.loss_curve.losses) >= 2
    assert widget.loss_curve.losses[-1] < widget.loss_curve.losses[0]
    assert widget.loss_curve.step == ITERATIONS  # the curve counts the head's iterations
    # The tiny network finds next to nothing; the head learns the tumour from 3 slices.
    other = np.ones(expert.shape[0], bool)
    other[[70, 85, 100]] = False

    def wt_dice(found):
        a, b = found[other] > 0, expert[other] > 0
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert wt_dice(widget.labels_layer.data) > wt_dice(before) + 0.2


def test_keep_counts_down_its_budget_before_the_first_step_ends(corrected_dock, qtbot, monkeypatch):
    """Seconds of preparing the corrections and a first step of many seconds (a busy machine,
    a 3D model) still move the bar."""
    import time

    from napari_tumorseg.core import finetune

    steps, prepare = finetune.train_steps, finetune.prepare_corrections

    def slow_first_step(*args, **kwargs):
        time.sleep(2.0)
        yield from steps(*args, **kwargs)

    def slow_preparation(*args, **kwargs):
        time.sleep(2.0)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_steps", slow_first_step)
    monkeypatch.setattr(finetune, "prepare_corrections", slow_preparation)
    viewer, widget, labels = corrected_dock
    widget.ft_seconds.setValue(20)
    before_first = []

    def record(value):
        if widget.loss_curve.step == 0:
            before_first.append((value, widget.ft_progress.format()))

    widget.ft_progress.valueChanged.connect(record)
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        assert widget.finetune() is not None
    preparing = [v for v, text in before_first if text.startswith("preparing the corrections,")]
    counted = [v for v, text in before_first if text.startswith("first step, about")]
    assert len(preparing) >= 2 and len(counted) >= 2
    # One countdown from the click on: no step back when the corrections are ready.
    assert preparing + counted == sorted(preparing + counted)


def test_the_countdown_keeps_moving_when_a_step_outlasts_its_estimate():
    """The last step estimated 50 s left and takes 20 s more: the bar (1000 steps) still moves
    at least every 2 s, and never reaches its end before the job does."""
    from napari_tumorseg.widgets._finetune import countdown_fraction
    from napari_tumorseg.widgets._runner import PROGRESS_STEPS

    shown = [round(PROGRESS_STEPS * countdown_fraction(t, 50.0)) for t in range(0, 72, 2)]
    assert all(b > a for a, b in zip(shown, shown[1:]))
    assert shown[-1] < PROGRESS_STEPS


def test_cancelled_finetune_changes_nothing(corrected_dock, qtbot):
    viewer, widget, labels = corrected_dock
    widget.ft_seconds.setValue(60)
    selected = widget.model.currentText()
    root = user_models_dir()
    before = _digest(root)
    names = [layer.name for layer in viewer.layers]
    data = labels.data.copy()
    worker = widget.finetune()
    # The model picker, opened meanwhile (its list is read again), keeps Segment disabled.
    widget.model.showPopup()
    widget.model.hidePopup()
    assert not widget.run_button.isEnabled()
    worker.yielded.connect(lambda progress: widget.cancel())
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert _digest(root) == before
    assert widget.model.currentText() == selected
    assert [layer.name for layer in viewer.layers] == names
    np.testing.assert_array_equal(labels.data, data)
    assert "cancelled" in widget.changes.text()


def test_finetune_without_corrections_is_refused(make_napari_viewer, tiny_model, qtbot):
    viewer = make_napari_viewer()
    viewer.open(str(BRATS), plugin="napari-tumorseg")
    widget = open_dock(viewer, "segment")
    assert widget.finetune() is None


def test_label_values_outside_the_brats_convention_are_refused_naming_the_layer(
    corrected_dock, qtbot
):
    """napari's "new label" button paints 5: fine-tuning would learn it as background."""
    viewer, widget, labels = corrected_dock
    root = user_models_dir()
    before = _digest(root)
    labels.data_setitem((np.array([85]), np.array([120]), np.array([120])), 5)
    warnings = []
    import napari_tumorseg.widgets._finetune as finetune_module

    original = finetune_module.notify
    finetune_module.notify = _recorder(warnings)
    try:
        assert widget.finetune() is None
    finally:
        finetune_module.notify = original
    assert len(warnings) == 1 and labels.name in warnings[0] and "values 5" in warnings[0]
    assert _digest(root) == before
