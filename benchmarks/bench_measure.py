"""How long the "Tumour volumes" dock takes to update after an edit on a full-size exam.

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_measure.py

Times, on the labelled sample (155 x 240 x 240 labels), (1) the core computation (volumes by
`core.metrics.tumour_volumes_ml` + the tumour's slice range) and (2) the dock's whole update
after a paint event (the debounce delay, ``measure.DEBOUNCE_MS``, excluded), against a naive
per-label ``(labels == v).sum()`` baseline and scipy.ndimage's labelled sums in the same run.
Goal: the dock updates within 100 ms of an edit. Writes the "Measurement dock" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import write_section  # noqa: E402


def _time(fn, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    import napari
    from scipy import ndimage

    from napari_tumorseg.core.metrics import tumour_slice_range, tumour_volumes_ml
    from napari_tumorseg.widgets.measure import DEBOUNCE_MS, MeasureWidget

    viewer = napari.Viewer(show=False)
    viewer.open(str(ROOT / "sample_data" / "brats2018"), plugin="napari-tumorseg")
    labels = viewer.layers[-1]
    data = np.asarray(labels.data)
    dock = MeasureWidget(viewer)

    rows = []
    core = _time(lambda: (tumour_volumes_ml(data, 0.001), tumour_slice_range(data)))
    bincount = _time(lambda: np.bincount(data.ravel(), minlength=5))
    naive = _time(lambda: [(data == v).sum() for v in (1, 2, 4)] + [(data > 0).sum()])
    scipy_sum = _time(lambda: ndimage.sum_labels(np.ones_like(data), data, [1, 2, 4]))
    rng = np.random.default_rng(0)

    def edit_and_update():
        z, y, x = rng.integers(60, 120), rng.integers(80, 160), rng.integers(80, 160)
        labels.data_setitem((np.array([z]), np.array([y]), np.array([x])), 2)
        dock.update_measurements()

    widget = _time(edit_and_update)
    rows.append(("ours: volumes (count_nonzero per label) + slice range", core))
    rows.append(("np.bincount of the map (our first version)", bincount))
    rows.append(("naive: `(labels == v).sum()` per label", naive))
    rows.append(("scipy.ndimage.sum_labels", scipy_sum))
    rows.append(("ours: whole dock update after a paint (table redraw included)", widget))
    lines = [
        'Command: `xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_measure.py`'
        f" (2 CPU cores; median of 30 runs; the {DEBOUNCE_MS} ms debounce that merges a brush "
        "stroke's paint events is not included).",
        "",
        "| computation on a 155 x 240 x 240 label map | median ms |",
        "|---|---|",
        *(f"| {name} | {ms:.1f} |" for name, ms in rows),
        "",
        f"Goal: the dock updates within 100 ms of an edit: {widget:.1f} ms "
        f"({'met' if widget < 100 else 'NOT met'}); with the debounce, about "
        f"{widget + DEBOUNCE_MS:.0f} ms after the last paint event of a stroke.",
    ]
    print("\n".join(lines))
    write_section("Measurement dock", "\n".join(lines))
    viewer.close()


if __name__ == "__main__":
    main()
