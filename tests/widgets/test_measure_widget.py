"""The "Tumour volumes" dock: live volumes, evaluation, saving without losing files."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_tumorseg._layers import META_KEY

from ..conftest import BRATS, finished, open_dock

SEG = BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"


@pytest.fixture
def viewer_and_dock(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(BRATS), plugin="napari-tumorseg")
    return viewer, open_dock(viewer, "measure")


def _evaluated(qtbot, widget):
    """Evaluate (computed off the main thread) and the scores it shows."""
    finished(qtbot, widget, widget.evaluate())
    return widget.scores


def _volume(widget, row):
    return float(widget.table.item(row, 0).text())


def _save(qtbot, widget, path, **kwargs):
    """Save as the button does (the files written in a worker thread) and wait for the end;
    returns the files written."""
    with qtbot.waitSignal(widget.saved, timeout=60_000) as blocker:
        widget.save(path, **kwargs)
    qtbot.waitUntil(lambda: not widget.busy, timeout=5000)
    return blocker.args[0]


def test_volumes_follow_edits(viewer_and_dock, qtbot):
    viewer, widget = viewer_and_dock
    labels = viewer.layers[-1]
    wt_before = _volume(widget, 4)
    assert wt_before == pytest.approx((labels.data > 0).sum() / 1000, abs=0.01)
    # Erase a block of tumour as napari's editing does (through the undo history).
    idx = np.nonzero(labels.data > 0)
    block = tuple(i[:1500] for i in idx)
    labels.data_setitem(block, 0)
    qtbot.waitUntil(lambda: _volume(widget, 4) < wt_before, timeout=3000)
    assert _volume(widget, 4) == pytest.approx((labels.data > 0).sum() / 1000, abs=0.01)
    # Ctrl+Z only refreshes the layer (no data or paint event): the volumes follow it too.
    labels.undo()
    qtbot.waitUntil(lambda: _volume(widget, 4) == pytest.approx(wt_before, abs=0.01), timeout=3000)


def test_evaluate_against_itself_and_save(viewer_and_dock, tmp_path, qtbot):
    viewer, widget = viewer_and_dock
    name = viewer.layers[-1].name
    viewer.add_labels(
        viewer.layers[-1].data.copy(), name="reference", metadata=viewer.layers[-1].metadata
    )
    widget.layer_box.setCurrentText(name)
    widget.reference_box.setCurrentText("reference")
    scores = _evaluated(qtbot, widget)
    assert all(s == {"dice": 1.0, "hd95_mm": 0.0} for s in scores.values())

    target = tmp_path / "mask.nii.gz"
    written = _save(qtbot, widget, target)
    assert [p.name for p in written] == ["mask.nii.gz", "mask_report.json", "mask_report.csv"]
    saved, source = nib.load(str(target)), nib.load(str(SEG))
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))
    np.testing.assert_array_equal(saved.affine, source.affine)
    report = json.loads((tmp_path / "mask_report.json").read_text())
    assert report["metrics"]["WT"]["dice"] == 1.0
    assert report["volumes_ml"]["WT"] == pytest.approx(_volume(widget, 4), abs=0.01)
    assert "WT_dice" in (tmp_path / "mask_report.csv").read_text().splitlines()[0]

    # An edit after Evaluate: the old scores no longer describe the map, nor go into a report.
    labels = viewer.layers[name]
    labels.data_setitem((np.array([80]), np.array([120]), np.array([120])), 1)
    assert widget.scores is None and widget.scores_table.item(0, 0).text() == "-"
    edited = _save(qtbot, widget, tmp_path / "edited.nii.gz")
    assert "metrics" not in json.loads(edited[1].read_text())
    # A name typed with dots and no suffix keeps its dots in every file.
    dotted = _save(qtbot, widget, tmp_path / "sub-01.ses-1")
    assert [p.name for p in dotted] == [
        "sub-01.ses-1.nii.gz",
        "sub-01.ses-1_report.json",
        "sub-01.ses-1_report.csv",
    ]

    # A second save is refused unless the user agrees; the files stay as they were.
    before = {p: p.read_bytes() for p in written}
    asked = []
    assert (
        _save(qtbot, widget, target, confirm_overwrite=lambda paths: asked.append(paths) or False)
        == []
    )
    assert asked and all(p.read_bytes() == data for p, data in before.items())
    assert _save(qtbot, widget, target, confirm_overwrite=lambda paths: True)


def test_a_save_writes_the_map_as_it_was_when_saved_while_painting_goes_on(
    viewer_and_dock, tmp_path, qtbot
):
    viewer, widget = viewer_and_dock
    labels = viewer.layers[widget.layer_box.currentText()]
    target = tmp_path / "mask.nii.gz"
    with qtbot.waitSignal(widget.saved, timeout=60_000) as blocker:
        worker = widget.save(target)
        assert worker is not None and not widget.save_button.isEnabled()
        labels.data_setitem((np.array([80]), np.array([120]), np.array([120])), 4)
        labels.data_setitem((np.array([81]), np.array([121]), np.array([121])), 1)
    assert [p.name for p in blocker.args[0]][0] == "mask.nii.gz"
    qtbot.waitUntil(lambda: not widget.busy, timeout=5000)
    saved, source = nib.load(str(target)), nib.load(str(SEG))
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.asanyarray(source.dataobj))
    assert widget.save_button.isEnabled()


def test_a_segmentations_report_says_which_thresholds_made_it(viewer_and_dock, tmp_path, qtbot):
    viewer, widget = viewer_and_dock
    data = viewer.layers[-1].data.copy()
    rules = {"thresholds": [0.5, 0.65, 0.5]}
    geometry = viewer.layers[-1].metadata[META_KEY]
    metadata = {
        META_KEY: {**geometry, "model_labels": data.copy(), "postprocess": rules, "model": "3d"}
    }
    made = viewer.add_labels(data, name="segmentation", metadata=metadata)
    widget.layer_box.setCurrentText(made.name)
    _save(qtbot, widget, tmp_path / "seg.nii.gz")
    report = json.loads((tmp_path / "seg_report.json").read_text())
    assert report["thresholds"] == "WT 0.5 / TC 0.65 / ET 0.5" and report["model"] == "3d"
    assert "WT 0.5 / TC 0.65 / ET 0.5" in (tmp_path / "seg_report.csv").read_text()


def test_a_failed_save_leaves_the_earlier_mask_and_report_as_they_were(
    viewer_and_dock, tmp_path, qtbot
):
    viewer, widget = viewer_and_dock
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"the mask saved yesterday")
    (tmp_path / "mask_report.json").mkdir()  # the report cannot be written
    assert _save(qtbot, widget, target, confirm_overwrite=lambda paths: True) == []
    assert target.read_bytes() == b"the mask saved yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "mask_report.json"]


def test_a_mask_is_never_saved_over_an_open_scan(make_napari_viewer, tmp_path, qtbot):
    case = tmp_path / "case"
    shutil.copytree(BRATS, case)
    viewer = make_napari_viewer()
    viewer.open(str(case), plugin="napari-tumorseg")
    widget = open_dock(viewer, "measure")
    flair = next(case.glob("*_flair.nii.gz"))
    before = flair.read_bytes()
    assert _save(qtbot, widget, flair, confirm_overwrite=lambda paths: True) == []
    assert flair.read_bytes() == before
    # napari's own File > Save Selected Layers goes through the same writer.
    from napari_tumorseg._layers import layer_volume
    from napari_tumorseg._writer import save_labels
    from napari_tumorseg.core.errors import TumorSegError

    labels = viewer.layers[-1]
    with pytest.raises(TumorSegError, match="is the file of the open scan"):
        save_labels(flair, layer_volume(labels), labels.name, viewer)
    assert flair.read_bytes() == before
    # Saving an opened label map back over its own file stays possible.
    seg = next(case.glob("*_seg.nii.gz"))
    assert save_labels(seg, layer_volume(labels), labels.name, viewer) == seg


def test_layers_that_are_not_3d_maps_are_not_offered(viewer_and_dock):
    """A 2D labels layer used to raise from inside napari's layer-inserted event."""
    viewer, widget = viewer_and_dock
    flat = viewer.add_labels(np.zeros((20, 20), np.uint8), name="sketch")
    assert flat.name not in [widget.layer_box.itemText(i) for i in range(widget.layer_box.count())]
    from napari_tumorseg._layers import layer_volume
    from napari_tumorseg.core.errors import TumorSegError

    with pytest.raises(TumorSegError, match="'sketch' .20x20. is not a 3D"):
        layer_volume(flat)


