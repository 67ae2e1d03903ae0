"""The "Segment tumour" and "Review and correct" docks with a tiny model on the sample exam."""

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_tumorseg._layers import META_KEY
from napari_tumorseg.core.postprocess import remove_small_islands
from napari_tumorseg.widgets._segmentation import edited_voxels, probability_layer_name
from napari_tumorseg.widgets.review import UNCERTAINTY

from ..conftest import BRATS, TCGA_RAW, finished, open_dock

REGIONS = ("WT", "TC", "ET")


@pytest.fixture
def segment_dock(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    viewer.open(str(BRATS), plugin="napari-tumorseg")
    widget = open_dock(viewer, "segment")
    widget.refresh_models(select=tiny_model)
    assert widget.model.currentText() == tiny_model
    return viewer, widget


def test_segment_fills_probability_layers_and_adds_labels(segment_dock, qtbot):
    viewer, widget = segment_dock
    ticks = []
    timer = QTimer(interval=20)
    timer.timeout.connect(lambda: ticks.append(1))
    seen_running, seen_selected = [], []
    selected_before = viewer.layers.selection.active
    worker = widget.run()
    assert worker is not None
    worker.yielded.connect(
        lambda e: seen_running.append(
            [layer.name for layer in viewer.layers if "(running)" in layer.name]
        )
    )
    worker.yielded.connect(lambda e: seen_selected.append(viewer.layers.selection.active))
    timer.start()
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        pass
    timer.stop()
    # The probability layers existed while the windows were computed ...
    assert seen_running and len(seen_running[0]) == 3
    # ... and the viewer kept processing events (a stalled loop would not tick).
    assert len(ticks) >= 5
    for region in REGIONS:
        layer = viewer.layers[probability_layer_name(region)]
        assert layer.data.shape == (155, 240, 240) and layer.data.dtype == np.float32
        assert 0.0 <= layer.data.min() and layer.data.max() <= 1.0
    labels = widget.labels_layer
    assert labels.name == f"{widget.model.currentText()} seg Brats18_TCIA01_378_1"  # model first
    assert labels.data.shape == (155, 240, 240)
    assert set(np.unique(labels.data)) <= {0, 1, 2, 4}
    assert labels.metadata[META_KEY]["model"] == widget.model.currentText()
    assert not edited_voxels(labels).any()
    # The probability layers, added a part per event-loop turn, left the user's selection
    # alone; the label map, ready for editing, is selected, and its editing overlays (hidden
    # while it was added) are shown again with their visuals built, as a plain add makes them.
    assert seen_selected and set(seen_selected) == {selected_before}
    assert viewer.layers.selection.active is labels
    overlays = [labels._overlays[name] for name in ("polygon", "brush_stroke")]
    assert all(overlay.visible for overlay in overlays)
    visuals = viewer.window._qt_viewer.canvas._layer_overlay_to_visual[labels]
    assert all(overlay in visuals for overlay in overlays)
    # Same placement as the scans.
    np.testing.assert_allclose(labels.translate, viewer.layers["t1"].translate)

    # A second run never overwrites the first (maybe edited) label map; it refills the
    # probability layers (no new napari layer, the user's display settings stay) ...
    labels.data_setitem((np.array([80]), np.array([120]), np.array([120])), 4)
    edited_before = labels.data.copy()
    maps = {r: viewer.layers[probability_layer_name(r)] for r in REGIONS}
    maps["WT"].opacity = 0.3
    first_wt = maps["WT"].data.copy()
    n_layers = len(viewer.layers)
    worker = widget.run()
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        pass
    assert widget.labels_layer is not labels
    np.testing.assert_array_equal(labels.data, edited_before)
    assert len(viewer.layers) == n_layers + 1
    for region, layer in maps.items():
        assert viewer.layers[probability_layer_name(region)] is layer
    assert maps["WT"].opacity == 0.3
    np.testing.assert_allclose(maps["WT"].data, first_wt, atol=1e-6)  # same model, same map

    # ... and a cancelled run puts the refilled layers back as they were.
    names = [layer.name for layer in viewer.layers]
    second_wt = maps["WT"].data.copy()
    worker = widget.run()
    worker.yielded.connect(lambda e: widget.runner.cancel())
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert [layer.name for layer in viewer.layers] == names
    np.testing.assert_array_equal(viewer.layers[probability_layer_name("WT")].data, second_wt)


def test_cancel_leaves_layers_as_they_were(segment_dock, qtbot):
    viewer, widget = segment_dock
    names = [layer.name for layer in viewer.layers]
    worker = widget.run()
    worker.yielded.connect(lambda e: widget.runner.cancel())
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert [layer.name for layer in viewer.layers] == names
    assert "cancelled" in widget.status.text()


def test_review_thresholds_cleanup_and_uncertainty(segment_dock, qtbot):
    viewer, widget = segment_dock
    answers = []
    # The dock is open before the segmentation, on the expert labels ...
    review = open_dock(viewer, "review")
    review.confirm = lambda q: answers.append(q) or False
    expert = review.labels_layer
    assert expert is not None and expert.name.endswith("labels")
    expert_data = expert.data.copy()
    widget.run()
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        pass
    labels = widget.labels_layer
    # ... and turns to the new segmentation.
    assert review.labels_layer == labels
    # Thresholds never overwrite a map the model did not make (here: the expert labels).
    review.layer_box.setCurrentText(expert.name)
    assert review.apply_thresholds() is None and not answers
    np.testing.assert_array_equal(expert.data, expert_data)
    review.layer_box.setCurrentText(labels.name)

    # Thresholds on an unedited map apply without asking.
    review.sliders["WT"].setValue(5)
    finished(qtbot, review, review.apply_thresholds())
    assert not answers
    wt = (labels.data > 0).sum()
    expected = (
        (viewer.layers[probability_layer_name("WT")].data > 0.05)
        | (viewer.layers[probability_layer_name("TC")].data > 0.5)
        | (viewer.layers[probability_layer_name("ET")].data > 0.5)
    )
    assert wt == expected.sum()
    # Ctrl+Z brings the model's own map back: none of its voxels counts as a correction.
    labels.undo()
    assert (labels.data > 0).sum() != wt and not edited_voxels(labels).any()
    labels.redo()
    assert not edited_voxels(labels).any()
    # Erasing what the thresholds added is an edit, even where the model had said 0 too.
    model = labels.metadata[META_KEY]["model_labels"]
    spot = tuple(int(i[0]) for i in np.nonzero((labels.data > 0) & (model == 0)))
    labels.data_setitem(tuple(np.array([i]) for i in spot), 0)
    assert edited_voxels(labels)[spot]
    labels.undo()
    assert not edited_voxels(labels).any()
    # Thresholds are applied only with the probabilities of the run that made the map.
    run = labels.metadata[META_KEY]["run"]
    labels.metadata[META_KEY]["run"] = "another run"
    assert review.apply_thresholds() is None
    labels.metadata[META_KEY]["run"] = run

    # After a manual edit, thresholds ask first; "no" keeps the edit.
    labels.data_setitem((np.array([70]), np.array([100]), np.array([100])), 1)
    before = labels.data.copy()
    review.sliders["WT"].setValue(90)
    assert review.apply_thresholds() is None
    assert answers and "edited by hand" in answers[0]
    np.testing.assert_array_equal(labels.data, before)

    # Clean-up is one undoable step.
    labels.data_setitem((np.array([10]), np.array([10]), np.array([10])), 2)  # a stray voxel
    before = labels.data.copy()
    review.island_ml.setValue(0.5)
    finished(qtbot, review, review._remove_islands())
    assert review.status.text().startswith("Remove islands under 0.5 mL: ")
    np.testing.assert_array_equal(labels.data, remove_small_islands(before, 0.5, 0.001))
    assert labels.data[10, 10, 10] == 0
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)

    # Uncertainty layer and the next uncertain slice; a layer the user opened under that
    # name is neither refilled nor removed.
    mine = viewer.add_image(np.ones((4, 5, 6), np.float32), name=UNCERTAINTY)
    finished(qtbot, review, review.show_uncertainty())
    assert mine in viewer.layers and np.all(mine.data == 1)
    ours = viewer.layers[f"{UNCERTAINTY} [1]"]
    finished(qtbot, review, review.show_uncertainty())  # refreshed in place, not a third layer
    assert [layer.name for layer in viewer.layers if UNCERTAINTY in layer.name] == [
        UNCERTAINTY,
        ours.name,
    ]
    viewer.layers.remove(mine)
    assert UNCERTAINTY not in viewer.layers
    ours.name = UNCERTAINTY
    if review._slice_order:
        z = review.next_uncertain_slice()
        world = viewer.layers[UNCERTAINTY].data_to_world((z, 0, 0))
        assert viewer.dims.point[0] == pytest.approx(world[0])


