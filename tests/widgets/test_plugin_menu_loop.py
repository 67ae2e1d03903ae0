"""The radiologist's loop as a user meets it: docks from the Plugins menu, the sample from File >
Open Sample, corrections painted with napari's own tools, both fine-tuning modes, Revert, Save.

napari hands a plugin dock a `PublicOnlyProxy` of the viewer and of every layer it reaches, made
afresh at each access; tests that built the docks directly hid a fine-tune that was always
refused ("the scans ... are no longer open").
"""

import numpy as np
import pytest
from qtpy.QtWidgets import QPushButton, QTableWidget

from napari_tumorseg._layers import META_KEY
from napari_tumorseg.core.models import user_models_dir
from napari_tumorseg.widgets._segmentation import probability_layer_name

from ..conftest import DOCKS, finished, open_dock

CASE = "Brats18_TCIA01_378_1"
#: The axial slices the user corrects (through the tumour).
SLICES = (70, 85, 100)


@pytest.fixture
def loop(make_napari_viewer, tiny_model, monkeypatch):
    # "keep" makes at least MIN_KEEP_STEPS steps whatever its budget: a few suffice here.
    monkeypatch.setattr("napari_tumorseg.core.finetune.MIN_KEEP_STEPS", 3)
    viewer = make_napari_viewer()
    viewer.open_sample("napari-tumorseg", "brats2018")
    docks = {which: open_dock(viewer, which) for which in DOCKS}
    docks["segment"].refresh_models(select=tiny_model)
    return viewer, docks


def _segment(qtbot, dock, start):
    with qtbot.waitSignal(dock.segmented, timeout=300_000):
        assert start() is not None
    return dock.labels_layer


def _correct(viewer, labels):
    """Paint the expert's labels on three axial slices with napari's own tools: a brush
    stroke, a fill, and `data_setitem` (what both use) for the rest of each slice."""
    expert = viewer.layers[f"{CASE} labels"].data
    z0 = SLICES[0]
    core = np.argwhere(expert[z0] > 0)[0]
    labels.selected_label = int(expert[z0][tuple(core)])
    labels.brush_size = 3
    labels.paint((z0, *core), labels.selected_label)
    labels.fill((z0, 5, 5), 0)  # the background around the brain, left as it is
    for z in SLICES:
        idx = np.nonzero(expert[z] != labels.data[z])
        labels.data_setitem((np.full(idx[0].shape, z), *idx), expert[z][idx])
    return expert


def test_the_whole_loop_through_the_plugins_menu(loop, qtbot, tmp_path):
    viewer, docks = loop
    segment, review, measure = docks["segment"], docks["review"], docks["measure"]
    parent = segment.model.currentText()
    expert_layer = viewer.layers[f"{CASE} labels"]
    assert measure.layer_box.currentText() == expert_layer.name  # the only map, before a run

    # Segment: a labels layer named after its model, which every dock turns to, and what
    # the user sees over the scan (the maps one click away, the expert's map hidden).
    labels = _segment(qtbot, segment, segment.run)
    assert labels.name.startswith(f"{parent} seg ")
    assert review.layer_box.currentText() == labels.name
    assert measure.layer_box.currentText() == labels.name
    assert labels.visible and not expert_layer.visible
    assert not any(viewer.layers[probability_layer_name(r)].visible for r in ("WT", "TC", "ET"))

    # Corrections with napari's tools; then "keep for next exams".
    expert = _correct(viewer, labels)
    segment.ft_name.setText("mine")
    segment.ft_seconds.setValue(5)
    kept = _segment(qtbot, segment, segment.finetune)
    assert segment.model.currentText() == "mine@v1"
    assert (user_models_dir() / "mine" / "v1" / "model.safetensors").is_file()
    assert kept.name.startswith("mine@v1 seg ") and kept != labels
    assert len(segment.loss_curve.losses) >= 3
    assert "voxels added / removed" in segment.changes.text()
    assert measure.layer_box.currentText() == kept.name  # the volumes follow the new map
    assert kept.visible and not labels.visible

    # "adapt to this exam", from the corrected map (selected), on the model the picker shows.
    viewer.layers.selection.active = labels
    segment.ft_mode.setCurrentIndex(1)
    adapted = _segment(qtbot, segment, segment.finetune)
    assert segment.model.currentText() == "mine@v2"
    assert segment._finetune_context["parent"] == "mine@v1"
    # The dock says what the picked version learnt from: this exam twice, its slices.
    slices = ", ".join(str(z) for z in SLICES)
    assert segment.model_info.text() == (
        f"{parent} fine-tuned on 1 exam: {CASE} (keep, slices {slices}); "
        f"{CASE} (adapt, slices {slices})"
    )
    assert "exam head fitted on the corrections" in segment.status.text()
    other = np.ones(expert.shape[0], bool)
    other[list(SLICES)] = False

    def wt_dice(found):
        a, b = found[other] > 0, expert[other] > 0
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    # The tiny network finds next to nothing; the head learns the tumour from 3 slices.
    assert wt_dice(adapted.data) > wt_dice(labels.metadata[META_KEY]["model_labels"]) + 0.2

    # Revert is one click; Evaluate and Save act on the newest map.
    segment.revert_button.click()
    assert segment.model.currentText() == "mine@v1"
    measure.reference_box.setCurrentText(expert_layer.name)
    finished(qtbot, measure, measure.evaluate())
    assert measure.scores["WT"]["dice"] == pytest.approx(wt_dice_all(adapted.data, expert))
    with qtbot.waitSignal(measure.saved, timeout=60_000) as blocker:
        measure.save(tmp_path / "mask.nii.gz")
    written = blocker.args[0]
    assert [p.name for p in written] == ["mask.nii.gz", "mask_report.json", "mask_report.csv"]


