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