def test_a_layer_added_in_turns_through_a_plugins_viewer_warns_nothing(make_napari_viewer, qtbot):
    """A plugin dock is given the viewer behind napari's PublicOnlyProxy, which warns on (and is
    to refuse) private access: adding a layer in turns must not touch napari's privates through
    it, and must end with the layer napari's own add makes."""
    import warnings

    from napari.layers import Labels
    from napari.utils._proxies import PublicOnlyProxy
    from qtpy.QtWidgets import QWidget

    from napari_tumorseg.widgets._runner import EDIT_OVERLAYS, add_layer_in_turns, run_in_turns

    viewer = make_napari_viewer()
    scan = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="scan")
    dock = QWidget()
    dock.viewer = PublicOnlyProxy(viewer)
    added, selected_when_added = [], []

    def on_added(layer):
        added.append(layer)
        selected_when_added.append(viewer.layers.selection.active)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        run_in_turns(
            [add_layer_in_turns(dock, lambda: Labels(np.zeros((4, 8, 8), np.uint8)), on_added)]
        )
        qtbot.waitUntil(
            lambda: bool(added) and viewer.layers.selection.active is added[0], timeout=5000
        )
    labels = added[0]
    assert labels in viewer.layers and selected_when_added == [scan]
    overlays = [labels._overlays[name] for name in EDIT_OVERLAYS]
    assert all(overlay.visible for overlay in overlays)
    visuals = viewer.window._qt_viewer.canvas._layer_overlay_to_visual[labels]
    assert all(overlay in visuals for overlay in overlays)


