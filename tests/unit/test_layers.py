"""The layout's promise, checked: imports go only downward between the layers.

    server.serve / server.cli          wiring (may import anything)
    server.frontends                   front-end processes relaying the inference port: the protocols below
    server.protocols (rest, grpc)      adapters: the core, never instances or handlers
    server.retraining                  jobs, training, gate, promotion: the core, instances and monitoring below
    server.workflows                   TorchServe workflows (.war, DAG over the data plane): the core below
    server.instances                   the only importers of handlers/; the core below
    server.core                        no protocol, instance, handler or monitoring code
    server.settings                    one typed settings object (a leaf)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "server/core": ("server.protocols", "server.instances", "server.serve", "server.cli", "handlers", "monitoring",
                    "server.workflows"),
    "server/workflows": ("server.protocols", "server.instances", "server.serve", "server.cli", "handlers",
                         "monitoring", "server.retraining"),
    "server/instances": ("server.protocols", "server.serve", "server.cli", "monitoring"),
    "server/protocols": ("server.instances", "server.serve", "server.cli", "handlers", "server.frontends"),
    "server/frontends": ("server.instances", "server.serve", "server.cli", "handlers", "monitoring",
                         "server.retraining", "server.workflows"),
    "server/retraining": ("server.protocols", "server.serve", "server.cli", "handlers"),
    "monitoring": ("server.protocols", "server.instances", "server.serve", "server.cli", "handlers"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved."""
    package = list(path.relative_to(ROOT).parent.parts)
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        if "generated" in path.parts:
            continue
        for line, module in _imports(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_handlers_are_imported_only_by_instances():
    bad = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("server", "instances") or "generated" in path.parts:
            continue
        bad += [f"{rel}:{line} imports {m}" for line, m in _imports(path) if m == "handlers" or m.startswith("handlers.")]
    assert not bad, "\n".join(bad)
