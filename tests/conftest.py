import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_log_record_factory():
    """``lensray screen`` installs log redaction process-wide (lensray.run.store); undo it after each test."""
    previous = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(previous)


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The shared benchmark tables; tests using it skip with a reason when absent."""
    path = Path(os.environ.get("LENSRAY_BENCHMARKS", REPO.parent / "shared" / "benchmarks"))
    if not (path / "flan.csv").is_file() or not (path / "wmt19.csv").is_file():
        pytest.skip(f"benchmark tables not found at {path} (set LENSRAY_BENCHMARKS)")
    return path


@pytest.fixture()
def lensray_cache(tmp_path_factory, monkeypatch):
    """Tiny models built once per test session in a temporary cache; no injected faults."""
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path_factory.getbasetemp() / "lensray-cache"))
    monkeypatch.delenv("LENSRAY_FAULTS", raising=False)