def test_a_failing_step_ends_the_sequence_and_reports_it(qtbot):
    from napari_tumorseg.widgets._runner import run_in_turns

    ran, errors = [], []

    def deleted():
        raise RuntimeError("wrapped C/C++ object of type QLabel has been deleted")

    run_in_turns(
        [lambda: ran.append(1), lambda: 1 / 0, lambda: ran.append(3)], on_error=errors.append
    )
    qtbot.waitUntil(lambda: bool(errors), timeout=2000)
    qtbot.wait(100)
    assert ran == [1] and isinstance(errors[0], ZeroDivisionError)
    # A dock closed meanwhile (its Qt objects deleted) ends the sequence quietly.
    run_in_turns([deleted, lambda: ran.append(4)], on_error=errors.append)
    qtbot.wait(150)
    assert ran == [1] and len(errors) == 1


def test_a_layer_that_fails_to_be_prepared_fails_the_run_and_frees_the_dock(segment_dock, qtbot):
    """A 2D layer holding a probability layer's name cannot be refilled: the run fails with a
    message instead of leaving the dock busy for ever (the worker never started)."""
    viewer, widget = segment_dock
    viewer.add_image(np.zeros((8, 8), np.float32), name=probability_layer_name("WT"))
    names = [layer.name for layer in viewer.layers]
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.runner.worker is None, timeout=10_000)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.status.text().startswith("failed")
    assert [layer.name for layer in viewer.layers] == names  # nothing left half-made


def test_the_label_map_leaves_a_selection_the_user_made_meanwhile(make_napari_viewer, qtbot):
    from napari.layers import Labels
    from qtpy.QtWidgets import QWidget

    from napari_tumorseg.widgets._runner import add_layer_in_turns, run_in_turns

    viewer = make_napari_viewer()
    scan = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="scan")
    other = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="other")
    viewer.layers.selection.active = scan
    dock = QWidget()
    dock.viewer = viewer
    added = []

    def on_added(layer):
        added.append(layer)
        viewer.layers.selection.active = other  # the user clicks another layer

    run_in_turns(
        [add_layer_in_turns(dock, lambda: Labels(np.zeros((4, 8, 8), np.uint8)), on_added)]
    )
    qtbot.waitUntil(lambda: bool(added), timeout=5000)
    qtbot.wait(200)
    assert viewer.layers.selection.active is other


def test_repaint_next_turn_holds_the_repaint_for_one_turn_even_on_error(qtbot):
    from qtpy.QtWidgets import QWidget

    from napari_tumorseg.widgets._runner import repaint_next_turn

    widget = QWidget()
    qtbot.addWidget(widget)
    with pytest.raises(ValueError), repaint_next_turn(widget):
        assert not widget.updatesEnabled()
        raise ValueError("a failed layer add")
    assert not widget.updatesEnabled()  # back on in the next turn, not in this one
    qtbot.waitUntil(widget.updatesEnabled, timeout=2000)


