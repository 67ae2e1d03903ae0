"""Warm napari's layer machinery up in a background thread while a dock opens.

napari pays for its first layers of a session on the main thread whichever plugin adds them:
its units registry (pint), pandas for a labels layer's features, scikit-image's colour module
for the labels colormap -- 1.8-2.1 s measured on 2 cores, most of opening the first exam. Made
here in a worker thread while the user looks at the docks, they are ready when the exam opens.
Layer objects are plain evented models until added to a viewer (no Qt, no OpenGL): building
two tiny ones off the main thread touches nothing the viewer uses.
"""

from __future__ import annotations

import threading

_started = threading.Event()


def warm_up_layers() -> threading.Thread | None:
    """Start the warm-up once per session; returns its thread (None when it already ran)."""
    if _started.is_set():
        return None
    _started.set()
    thread = threading.Thread(target=_warm, name="tumorseg-warm-up", daemon=True)
    thread.start()
    return thread


def _warm() -> None:
    try:
        import numpy as np
        from napari.layers import Image, Labels

        Image(np.zeros((2, 2, 2), np.float32), contrast_limits=(0.0, 1.0))
        Labels(np.zeros((2, 2, 2), np.uint8), features={"index": [0], "region": ["none"]})
    except Exception:  # noqa: BLE001 -- a warm-up that fails costs nothing but its time
        pass
