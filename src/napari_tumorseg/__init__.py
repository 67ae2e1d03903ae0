"""napari-tumorseg: brain-tumour segmentation of multi-sequence MRI.

The public Python API works without Qt or napari::

    from napari_tumorseg import load_model, read_exam, run_to_end, segment
    result = run_to_end(segment(read_exam("case/"), load_model("3d")))
"""

from .core.errors import TumorSegError
from .core.finetune import finetune, finetune_and_save
from .core.inference import segment
from .core.io import read_exam, read_volume, write_labels
from .core.jobs import run_to_end
from .core.metrics import evaluate_labels, tumour_volumes_ml
from .core.models import list_models, load_model
from .core.registration import register, stack_sequences
from .core.volume import Volume

__version__ = "0.1.0"

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