def test_a_runtime_error_in_a_job_is_reported_and_frees_the_runner(qtbot):
    """superqt swallows a RuntimeError (CUDA errors, torch's out-of-memory, SimpleITK): the
    runner must still report it and end the job, or the dock stays disabled."""
    from napari_tumorseg.widgets._runner import Runner

    states, failed = [], []
    runner = Runner("job", states.append)

    def job():
        yield 1
        raise RuntimeError("CUDA error: no kernel image is available")

    runner.start(
        job(),
        on_yield=lambda e: None,
        on_return=failed.append,
        on_fail=lambda: failed.append("failed"),
    )
    qtbot.waitUntil(lambda: not runner.running, timeout=5000)
    assert failed == ["failed"] and states == [True, False]


def test_a_cancel_after_the_jobs_last_step_still_delivers_its_result(qtbot):
    """Cancel pressed while the job finishes (e.g. saves a fine-tuned model): superqt then
    sends neither ``aborted`` nor ``returned``; the result must still reach the dock."""
    import threading

    from napari_tumorseg.widgets._runner import Runner

    finishing, proceed = threading.Event(), threading.Event()
    returned, cancelled = [], []
    runner = Runner("job", lambda running: None)

    def job():
        yield 1
        finishing.set()
        proceed.wait(5)
        return "saved"

    runner.start(
        job(),
        on_yield=lambda e: None,
        on_return=returned.append,
        on_cancel=lambda: cancelled.append(1),
    )
    qtbot.waitUntil(finishing.is_set, timeout=5000)
    runner.cancel()
    proceed.set()
    qtbot.waitUntil(lambda: not runner.running, timeout=5000)
    assert returned == ["saved"] and cancelled == []


def test_a_job_slows_the_windows_spinner_and_restores_it(qtbot):
    from qtpy.QtGui import QMovie
    from qtpy.QtWidgets import QLabel, QWidget

    from napari_tumorseg.widgets._runner import SPINNER_SPEED, Runner

    window = QWidget()
    qtbot.addWidget(window)
    movie = QMovie()
    QLabel(window).setMovie(movie)
    runner = Runner("job", lambda running: None, owner=QWidget(window))

    def job():
        yield 1
        return 2

    speeds = []
    worker = runner.start(job(), on_yield=lambda e: speeds.append(movie.speed()), on_return=print)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        pass
    assert speeds == [SPINNER_SPEED]
    assert movie.speed() == 100


def test_a_job_exempts_live_objects_from_collection_until_a_layer_is_removed(
    make_napari_viewer, qtbot, monkeypatch
):
    """Objects alive when a job starts are frozen (no full collection walks napari's heap
    during the job); removing a layer unfreezes them, no job freezes again before a full
    collection has run, and the removed layer is then collected."""
    import gc
    import weakref

    from qtpy.QtWidgets import QWidget

    from napari_tumorseg.widgets import _runner
    from napari_tumorseg.widgets._runner import Runner

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="old")
    owner = QWidget()
    owner.viewer = viewer
    qtbot.addWidget(owner)
    runner = Runner("job", lambda running: None, owner=owner)

    def run_job():
        def job():
            yield 1
            return 2

        worker = runner.start(job(), on_yield=lambda e: None, on_return=lambda r: None)
        frozen = gc.get_freeze_count()  # before anything else can unfreeze (see below)
        with qtbot.waitSignal(worker.finished, timeout=10_000):
            pass
        return frozen

    gc.unfreeze()
    gc.disable()  # no automatic collection in between: only the test's own
    monkeypatch.setattr(_runner, "_awaiting_collection", False)
    try:
        assert run_job() > 0  # the layer and napari's objects
        # (The end of any dock unfreezes too: earlier tests' docks may go while this one runs.)
        gone = weakref.ref(layer)
        viewer.layers.remove(layer)
        del layer
        assert gc.get_freeze_count() == 0
        # The removed layer may be garbage not yet collected: no freezing now.
        assert run_job() == 0
        gc.collect()
        assert gone() is None
        assert run_job() > 0  # a full collection has run since: jobs freeze again

        # Kept frozen, a removed layer would not be collected (what the unfreeze is for).
        stuck = viewer.add_image(np.zeros((4, 8, 8), np.float32), name="stuck")
        gc.freeze()
        stays = weakref.ref(stuck)
        viewer.layers.remove(stuck)
        del stuck
        gc.freeze()  # as if frozen again before any collection
        gc.collect()
        assert stays() is not None
        gc.unfreeze()
        gc.collect()
        assert stays() is None
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_job_without_a_viewer_freezes_nothing(qtbot, monkeypatch):
    """Nothing would ever unfreeze it."""
    import gc

    from qtpy.QtWidgets import QWidget

    from napari_tumorseg.widgets import _runner
    from napari_tumorseg.widgets._runner import Runner

    gc.unfreeze()
    monkeypatch.setattr(_runner, "_awaiting_collection", False)
    owner = QWidget()
    qtbot.addWidget(owner)
    runner = Runner("job", lambda running: None, owner=owner)

    def job():
        yield 1
        return 2

    worker = runner.start(job(), on_yield=lambda e: None, on_return=lambda r: None)
    assert gc.get_freeze_count() == 0
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        pass


