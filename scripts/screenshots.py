"""Take the README's and the closing notes' screenshots under Xvfb.

    xvfb-run -a -s "-screen 0 1280x1024x24" python scripts/screenshots.py [--model 3d] [--out docs]

Writes demo.png (the labelled sample segmented, with the docks), segment_running.png (the
probability maps filling in, 2D model), register_before.png / register_after.png (the raw exam) and
finetune_done.png (3 slices corrected with the expert labels, "Fine-tune on my corrections"
pressed, the exam segmented again; the fine-tuned version goes to a temporary user folder) and
finetune_adapt.png (the same slices corrected on that map, then "adapt to this exam").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

PLUGIN = "napari-tumorseg"


def _wait(signal, app) -> None:
    done = []
    signal.connect(lambda *args: done.append(1))
    while not done:
        app.processEvents()


def _settle(app, seconds: float = 1.0) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="3d")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([])

    # Registration of the raw clinical exam, before and after.
    viewer = napari.Viewer(title="napari-tumorseg: register")
    viewer.window.resize(1280, 900)
    viewer.open_sample(PLUGIN, "tcga_raw")
    _, register = viewer.window.add_plugin_dock_widget(PLUGIN, "Register sequences")
    viewer.dims.set_point(0, viewer.layers["t1ce (raw)"].data_to_world((13, 0, 0))[0])
    viewer.screenshot(path=str(args.out / "register_before.png"), canvas_only=False)
    register.run()
    _wait(register.registered, app)
    _settle(app)  # the dock's status lines are laid out on the next turns
    for layer in viewer.layers:
        layer.visible = False
    for name, colormap in (("t1ce (registered)", "magenta"), ("flair (registered)", "green")):
        layer = viewer.layers[name]
        layer.visible, layer.colormap, layer.blending = True, colormap, "additive"
    viewer.reset_view()
    viewer.screenshot(path=str(args.out / "register_after.png"), canvas_only=False)
    viewer.close()

    # Segmentation of the labelled sample with all docks.
    viewer = napari.Viewer(title="napari-tumorseg demo")
    viewer.window.resize(1400, 950)
    viewer.open_sample(PLUGIN, "brats2018")
    docks = {}
    for name in ("Segment tumour", "Tumour volumes"):
        docks[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]
    expert = viewer.layers[-1]
    z = int(np.argmax((expert.data > 0).sum(axis=(1, 2))))
    viewer.dims.set_point(0, z)
    expert.visible = False
    segment = docks["Segment tumour"]
    # The live view: the bundled 3D model covers this exam's brain with 2 windows in
    # one batch (one progress event, then the finished map), so the 2D model shows the filling
    # in, slice batch by slice batch.
    segment.model.setCurrentText("2d")
    worker = segment.run()
    shots = []

    def grab(item):
        event = item[0]
        # Three quarters through the slices from the bottom: the tumour's largest slice (shown)
        # is done, the slices above it are still empty.
        if not shots and event.total and event.done >= 0.75 * event.total:
            app.processEvents()
            viewer.screenshot(path=str(args.out / "segment_running.png"), canvas_only=False)
            shots.append(1)

    worker.yielded.connect(grab)
    _wait(segment.segmented, app)
    viewer.layers.remove(segment.labels_layer)
    segment.model.setCurrentText(args.model)
    segment.run()
    _wait(segment.segmented, app)
    for name in ("WT probability", "TC probability", "ET probability"):
        viewer.layers[name].visible = False
    measure = docks["Tumour volumes"]
    measure.layer_box.setCurrentText(segment.labels_layer.name)
    measure.reference_box.setCurrentText(expert.name)
    measure.evaluate()
    viewer.screenshot(path=str(args.out / "demo.png"), canvas_only=False)

    # Fine-tune on 3 corrected slices (the expert labels painted in), then re-segmentation.
    os.environ["TUMORSEG_USER_DIR"] = tempfile.mkdtemp(prefix="tumorseg_screenshots_")
    slices = np.flatnonzero((expert.data > 0).any(axis=(1, 2)))
    chosen = slices[[len(slices) // 4, len(slices) // 2, 3 * len(slices) // 4]]

    def correct_and_finetune(mode: int, picture: str) -> None:
        labels = segment.labels_layer
        for z in chosen:
            index = np.nonzero(np.ones(expert.data[z].shape, bool))
            labels.data_setitem((np.full(index[0].shape, z), *index), expert.data[z][index])
        segment.ft_mode.setCurrentIndex(mode)
        _wait(segment.finetune().finished, app)
        _wait(segment.segmented, app)
        measure.layer_box.setCurrentText(segment.labels_layer.name)
        measure.evaluate()
        labels.visible = False
        viewer.screenshot(path=str(args.out / picture), canvas_only=False)
        print(segment.status.text())
        print(segment.changes.text())

    segment.ft_name.setText("my-model")
    correct_and_finetune(0, "finetune_done.png")  # keep for next exams
    # The same slices corrected again on the new map, then "adapt to this exam".
    correct_and_finetune(1, "finetune_adapt.png")
    viewer.close()


if __name__ == "__main__":
    main()
