"""Warm napari's layer machinery up in a background thread while a dock opens.

napari pays for its first layers of a session on the main thread whichever plugin adds them:
pandas for a labels layer's features and scikit-image's colour module for its colormap among
them (0.6-0.8 s of the 1.8-2.1 s measured on 2 cores for the first exam's layers). Imported
here in a worker thread while the user looks at the docks, they are ready when the exam opens.
Only imports: Python's import lock makes them safe beside the main thread, where building a
layer here would set up napari's units registry (pint) behind the back of a main thread that
may be doing the same.
"""

from __future__ import annotations

import importlib
import threading

#: What napari imports on its first labels layer, and takes long to import.
MODULES = ("pandas", "skimage.color")

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
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- a warm-up that fails costs nothing but its time
            pass