def test_the_end_of_a_dock_unfreezes(qtbot):
    """A napari window closed by its button keeps its layers (no ``removed`` event); its docks
    are destroyed, and that unfreezes what their jobs froze."""
    import gc

    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication, QWidget

    from napari_tumorseg.widgets._runner import Runner

    owner = QWidget()
    Runner("job", lambda running: None, owner=owner)
    # Widgets of earlier tests waiting to be deleted would unfreeze too: let them go first.
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    try:
        gc.freeze()  # as a job of this dock does
        assert gc.get_freeze_count() > 0
        owner.deleteLater()
        QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_thresholds_stay_the_baseline_without_an_edit_history(monkeypatch):
    """A napari without the private undo history we read (it may go in napari 0.10): applied
    thresholds count as the baseline, and later strokes as the corrections."""
    from napari.layers import Labels

    from napari_tumorseg.widgets import _segmentation
    from napari_tumorseg.widgets._segmentation import apply_labels, record_thresholds

    monkeypatch.setattr(_segmentation, "edit_history", lambda layer, redo=False: None)
    model = np.zeros((4, 10, 10), np.uint8)
    model[1:3, 2:6, 2:6] = 2
    thresholds = model.copy()
    thresholds[1:3, 6:9, 2:6] = 2
    layer = Labels(model.copy(), metadata={META_KEY: {"model_labels": model.copy()}})
    assert apply_labels(layer, thresholds) > 0
    record_thresholds(layer, thresholds)
    assert not edited_voxels(layer).any()
    layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 1)  # a stroke
    edited = edited_voxels(layer)
    assert edited.sum() == 1 and edited[0, 0, 0]


def test_edits_after_undone_thresholds_count_against_the_models_map():
    """Thresholds applied, undone, then new strokes: the thresholds are not in force, so only
    the strokes are corrections (counting edits by history depth took the undone thresholds
    back as the baseline once the strokes refilled that depth)."""
    from napari.layers import Labels

    from napari_tumorseg.widgets._segmentation import apply_labels, record_thresholds

    model = np.zeros((4, 10, 10), np.uint8)
    model[1:3, 2:6, 2:6] = 2
    layer = Labels(model.copy(), metadata={META_KEY: {"model_labels": model.copy()}})
    thresholds = model.copy()
    thresholds[1:3, 6:9, 2:6] = 2  # the thresholds add oedema
    assert apply_labels(layer, thresholds) > 0
    record_thresholds(layer, thresholds)
    assert not edited_voxels(layer).any()
    layer.undo()
    assert not edited_voxels(layer).any()  # the model's own map again
    layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), 1)  # a stroke
    edited = edited_voxels(layer)
    assert edited.sum() == 1 and edited[0, 0, 0]
    layer.undo()
    layer.redo()
    assert edited_voxels(layer).sum() == 1
    # Applied again and redone after an undo: in force.
    assert apply_labels(layer, thresholds) > 0
    record_thresholds(layer, thresholds)
    layer.undo()
    layer.redo()
    assert not edited_voxels(layer).any()


