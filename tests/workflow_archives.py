"""Small workflow archives (.war) for the tests, written with zipfile as torch-workflow-archiver
writes them: the spec YAML and the handler file at the top, ``WAR-INF/MANIFEST.json``.

The node models are TorchServe-style function handlers without torch (cheap to load): ``double``
answers 2x its number, ``add_one`` x + 1, ``fails`` raises. The workflow handler file has
``pre`` (passes the request's number on), ``post`` ({"result": x}) and ``merge`` (a fan-in:
{parent: its answer} for each parent).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import yaml

from tests.models import handler_archive

__all__ = ["NODE_MODELS", "WORKFLOW_HANDLER", "node_models", "war_archive", "SEQUENTIAL", "FAN_IN"]

_VALUE = '''
import json

def _value(row):
    body = row.get("data")
    if body is None:
        body = row.get("body")
    if isinstance(body, (bytes, bytearray)):
        body = body.decode()
    return json.loads(body) if isinstance(body, str) else body
'''

NODE_MODELS = {
    "double": _VALUE + '''
def handle(data, context):
    if data is None:
        return None
    return [_value(row) * 2 for row in data]
''',
    "add_one": _VALUE + '''
def handle(data, context):
    if data is None:
        return None
    return [_value(row) + 1 for row in data]
''',
    "fails": '''
def handle(data, context):
    if data is None:
        return None
    raise ValueError("this node always fails")
''',
}

WORKFLOW_HANDLER = _VALUE + '''
def pre(data, context):
    if data is None:
        return None
    return [_value(row) for row in data]


def post(data, context):
    if data is None:
        return None
    return [{"result": _value(row)} for row in data]


def merge(data, context):
    if data is None:
        return None
    return [{name: json.loads(value) for name, value in sorted(row.items())} for row in data]
'''

# input -> pre -> double -> add_one -> post: 3 gives {"result": 7}
SEQUENTIAL = {
    "models": {"min-workers": 1, "max-workers": 1, "batch-size": 4, "max-batch-delay": 5,
               "double": {"url": "double.mar"}, "add_one": {"url": "add_one.mar", "batch-size": 2}},
    "dag": {"pre": ["double"], "double": ["add_one"], "add_one": ["post"]},
}
# input -> pre -> (double, add_one) -> merge: 3 gives {"add_one": 4, "double": 6}
FAN_IN = {
    "models": {"double": {"url": "double.mar"}, "add_one": {"url": "add_one.mar"}},
    "dag": {"pre": ["double", "add_one"], "double": ["merge"], "add_one": ["merge"]},
}


def node_models(store: Path) -> None:
    """double.mar, add_one.mar and fails.mar in ``store``."""
    for name, source in NODE_MODELS.items():
        handler_archive(store, name, source)


def war_archive(store: Path, name: str, spec: dict | str | None, *, handler: str | None = WORKFLOW_HANDLER,
                manifest: dict | None = None, file_name: str | None = None) -> Path:
    """``store/<file_name or name>.war``. ``spec``: the workflow spec (a dict is written as YAML,
    a str as it is, None: no spec file in the archive); ``manifest``: replaces the generated
    MANIFEST.json (``{}``: none at all)."""
    path = store / f"{file_name or name}.war"
    if manifest is None:
        manifest = {"createdOn": "01/01/2025 00:00:00", "archiverVersion": "0.2.15",
                    "workflow": {"workflowName": name, "specFile": "spec.yaml", "handler": "wf_handler.py"}}
    with zipfile.ZipFile(path, "w") as zf:
        if spec is not None:
            zf.writestr("spec.yaml", spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        if handler is not None:
            zf.writestr("wf_handler.py", handler)
        if manifest:
            zf.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest, indent=2))
    return path
