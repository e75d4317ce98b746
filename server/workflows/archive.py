"""Workflow archives (.war, made by torch-workflow-archiver): a zip with the spec YAML, the
handler file and any extra files at its top, and ``WAR-INF/MANIFEST.json``::

    {"createdOn": "...", "archiverVersion": "0.2.15",
     "workflow": {"workflowName": "wf", "specFile": "spec.yaml", "handler": "handler.py"}}

A .war is found in the workflow store (TorchServe's ``workflow_store``, the model store unless
set) by its file name, as TorchServe finds it; downloading archives is not supported.
Extraction is server.core.archive's (no member outside the folder, no links, a size cap).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.core.archive import download_target_in_store, extract_zip
from server.core.errors import ErrorKind, OspreyError, show

__all__ = ["WorkflowArchive", "resolve_war", "open_war", "MANIFEST_PATH"]

MANIFEST_PATH = "WAR-INF/MANIFEST.json"


def _not_found(message: str) -> OspreyError:
    return OspreyError(ErrorKind.NOT_FOUND, message, type_name="WorkflowNotFoundException")


def _invalid(source: str, why: str) -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, f"Invalid workflow archive {source}: {why}",
                       type_name="InvalidWorkflowException")


@dataclass
class WorkflowArchive:
    url: str
    folder: Path  # the extraction (removed by cleanup): war/ the archive's files, nodes/ function nodes
    manifest: dict[str, Any]
    name: str
    spec_file: str
    spec_text: str
    handler: str | None  # the handler file's name in the archive, or None
    handler_source: str | None

    @property
    def files(self) -> Path:
        return self.folder / "war"

    def function_folder(self, model_name: str, node: str) -> Path:
        """A model folder for function node ``node``: a manifest whose handler is
        ``<handler file>:<node>`` (as TorchServe registers a function node) and links to the
        archive's files, so the handler imports as it would from the .war (blocking)."""
        folder = self.folder / "nodes" / node
        (folder / "MAR-INF").mkdir(parents=True, exist_ok=True)
        for entry in self.files.iterdir():
            if entry.name != "WAR-INF" and not (folder / entry.name).exists():
                os.symlink(os.path.abspath(entry), folder / entry.name)
        manifest = {"runtime": "python", "model": {"modelName": model_name, "modelVersion": "1.0",
                                                   "handler": f"{self.handler}:{node}"}}
        (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
        return folder

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def resolve_war(store: str, url: str | None) -> Path:
    """The archive ``url`` names in the workflow ``store``, with TorchServe's answers: no url
    400 "Parameter url is required.", "" and a missing file 404, ``..`` 404 "Relative path is
    not allowed in url"."""
    if url is None:
        raise OspreyError(ErrorKind.BAD_INPUT, "Parameter url is required.")
    if not isinstance(url, str):
        raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter url must be a string, got {show(url)}")
    shown = url if len(url) <= 200 else show(url)
    if url == "":
        raise _not_found("Workflow not found at: ")
    if "\x00" in url or len(url) > 4096:
        raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter url is not a usable file name: {show(url)}")
    if ".." in re.split(r"[/\\]", url):
        raise _not_found(f"Relative path is not allowed in url: {shown}")
    if re.match(r"^https?://", url, re.I):
        # no download; a file already in the store gets TorchServe's 500, as for models
        name = download_target_in_store(store, url)
        if name is not None:
            raise OspreyError(ErrorKind.INTERNAL, f"Workflow file already exists {name}")
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I):
        raise OspreyError(ErrorKind.BAD_INPUT, f"Workflow URL {shown}: downloading archives is not supported; "
                                               "put the .war in the workflow store (the model store unless "
                                               "workflow_store is set) and give its file name")
    root = Path(os.path.abspath(store))
    path = Path(os.path.normpath(root / url))
    if path != root and root not in path.parents:
        raise _not_found(f"Workflow not found in workflow store: {shown} (it is outside the workflow store)")
    try:
        found = path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise _not_found(f"Workflow not found in workflow store: {shown}")
    return path


def _read_text(source: str, folder: Path, name: str, what: str) -> str:
    path = Path(os.path.normpath(folder / name))
    if folder not in path.parents or not path.is_file():
        raise _invalid(source, f"its manifest names {what} {show(name)}, which is not a file in the archive")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _invalid(source, f"{what} {name} cannot be read as UTF-8 text ({exc})") from None


def open_war(path: Path, url: str, work_root: Path, max_size: int, name: str | None = None) -> WorkflowArchive:
    """Extract the .war at ``path`` under ``work_root`` and read its manifest, spec and handler
    source (blocking: run it off the event loop). ``name``: the workflow_name asked for, else
    the manifest's."""
    source = Path(url).name
    work_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="workflow-", dir=work_root))
    files = folder / "war"  # the archive's files; folder / "nodes": the function nodes' model folders
    try:
        with open(path, "rb") as fh:
            if not fh.read(4).startswith(b"PK"):
                raise _invalid(source, "not a zip file (a .war is a zip made by torch-workflow-archiver)")
        files.mkdir()
        extract_zip(source, path, files, max_size)
        manifest_file = files / MANIFEST_PATH
        if not manifest_file.is_file():
            raise _invalid(source, f"it has no {MANIFEST_PATH} (Workflow name is not defined.)")
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _invalid(source, f"{MANIFEST_PATH} is not valid JSON ({exc})") from None
        workflow = manifest.get("workflow") if isinstance(manifest, dict) else None
        if not isinstance(workflow, dict):
            raise _invalid(source, f"Missing Workflow entry in manifest file ({MANIFEST_PATH} has no 'workflow' object)")
        wf_name = name or workflow.get("workflowName")
        if not isinstance(wf_name, str) or not wf_name:
            raise _invalid(source, "Workflow name is not defined. (no workflowName in its manifest and no "
                                   "workflow_name given)")
        spec_file = workflow.get("specFile")
        if not isinstance(spec_file, str) or not spec_file:
            raise _invalid(source, f"its manifest names no specFile (the workflow spec YAML)")
        spec_text = _read_text(source, files, spec_file, "the spec file")
        handler = workflow.get("handler") or None
        handler_source = None
        if handler is not None:
            if not isinstance(handler, str) or not handler.endswith(".py") or "/" in handler or "\\" in handler:
                raise _invalid(source, f"its handler must be a .py file at the archive's top, got {show(handler)}")
            handler_source = _read_text(source, files, handler, "the handler file")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return WorkflowArchive(url, folder, manifest, wf_name, spec_file, spec_text, handler, handler_source)
