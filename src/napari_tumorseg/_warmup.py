"""Warm napari's layer machinery up in a background thread while a dock opens or files are read.

napari pays for its first layers of a session on the main thread whichever plugin adds them.
Measured on 2 cores, of the ~2 s the first exam's layers took beyond a second exam's:
- imports: pandas for a labels layer's features, scikit-image's colour and exposure modules,
  scipy.ndimage (0.6-0.8 s);
- pint's units registry, which napari sets up on the first layer that has a scale (0.86 s:
  pint parses its definitions file).

Both are done here in a worker thread: the imports are safe beside the main thread (Python's
import lock). pint's lazily built application registry is not -- it swaps its class before it
has finished building, so a second thread could see it half made -- so the thread builds a
registry of its own, the very one pint's lazy registry would build, and `install_units` hands it
to pint on the main thread, and only while pint's own is still unbuilt: no unit can exist yet
that belongs to another registry.
"""

from __future__ import annotations

import importlib
import threading

#: What napari imports on its first layers, and takes long to import.
MODULES = ("pandas", "skimage.color", "skimage.exposure", "scipy.ndimage", "scipy.linalg")

_started = threading.Event()
_thread: threading.Thread | None = None
_units = None  # the registry built by the warm-up, until installed


def warm_up_layers() -> threading.Thread | None:
    """Start the warm-up once per session; returns its thread (None when it already ran)."""
    global _thread
    if _started.is_set():
        return None
    _started.set()
    _thread = threading.Thread(target=_warm, name="tumorseg-warm-up", daemon=True)
    _thread.start()
    return _thread


def _warm() -> None:
    global _units
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- a warm-up that fails costs nothing but its time
            pass
    try:
        from pint import UnitRegistry

        # What pint's default lazy registry builds (pint.registry.LazyRegistry).
        _units = UnitRegistry(on_redefinition="raise")
    except Exception:  # noqa: BLE001
        _units = None


def install_units(timeout: float = 10.0) -> bool:
    """On the main thread, before layers are made: wait for the warm-up (started here if no
    dock started it) and give pint the registry it built, if pint has not built its own yet.
    Returns whether it was installed."""
    global _units
    warm_up_layers()
    if _thread is not None:
        _thread.join(timeout)
    registry, _units = _units, None
    if registry is None:
        return False
    try:
        import pint
        from pint.registry import LazyRegistry
    except ImportError:
        return False
    if not isinstance(pint.get_application_registry().get(), LazyRegistry):
        return False  # built already: units made from it may exist
    pint.set_application_registry(registry)
    return True
