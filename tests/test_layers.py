"""The layers are folders, and each imports only what its layer may: core (numpy/scipy) no torch,
transformers or Ray; engine (torch) no Ray; run (Ray and storage) no CLI; nothing imports upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lensray"
FORBIDDEN = {
    "core": ("torch", "transformers", "datasets", "peft", "ray", "lensray.engine", "lensray.run", "lensray.cli"),
    "engine": ("ray", "lensray.run", "lensray.cli"),
    "run": ("lensray.cli",),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_it_must_not(layer):
    bad = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_every_module_sits_in_a_layer():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "api.py", "errors.py", "redact.py"], flat
