from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data"
BRATS = SAMPLES / "brats2018"
TCGA_RAW = SAMPLES / "tcga_raw"
BRATS2023 = SAMPLES / "brats2023"


@pytest.fixture(autouse=True)
def _user_dir(tmp_path_factory, monkeypatch):
    """Tests never read or write the real user model folder."""
    monkeypatch.setenv("TUMORSEG_USER_DIR", str(tmp_path_factory.mktemp("user")))


def make_tiny_model(
    name: str = "tiny", spatial_dims: int = 3, seed: int = 0, norm: str = "instance"
) -> str:
    """Save a small untrained U-Net as a user model; returns its label (``name@v1``)."""
    import torch

    from napari_tumorseg.core.models import save_user_model
    from napari_tumorseg.core.preprocess import NORMALIZATION
    from napari_tumorseg.core.unet import UNet

    torch.manual_seed(seed)
    network = UNet(spatial_dims, features=(4, 8, 16), norm=norm)
    card = {
        "name": name,
        "version": 1,
        "spatial_dims": spatial_dims,
        "channels": ["t1", "t1ce", "t2", "flair"],
        "regions": ["WT", "TC", "ET"],
        "patch_size": [32] * spatial_dims if spatial_dims == 3 else [64, 64],
        "spacing_mm": [2.0, 2.0, 2.0],
        "normalization": NORMALIZATION,
        "parent": "test",
        "metrics": {},
    }
    folder = save_user_model(network, card, name)
    return f"{name}@{folder.name}"


@pytest.fixture
def tiny_model():
    return make_tiny_model()


DOCKS = {
    "register": "Register sequences",
    "segment": "Segment tumour",
    "review": "Review and correct",
    "measure": "Tumour volumes",
}


def open_dock(viewer, which: str):
    """A dock opened as napari's Plugins menu opens it: napari hands it a `PublicOnlyProxy` of
    the viewer (and so of every layer it reaches), not the objects themselves."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-tumorseg", DOCKS[which])
    return widget


def finished(qtbot, dock, worker, timeout: int = 60_000) -> None:
    """Wait until a dock's button work (``worker``, run off the main thread) is in place."""
    assert worker is not None, "the dock started no work"
    qtbot.waitUntil(lambda: not dock.busy, timeout=timeout)
