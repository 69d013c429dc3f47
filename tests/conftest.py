import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The shared benchmark tables; tests using it skip with a reason when absent."""
    path = Path(os.environ.get("LENSRAY_BENCHMARKS", REPO.parent / "shared" / "benchmarks"))
    if not (path / "flan.csv").is_file() or not (path / "wmt19.csv").is_file():
        pytest.skip(f"benchmark tables not found at {path} (set LENSRAY_BENCHMARKS)")
    return path
