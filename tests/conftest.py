from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "data" / "MNIST" / "raw"


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped .gz files (a test may corrupt it)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in RAW.glob("*.gz"):
        shutil.copy(gz, raw / gz.name)
    return tmp_path / "data"
