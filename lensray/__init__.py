"""lensray: pick the best pre-trained LLM to fine-tune without fine-tuning them all.

The Python API (imported on first use, so ``import lensray`` loads neither torch nor Ray)::

    import lensray
    selection = lensray.screen("configs/demo.yaml", out="runs/demo")
    bill = lensray.plan(replay="flan.csv", grid__max_samples=25600)

:func:`screen` and :func:`plan` are in :mod:`lensray.api`, :func:`load_config` in
:mod:`lensray.run.config`, :func:`get_selector` in :mod:`lensray.core.selection`.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("lensray")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_API = {
    "screen": "lensray.api",
    "plan": "lensray.api",
    "Results": "lensray.api",
    "load_config": "lensray.run.config",
    "get_selector": "lensray.core.selection",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lensray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