def test_review_sliders_start_from_the_thresholds_that_made_the_map(make_napari_viewer):
    """A model card may cut a region above 0.5 (the bundled models' tumour core): the Review
    dock shows the thresholds of the map it is on, so "Apply thresholds" starts there."""
    from napari_tumorseg.widgets._segmentation import apply_labels, record_thresholds

    viewer = make_napari_viewer()
    data = np.zeros((4, 8, 8), np.uint8)
    metadata = {META_KEY: {"model_labels": data, "postprocess": {"thresholds": [0.5, 0.7, 0.6]}}}
    made = viewer.add_labels(data.copy(), name="segmentation", metadata=metadata)
    # A dock opened after the segmentation shows its thresholds at once.
    review = open_dock(viewer, "review")
    assert review.labels_layer == made and review.thresholds() == (0.5, 0.7, 0.6)
    other = viewer.add_labels(data.copy(), name="expert labels")
    review.layer_box.setCurrentText(other.name)
    review.sliders["TC"].setValue(40)
    # A map no model made leaves the sliders alone; a new segmentation shows its own.
    assert review.thresholds() == (0.5, 0.4, 0.6)
    old = {META_KEY: {"model_labels": data}}  # made at 0.5 (no thresholds recorded)
    older = viewer.add_labels(data.copy(), name="older segmentation", metadata=old)
    assert review.labels_layer == older and review.thresholds() == (0.5, 0.5, 0.5)
    # Removing the layer the dock is on: the sliders follow the map it turns to.
    review.layer_box.setCurrentText(made.name)
    assert review.thresholds() == (0.5, 0.7, 0.6)
    viewer.layers.remove(made)
    assert review.labels_layer != made
    viewer.layers.remove(other)
    assert review.labels_layer == older and review.thresholds() == (0.5, 0.5, 0.5)
    # Thresholds applied (and in force) are what the sliders show when the map is chosen
    # again; undone with Ctrl+Z, the segmentation's own are.
    new = data.copy()
    new[1, 2, 2] = 2
    apply_labels(older, new)
    record_thresholds(older, new, (0.3, 0.55, 0.5))
    viewer.add_labels(data.copy(), name="expert labels")
    review.layer_box.setCurrentText("expert labels")
    review.layer_box.setCurrentText(older.name)
    assert review.thresholds() == (0.3, 0.55, 0.5)
    older.undo()
    review.layer_box.setCurrentText("expert labels")
    review.layer_box.setCurrentText(older.name)
    assert review.thresholds() == (0.5, 0.5, 0.5)


def test_review_dock_opened_after_a_card_threshold_segmentation_applies_nothing_new(
    segment_dock, tiny_model, qtbot
):
    """End to end: a model whose card cuts tumour core at 0.7; the Review dock opened after
    the segmentation starts from 0.7, and applying its thresholds at once changes nothing."""
    import json

    from napari_tumorseg.core.models import model_folder

    viewer, widget = segment_dock
    card_path = model_folder(tiny_model) / "card.json"  # the model loads when Run is pressed
    card = json.loads(card_path.read_text())
    card["postprocess"] = {"thresholds": [0.5, 0.7, 0.5]}
    card_path.write_text(json.dumps(card))
    widget.run()
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        pass
    labels = widget.labels_layer
    assert labels.metadata[META_KEY]["postprocess"]["thresholds"] == [0.5, 0.7, 0.5]
    review = open_dock(viewer, "review")
    assert review.labels_layer == labels and review.thresholds() == (0.5, 0.7, 0.5)
    before = labels.data.copy()
    finished(qtbot, review, review.apply_thresholds())
    assert review.status.text().endswith(": 0 voxels changed")
    np.testing.assert_array_equal(labels.data, before)


