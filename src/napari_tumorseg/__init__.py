"""napari-tumorseg: brain-tumour segmentation of multi-sequence MRI.

The public Python API works without Qt or napari::

    from napari_tumorseg import read_exam, load_model
"""

from .core.errors import TumorSegError
from .core.io import read_exam, read_volume, write_labels
from .core.volume import Volume

__version__ = "0.1.0"

__all__ = ["TumorSegError", "Volume", "read_exam", "read_volume", "write_labels", "__version__"]
