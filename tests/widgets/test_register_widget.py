"""The "Register sequences" dock on the raw clinical sample."""

import numpy as np

from napari_tumorseg.widgets.register import REGISTERED, checkerboard

from ..conftest import open_dock

PLUGIN = "napari-tumorseg"


def _raw_exam(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "tcga_raw")
    return viewer, open_dock(viewer, "register")


def test_pickers_are_filled_from_layer_names(make_napari_viewer):
    viewer, widget = _raw_exam(make_napari_viewer)
    picked = {seq: box.currentText() for seq, box in widget.pickers.boxes.items()}
    assert picked == {
        "t1": "t1 (raw)",
        "t1ce": "t1ce (raw)",
        "t2": "t2 (raw)",
        "flair": "flair (raw)",
    }


def test_pickers_follow_a_renamed_layer_and_skip_rgb_images(make_napari_viewer):
    """A renamed layer stayed in the boxes under its old name and was left out of the run."""
    viewer, widget = _raw_exam(make_napari_viewer)
    viewer.layers["t2 (raw)"].name = "t2 axial"
    assert widget.pickers.boxes["t2"].currentText() == "t2 axial"
    assert set(widget.pickers.selected_layers()) == {"t1", "t1ce", "t2", "flair"}
    viewer.add_image(np.zeros((8, 8, 8, 3), np.uint8), name="flair photo", rgb=True)
    names = [widget.pickers.boxes["flair"].itemText(i) for i in range(5)]
    assert "flair photo" not in names


def test_registers_the_raw_exam_into_new_layers(make_napari_viewer, qtbot):
    viewer, widget = _raw_exam(make_napari_viewer)
    before = {layer.name: (layer.data.copy(), tuple(layer.translate)) for layer in viewer.layers}
    widget.pickers.boxes["t1"].setCurrentText("(none)")  # three sequences keep the test short
    assert widget.run() is not None
    with qtbot.waitSignal(widget.registered, timeout=180_000) as blocker:
        pass
    new = [layer for layer in viewer.layers if REGISTERED in layer.name]
    assert [layer.name for layer in new] == [f"{s} {REGISTERED}" for s in ("t1ce", "t2", "flair")]
    assert blocker.args[0] == new and viewer.layers.selection.active is new[-1]
    # One grid for all, the reference scan's own (by default): a mask segmented on these
    # layers is saved voxel for voxel like the post-contrast T1 file.
    reference = viewer.layers["t1ce (raw)"]
    for layer in new:
        assert layer.data.shape == reference.data.shape
        np.testing.assert_allclose(layer.scale, reference.scale, atol=1e-6)
        np.testing.assert_allclose(layer.translate, reference.translate, atol=1e-4)
        assert layer.metadata["tumorseg"]["source_path"].endswith("t1c_raw.nii.gz")
    # The originals are untouched.
    for name, (data, translate) in before.items():
        np.testing.assert_array_equal(viewer.layers[name].data, data)
        assert tuple(viewer.layers[name].translate) == translate
    result = widget.result
    for seq in ("t2", "flair"):
        r = result.results[seq]
        assert r.quality >= 0.9 and r.quality > r.quality_before
    assert "heads overlap" in widget.status.text()
    widget.check_sequence.setCurrentText("flair")
    widget.show_checkerboard()
    assert viewer.layers[-1].name == "checkerboard t1ce/flair"


def test_cancel_leaves_the_layers_as_they_were(make_napari_viewer, qtbot):
    viewer, widget = _raw_exam(make_napari_viewer)
    names = [layer.name for layer in viewer.layers]
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        widget.runner.cancel()
    assert [layer.name for layer in viewer.layers] == names
    assert "cancelled" in widget.status.text()
    assert widget.run_button.isEnabled()


def test_checkerboard_alternates_the_two_scans():
    a = np.random.default_rng(0).uniform(1, 2, (2, 32, 32))
    b = 3 - a  # same range, opposite pattern
    board = checkerboard(a, b, block=16)

    def corr(x, y):
        return np.corrcoef(x.ravel(), y.ravel())[0, 1]

    assert corr(board[:, :16, :16], b[:, :16, :16]) > 0.99  # even squares: second scan
    assert corr(board[:, :16, 16:], a[:, :16, 16:]) > 0.99  # odd squares: first scan
    assert corr(board[:, 16:, :16], a[:, 16:, :16]) > 0.99


def test_pickers_take_the_scans_added_last(make_napari_viewer):
    """A second registration (or another exam) used to leave the boxes on the first layers,
    and Segment ran on them without a word."""
    from qtpy.QtWidgets import QFormLayout, QWidget

    from napari_tumorseg.widgets._pickers import SequencePickers

    viewer = make_napari_viewer()
    holder = QWidget()
    pickers = SequencePickers(viewer, QFormLayout(holder), prefer="(registered)")
    volume = np.ones((8, 8, 8), np.float32)
    for seq in ("t1", "flair"):
        viewer.add_image(volume, name=seq)
    assert pickers.boxes["t1"].currentText() == "t1"
    for _ in range(2):  # registered twice: napari names the second set "... [1]"
        for seq in ("t1", "flair"):
            viewer.add_image(volume, name=f"{seq} (registered)")
    picked = {seq: layer.name for seq, layer in pickers.selected_layers().items()}
    assert picked == {"t1": "t1 (registered) [1]", "flair": "flair (registered) [1]"}
    viewer.add_image(volume, name="t1")  # a raw scan does not displace a registered one
    assert pickers.boxes["t1"].currentText() == "t1 (registered) [1]"
