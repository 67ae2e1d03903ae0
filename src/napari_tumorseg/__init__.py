"""napari-tumorseg: brain-tumour segmentation of multi-sequence MRI.

The public Python API works without Qt or napari::

    from napari_tumorseg import load_model, read_exam, run_to_end, segment
    result = run_to_end(segment(read_exam("case/"), load_model("2d")))

The API's names are imported when first used (PEP 562): napari imports this package before
it runs the reader or opens a sample exam, on its main thread, and the models' modules import
torch, SciPy and SimpleITK -- seconds of a frozen viewer that reading a NIfTI file never needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API: dict[str, str] = {
    "TumorSegError": ".core.errors",
    "Volume": ".core.volume",
    "evaluate_labels": ".core.metrics",
    "finetune": ".core.finetune",
    "finetune_and_save": ".core.finetune",
    "list_models": ".core.models",
    "load_model": ".core.models",
    "read_exam": ".core.io",
    "read_volume": ".core.io",
    "register": ".core.registration",
    "run_to_end": ".core.jobs",
    "segment": ".core.inference",
    "stack_sequences": ".core.registration",
    "tumour_volumes_ml": ".core.metrics",
    "write_labels": ".core.io",
}

__all__ = [
    "TumorSegError",
    "Volume",
    "__version__",
    "evaluate_labels",
    "finetune",
    "finetune_and_save",
    "list_models",
    "load_model",
    "read_exam",
    "read_volume",
    "register",
    "run_to_end",
    "segment",
    "stack_sequences",
    "tumour_volumes_ml",
    "write_labels",
]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported here
    from .core.errors import TumorSegError
    from .core.finetune import finetune, finetune_and_save
    from .core.inference import segment
    from .core.io import read_exam, read_volume, write_labels
    from .core.jobs import run_to_end
    from .core.metrics import evaluate_labels, tumour_volumes_ml
    from .core.models import list_models, load_model
    from .core.registration import register, stack_sequences
    from .core.volume import Volume