def test_review_follows_a_renamed_map_and_its_own_uncertainty_layer(make_napari_viewer, qtbot):
    """A renamed map stays the one the dock acts on; "Next uncertain slice" finds the dock's
    own uncertainty map whatever it is called (it raised KeyError once renamed, and moved
    by a user's layer named "uncertainty" instead)."""
    from napari.layers import Layer

    from napari_tumorseg._layers import probability_layer_data
    from napari_tumorseg.core.volume import Volume
    from napari_tumorseg.widgets._segmentation import probability_layer_name
    from napari_tumorseg.widgets.review import UNCERTAINTY

    viewer = make_napari_viewer()
    shape = (12, 16, 16)
    volume = Volume(np.zeros(shape, np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    z = np.arange(shape[0], dtype=np.float32)[:, None, None]
    for index, region in enumerate(("WT", "TC", "ET")):
        p = np.broadcast_to(np.clip(z / shape[0] - 0.1 * index, 0, 1), shape).copy()
        data, kwargs, kind = probability_layer_data(
            volume.with_array(p, name=region), probability_layer_name(region)
        )
        viewer.add_layer(Layer.create(data, kwargs, kind))
    labels = np.zeros(shape, np.uint8)
    labels[5, 8, 8] = 2  # a stray voxel
    made = viewer.add_labels(
        labels.copy(), name="segmentation", metadata={META_KEY: {"model_labels": labels}}
    )
    review = open_dock(viewer, "review")
    review.confirm = lambda question: True
    made.name = "my map"
    assert review.layer_box.currentText() == "my map" and review.labels_layer == made
    review.island_ml.setValue(1.0)
    finished(qtbot, review, review._remove_islands())
    assert review.status.text().endswith(": 1 voxels changed") and made.data.max() == 0
    viewer.add_image(np.zeros((3, 4, 4), np.float32), name=UNCERTAINTY, translate=(40, 0, 0))
    review.uncertainty_button.click()  # the button, whose clicked(bool) the method must not take
    qtbot.waitUntil(lambda: not review.busy, timeout=60_000)
    ours = review._uncertainty_layer()
    assert ours.name != UNCERTAINTY
    ours.name = "uncertainty (exam 1)"
    slice_z = review.next_uncertain_slice()
    assert viewer.dims.point[0] == pytest.approx(2.0 * slice_z)


def test_a_3_painted_over_the_models_4_is_no_correction():
    from napari.layers import Labels

    model = np.zeros((2, 4, 4), np.uint8)
    model[0, 1:3, 1:3] = 4
    data = model.copy()
    data[0, 1, 1] = 3  # the spinner's 3: enhancing tumour, as the model had it
    data[1, 0, 0] = 2  # a real correction
    layer = Labels(data, metadata={META_KEY: {"model_labels": model}})
    assert np.argwhere(edited_voxels(layer)).tolist() == [[1, 0, 0]]


def test_a_segmentation_is_not_an_open_label_map_file(make_napari_viewer):
    """A segmentation carries its scan's source (the geometry it is saved in): reopening that
    scan once closed is no "second copy" of a label map."""
    from napari.layers import Layer

    from napari_tumorseg._layers import labels_layer_data
    from napari_tumorseg._reader import open_volumes
    from napari_tumorseg.core.io import read_volume

    viewer = make_napari_viewer()
    t1 = next(BRATS.glob("*_t1.nii.gz"))
    scan = read_volume(t1)
    segmentation = scan.with_array(np.zeros(scan.spatial_shape, np.uint8), name="labels")
    viewer.add_layer(Layer.create(*labels_layer_data(segmentation, name="segmentation")))
    assert open_volumes() == ([], [])
    viewer.open(str(next(BRATS.glob("*_seg.nii.gz"))), plugin="napari-tumorseg")
    assert len(open_volumes()[1]) == 1


def test_brain_extraction_is_offered_before_the_run_and_masks_the_map(
    make_napari_viewer, tiny_model, qtbot
):
    from napari_tumorseg.core import brain

    viewer = make_napari_viewer()
    widget = open_dock(viewer, "segment")
    widget.refresh_models(select=tiny_model)
    viewer.open(str(BRATS), plugin="napari-tumorseg")
    assert not widget.brain.isVisibleTo(widget)  # a skull-stripped exam: nothing to offer
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    # The raw exam's post-contrast T1 alone: one grid, the skull on.
    viewer.open(str(TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"), plugin="napari-tumorseg")
    assert widget.brain.isVisibleTo(widget) and "skull" in widget.brain_note.text()
    if not brain.available():
        assert not widget.brain.isEnabled() and "pip install" in widget.brain_note.text()
        return
    assert widget.brain.isEnabled() and widget.brain.isChecked()
    widget.brain.setChecked(False)
    viewer.add_image(np.zeros((2, 2, 2)), name="unrelated")  # the user's choice stays
    assert not widget.brain.isChecked()
    widget.brain.setChecked(True)
    steps = []
    worker = widget.run()
    worker.yielded.connect(lambda item: steps.append(type(item[0]).__name__))
    with qtbot.waitSignal(widget.segmented, timeout=300_000):
        pass
    assert steps[0] == "BrainProgress" and steps[-1] != "BrainProgress"
    mask = widget.brain_result.mask.array.astype(bool)
    assert 900 < widget.brain_result.volume_ml < 2000
    labels = np.asarray(widget.labels_layer.data)
    assert labels.shape == mask.shape and not labels[~mask].any()
