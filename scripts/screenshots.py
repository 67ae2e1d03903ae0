"""Take the README's and the closing notes' screenshots under Xvfb.

    xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/screenshots.py [--model 2d] [--out docs]

Every picture is the whole napari window at 1920 x 1080 with the four docks open, as from the
Plugins menu. Writes demo.png (the labelled sample segmented, with the docks), segment_running.png
(the probability maps filling in, past two thirds of the run),
register_before.png / register_after.png (the raw exam) and
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

from napari_tumorseg.core.bundled import DEFAULT_MODEL

PLUGIN = "napari-tumorseg"
DOCKS = ("Register sequences", "Segment tumour", "Review and correct", "Tumour volumes")
SCREEN = (1920, 1080)


def _viewer(title: str):
    """A napari window filling the screen, every dock of the plugin open."""
    viewer = napari.Viewer(title=title)
    docks = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in DOCKS}
    viewer.window._qt_window.setGeometry(0, 0, *SCREEN)
    return viewer, docks


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


def _show_scores(measure) -> None:
    """Scroll the Tumour volumes dock to its Dice / HD95 table."""
    bar = measure.scroll_area.verticalScrollBar()
    bar.setValue(bar.maximum())


def _shoot(viewer, app, path: Path) -> None:
    """The whole window, without the notification toasts (napari's own PyQt5 deprecation
    notice among them) that would hide the canvas."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    _settle(app, 0.3)
    viewer.screenshot(path=str(path), canvas_only=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([])

    # Registration of the raw clinical exam, before and after.
    viewer, docks = _viewer("napari-tumorseg: register")
    viewer.open_sample(PLUGIN, "tcga_raw")
    register = docks["Register sequences"]
    viewer.dims.set_point(0, viewer.layers["t1ce (raw)"].data_to_world((13, 0, 0))[0])
    _shoot(viewer, app, args.out / "register_before.png")
    register.run()
    _wait(register.registered, app)
    _settle(app)  # the dock's status lines are laid out on the next turns
    for layer in viewer.layers:
        layer.visible = False
    for name, colormap in (("t1ce (registered)", "magenta"), ("flair (registered)", "green")):
        layer = viewer.layers[name]
        layer.visible, layer.colormap, layer.blending = True, colormap, "additive"
    viewer.reset_view()
    _shoot(viewer, app, args.out / "register_after.png")
    viewer.close()

    # Segmentation of the labelled sample with all docks.
    viewer, docks = _viewer("napari-tumorseg demo")
    viewer.open_sample(PLUGIN, "brats2018")
    expert = viewer.layers[-1]
    z = int(np.argmax((expert.data > 0).sum(axis=(1, 2))))
    viewer.dims.set_point(0, z)
    expert.visible = False
    segment = docks["Segment tumour"]
    # The live view: the progress bar past two thirds, the maps filled in that far (window by
    # window in 3D, slice by slice in 2D).
    segment.model.setCurrentText(args.model)
    done = []
    segment.segmented.connect(lambda layer: done.append(1))
    segment.run()
    while segment.progress_bar.value() < 0.7 * segment.progress_bar.maximum() and not done:
        app.processEvents()
    _shoot(viewer, app, args.out / "segment_running.png")
    while not done:
        app.processEvents()
    measure = docks["Tumour volumes"]
    measure.reference_box.setCurrentText(expert.name)
    _wait(measure.evaluate().finished, app)
    _settle(app)
    _show_scores(measure)
    _shoot(viewer, app, args.out / "demo.png")

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
        _wait(measure.evaluate().finished, app)
        _settle(app)
        _show_scores(measure)
        _shoot(viewer, app, args.out / picture)
        print(segment.status.text())
        print(segment.changes.text())

    segment.ft_name.setText("my-model")
    correct_and_finetune(0, "finetune_done.png")  # keep for next exams
    # The same slices corrected again on the new map, then "adapt to this exam".
    correct_and_finetune(1, "finetune_adapt.png")
    viewer.close()


if __name__ == "__main__":
    main()
