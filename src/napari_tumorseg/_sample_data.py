"""npe2 sample data: File > Open Sample > napari-tumorseg. Read from disk, never downloaded."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ._notify import notify
from ._reader import open_volumes, read_layers
from ._warmup import install_units, warm_up_layers


def sample_data_dir() -> Path:
    """The sample_data folder: inside the installed package, or at the repository root."""
    packaged = Path(str(resources.files("napari_tumorseg"))) / "sample_data"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sample_data"


def sample_exam_dir(name: str) -> Path:
    """Folder of one sample exam: ``brats2018``, ``tcga_raw`` or ``brats2023``."""
    return sample_data_dir() / name


def _read_sample(name: str) -> list[tuple]:
    """A sample exam's layer data; a sample opened twice is warned about (a second copy)."""
    warm_up_layers()  # napari's first layers' set-up, beside the reading
    layers, warnings = read_layers([sample_exam_dir(name)], *open_volumes())
    for message in warnings:
        notify(message, severity="warning")
    install_units()
    return layers


def labelled_brats2018() -> list[tuple]:
    """Sample (a): the labelled BraTS 2018 exam, four sequences and the expert labels."""
    return _read_sample("brats2018")


def raw_clinical_exam() -> list[tuple]:
    """Sample (b): the raw TCGA-FG-6692 exam, each sequence at its own world position.

    Post-contrast T1 (magenta) and FLAIR (green) are blended additively so the misalignment
    between sequences shows as colour fringes; T1 and T2 start hidden.
    """
    looks = {
        "t1ce": {"colormap": "magenta", "blending": "additive", "visible": True},
        "flair": {"colormap": "green", "blending": "additive", "visible": True},
        "t1": {"visible": False},
        "t2": {"visible": False},
    }
    layers = _read_sample("tcga_raw")
    for _, kwargs, _ in layers:
        kwargs.update(looks.get(kwargs["name"], {}))
        kwargs["name"] = f"{kwargs['name']} (raw)"
    return layers


def brats2023() -> list[tuple]:
    """Sample (c): the BraTS 2023 exam (t1n, t1c, t2w, t2f)."""
    return _read_sample("brats2023")