def test_a_painted_3_is_shown_measured_and_saved_as_enhancing_tumour(
    viewer_and_dock, tmp_path, qtbot
):
    """napari's label spinner passes 3 between 2 and 4: it was drawn invisible, left out of
    the volumes and report, and yet saved as 4 (or refused beside 4s)."""
    viewer, widget = viewer_and_dock
    labels = viewer.layers[-1]
    assert labels.colormap.map(3).tolist() == labels.colormap.map(4).tolist()
    et_before, wt_before = _volume(widget, 2), _volume(widget, 4)
    block = np.zeros(labels.data.shape, bool)
    block[70, 20:30, 20:30] = True  # outside the tumour: 100 voxels of 1 mm^3
    labels.data_setitem(np.nonzero(block), 3)
    widget.update_measurements()
    assert _volume(widget, 2) == pytest.approx(et_before + 0.1, abs=0.005)
    assert _volume(widget, 4) == pytest.approx(wt_before + 0.1, abs=0.005)
    target = tmp_path / "mask.nii.gz"
    assert _save(qtbot, widget, target)  # beside the map's 4s
    saved = np.asanyarray(nib.load(str(target)).dataobj)
    assert set(np.unique(saved).tolist()) <= {0, 1, 2, 4}
    report = json.loads((tmp_path / "mask_report.json").read_text())
    assert report["volumes_ml"]["ET"] == pytest.approx(_volume(widget, 2), abs=0.01)


def test_scores_are_cleared_when_the_reference_is_edited(viewer_and_dock, qtbot):
    viewer, widget = viewer_and_dock
    expert = viewer.layers[-1]
    viewer.add_labels(expert.data.copy(), name="mine", metadata=expert.metadata)
    widget.layer_box.setCurrentText("mine")
    widget.reference_box.setCurrentText(expert.name)
    assert _evaluated(qtbot, widget)["ET"]["dice"] == 1.0
    expert.data_setitem(np.nonzero(expert.data == 4), 0)
    assert widget.scores is None
    assert widget.scores_table.item(2, 0).text() == "-"
    # Undo only refreshes the layer: the scores of the edited reference go too.
    assert _evaluated(qtbot, widget)["ET"]["dice"] == 0.0
    expert.undo()
    assert widget.scores is None


def test_renamed_layers_stay_chosen(viewer_and_dock, qtbot):
    viewer, widget = viewer_and_dock
    expert = viewer.layers[-1]
    mine = viewer.add_labels(expert.data.copy(), name="mine", metadata=expert.metadata)
    widget.layer_box.setCurrentText("mine")
    widget.reference_box.setCurrentText(expert.name)
    expert.name = "expert"
    mine.name = "my map"
    assert widget.reference_box.currentText() == "expert"
    assert widget.layer_box.currentText() == "my map"
    assert _evaluated(qtbot, widget)["WT"]["dice"] == 1.0
