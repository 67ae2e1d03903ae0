"""What a user sees while the plugin works: progress that moves inside a 3D window, Cancel that
says "cancelling..." until it has acted, buttons whose work runs off the main thread, and
messages that lead with the file's name and the problem."""

import numpy as np
import pytest

from napari_tumorseg._notify import problem_text
from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.postprocess import fill_holes
from napari_tumorseg.widgets.measure import default_save_path

from ..conftest import finished, open_dock


@pytest.fixture
def sample(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-tumorseg", "brats2018")
    dock = open_dock(viewer, "segment")
    dock.refresh_models(select=tiny_model)
    return viewer, dock


def test_the_dock_progress_bar_moves_inside_each_3d_window(sample, qtbot):
    viewer, dock = sample
    values = []
    dock.progress_bar.valueChanged.connect(values.append)
    with qtbot.waitSignal(dock.segmented, timeout=300_000):
        worker = dock.run()
        totals = []
        worker.yielded.connect(lambda item: totals.append(item[0].total))
    windows = max(totals)
    # Several moves per window (a convolution at a time), not one per window.
    assert len(set(values)) > 3 * windows
    assert values == sorted(values)
    assert dock.progress_bar.isHidden()  # shown while a job runs only


def test_cancel_says_cancelling_until_the_job_has_stopped(sample, qtbot):
    viewer, dock = sample
    names = [layer.name for layer in viewer.layers]
    seen = []

    def cancel_once(value):
        if value > 0 and not seen:
            dock.cancel_button.click()
            seen.append((dock.progress_bar.format(), dock.cancel_button.text()))

    dock.progress_bar.valueChanged.connect(cancel_once)
    worker = dock.run()
    with qtbot.waitSignal(worker.finished, timeout=300_000):
        pass
    assert seen == [("cancelling...", "Cancelling...")]
    qtbot.waitUntil(lambda: dock.cancel_button.text() == "Cancel", timeout=5000)
    assert "cancelled" in dock.status.text()
    assert [layer.name for layer in viewer.layers] == names


def test_review_buttons_work_off_the_main_thread(sample, qtbot):
    """Fill holes held the viewer for 3-4 s: the click returns at once, the dock says what
    runs, and the result arrives as one undoable edit."""
    viewer, dock = sample
    review = open_dock(viewer, "review")
    expert = viewer.layers[-1]
    review.layer_box.setCurrentText(expert.name)
    enhancing = np.argwhere(expert.data == 4)
    tumour = enhancing[len(enhancing) // 2]
    expert.data_setitem(tuple(np.array([i]) for i in tumour), 0)  # a hole in the tumour
    holes = int((fill_holes(expert.data) != expert.data).sum())
    review.holes_button.click()
    assert review.busy and review.status.text() == "Fill holes ..."
    assert not review.holes_button.isEnabled()  # no second click while it runs
    qtbot.waitUntil(lambda: not review.busy, timeout=60_000)
    assert review.status.text() == f"Fill holes: {holes} voxels changed"
    assert expert.data[tuple(tumour)] != 0 and review.holes_button.isEnabled()
    expert.undo()
    assert expert.data[tuple(tumour)] == 0


def test_evaluate_runs_off_the_main_thread_and_drops_scores_of_a_map_edited_meanwhile(
    sample, qtbot
):
    viewer, dock = sample
    measure = open_dock(viewer, "measure")
    expert = viewer.layers[-1]
    viewer.add_labels(expert.data.copy(), name="mine", metadata=expert.metadata)
    measure.layer_box.setCurrentText("mine")
    measure.reference_box.setCurrentText(expert.name)
    worker = measure.evaluate()
    assert measure.busy and measure.scores is None
    viewer.layers["mine"].data_setitem((np.array([80]), np.array([120]), np.array([120])), 2)
    finished(qtbot, measure, worker)
    assert measure.scores is None and "changed meanwhile" in measure.status.text()
    finished(qtbot, measure, measure.evaluate())
    assert measure.scores["WT"]["dice"] < 1.0


def test_messages_lead_with_the_file_name_and_the_problem(tmp_path):
    bad = tmp_path / "a long folder name" / "exam 12" / "case_flair.nii.gz"
    message, details = problem_text(TumorSegError("file is truncated", bad), "Open")
    assert message == "Open: case_flair.nii.gz: file is truncated"
    assert details == f"{bad}: file is truncated"  # the full path, one click away
    assert problem_text("no correction yet", "Fine-tune") == ("Fine-tune: no correction yet", None)


def test_a_bad_file_dropped_on_napari_is_named_first(make_napari_viewer, tmp_path, monkeypatch):
    import napari_tumorseg._reader as reader

    bad = tmp_path / "deep" / "folder" / "case_t1.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b not really gzip")
    shown = []
    monkeypatch.setattr(reader, "notify", lambda p, t=None, s="error": shown.append(p))
    viewer = make_napari_viewer()
    viewer.open(str(bad), plugin="napari-tumorseg")
    assert len(shown) == 1 and problem_text(shown[0])[0].startswith("case_t1.nii.gz: ")


def test_the_save_dialog_starts_in_the_exams_folder_with_a_name_without_spaces(sample):
    viewer, dock = sample
    expert = viewer.layers[-1]
    scan = viewer.layers["flair"].metadata["tumorseg"]["source_path"]
    path = default_save_path(expert)
    assert str(path.parent) == str(type(path)(scan).parent) and " " not in path.name
    made = viewer.add_labels(
        expert.data,
        name="3d seg Brats18",
        metadata={"tumorseg": {**expert.metadata["tumorseg"], "model": "mine@v2"}},
    )
    assert default_save_path(made).name == "Brats18_TCIA01_378_1_seg_mine@v2.nii.gz"


def test_a_dock_starts_the_warm_up_of_napari_imports_once(make_napari_viewer):
    import sys
    import threading

    from napari_tumorseg import _warmup

    viewer = make_napari_viewer()
    open_dock(viewer, "review")
    assert _warmup._started.is_set() and _warmup.warm_up_layers() is None  # once a session
    for thread in threading.enumerate():
        if thread.name == "tumorseg-warm-up":
            thread.join(timeout=60)
    assert all(name in sys.modules for name in _warmup.MODULES)


def test_the_units_registry_built_off_the_main_thread_is_given_to_pint_only_while_unbuilt():
    import pint
    from pint.registry import LazyRegistry

    from napari_tumorseg import _warmup

    wrapper = pint.get_application_registry()
    original = wrapper.get()
    try:
        wrapper.set(LazyRegistry())  # a session whose first layer is still to come
        _warmup._warm()
        built = _warmup._units
        assert built is not None
        assert _warmup.install_units()
        assert wrapper.get() is built and (1 * built.mm).to("m").magnitude == 0.001
        # Once pint's registry exists, units made from it may exist: it is never replaced.
        _warmup._warm()
        assert not _warmup.install_units() and wrapper.get() is built
    finally:
        wrapper.set(original)