def wt_dice_all(found, expert):
    a, b = found > 0, expert > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_every_dock_open_fits_a_1920_x_1080_screen(make_napari_viewer, qtbot):
    """All four docks open at once: the window's minimum height leaves room for a screen's
    title bar and task bar (it needed 1759 px), and the buttons at the bottom of each dock
    are reachable (in view or by its own scroll bar, not off the screen)."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-tumorseg", "brats2018")
    docks = [open_dock(viewer, which) for which in DOCKS]
    window = viewer.window._qt_window
    window.resize(1920, 1050)
    qtbot.wait(200)
    assert window.minimumSizeHint().height() <= 1050
    assert window.minimumHeight() <= 1050
    assert window.height() <= 1050
    for dock in docks:
        # Every button is inside the dock's scroll area: in view, or reachable by scrolling.
        area = dock.scroll_area
        buttons = dock.findChildren(QPushButton)
        assert area.isVisible() and buttons
        assert all(area.widget().isAncestorOf(button) for button in buttons)
        assert dock.height() >= dock.minimumSizeHint().height()
    # Long layer names chosen after the docks were laid out widen nothing: every dock's
    # contents stay within its column, and every column title of the tables shows whole.
    segment, measure = docks[list(DOCKS).index("segment")], docks[list(DOCKS).index("measure")]
    segment.refresh_models(select="3d")
    long_name = "my-model@v12 seg Brats18_TCIA01_378_1 (after the second correction)"
    viewer.add_labels(viewer.layers[-1].data.copy(), name=long_name)
    measure.layer_box.setCurrentText(long_name)
    measure.reference_box.setCurrentText(viewer.layers[-2].name)
    qtbot.wait(200)
    for dock in docks:
        area = dock.scroll_area
        assert area.widget().width() <= area.viewport().width(), type(dock).__name__
    for table in measure.findChildren(QTableWidget):
        header = table.horizontalHeader()
        for column in range(table.columnCount()):
            assert header.sectionSize(column) >= header.sectionSizeHint(column)


def test_orientation_letters_are_drawn_before_the_first_exam(make_napari_viewer, qtbot):
    # Their first drawing costs ~0.5 s on 2 cores: it belongs to the dock's opening, not to the
    # adding of the first exam's layers. On an empty canvas they are there but transparent.
    viewer = make_napari_viewer()
    open_dock(viewer, "segment")
    overlays = [viewer.canvas.overlays[f"tumorseg_{edge}"] for edge in ("top", "left")]
    visuals = viewer.window._qt_viewer.canvas._viewer_overlay_to_visual
    assert all(o.visible and o.opacity == 0 and o.text and o in visuals for o in overlays)
    viewer.open_sample("napari-tumorseg", "brats2018")
    assert [o.opacity for o in overlays] == [1, 1]


def test_orientation_letters_follow_the_displayed_axes(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-tumorseg", "brats2018")
    open_dock(viewer, "segment")
    overlays = viewer.canvas.overlays

    def letters():
        return tuple(
            overlays[f"tumorseg_{edge}"].text for edge in ("top", "bottom", "left", "right")
        )

    assert letters() == ("A", "P", "R", "L")  # axial, radiological convention
    viewer.dims.order = (1, 0, 2)  # coronal: z down the screen (napari's default camera)
    assert letters() == ("I", "S", "R", "L")
    viewer.dims.order = (2, 0, 1)  # sagittal
    assert letters() == ("I", "S", "A", "P")
    assert overlays["tumorseg_top"].opacity == 1
    viewer.dims.ndisplay = 3
    assert overlays["tumorseg_top"].opacity == 0
