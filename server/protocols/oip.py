"""Open Inference Protocol semantics shared by its REST and gRPC front ends.

Model metadata (from model-config.yaml ``inputs``/``outputs`` or what the handler
declares), the ``timeout`` parameter as a deadline, how protocol tensors reach a handler
that only knows bytes (:func:`server.core.codecs.fields_from_tensors`), and how a
handler's answer becomes output tensors (:func:`output_tensors`). No HTTP, no protobuf.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from server import __version__
from server.core.errors import ErrorKind, OspreyError
from server.core.tensors import as_array, bad_input
from server.core.signature import BYTES_OUTPUT
from server.core.types import InferenceResponse
from server.protocols.management import MODEL_API_OFF, require_model_api

__all__ = ["SERVER_METADATA", "model_metadata", "timeout_of",
           "output_tensors", "repository_index", "archive_for",
           "load_model", "unload_model"]

SERVER_METADATA = {"name": "osprey", "version": __version__,
                   "extensions": ["binary_tensor_data", "model_repository", "schedule_policy"]}
PLATFORM = "pytorch"


def model_metadata(registry: Any, name: str, version: str | None) -> dict:
    mv = registry.get(name, version)
    return {"name": mv.name, "versions": [v.version for v in registry.versions(name)],
            "platform": PLATFORM, "inputs": mv.signature.inputs, "outputs": mv.signature.outputs}


def timeout_of(parameters: dict | None) -> float | None:
    """The protocol's ``timeout`` request parameter (microseconds) in seconds; None where
    absent or 0 (no timeout)."""
    if not parameters or "timeout" not in parameters:
        return None
    value = parameters["timeout"]
    seconds = None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        try:
            seconds = value / 1e6
        except OverflowError:  # an integer beyond any float
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        raise bad_input(f"parameter 'timeout' must be a finite, non-negative number of microseconds, got {shown}")
    return seconds or None


def output_tensors(response: InferenceResponse, outputs: list[dict],
                   requested: list[str] | None) -> list[tuple[str, np.ndarray, str]]:
    """The answer as [(name, array, datatype)], in declared order, filtered by ``requested``."""
    declared = {o["name"]: o["datatype"] for o in outputs}
    result: list[tuple[str, np.ndarray, str]] = []
    if response.tensors is not None:
        for name, value in response.tensors.items():
            try:
                arr, dt = as_array(value, declared.get(name))
            except (ValueError, TypeError, OverflowError) as exc:
                raise OspreyError(ErrorKind.PREDICTION_FAILED,
                                  f"handler answer for output '{name}' is not a {declared.get(name) or 'tensor'}: {exc}") from None
            result.append((name, arr, dt))
    else:
        spec = outputs[0] if len(outputs) == 1 else BYTES_OUTPUT
        if spec["datatype"] != "BYTES" and response.content_type.startswith("application/json"):
            try:
                data = orjson.loads(response.body)
                arr, dt = as_array(np.asarray(data), spec["datatype"])
            except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                raise OspreyError(ErrorKind.PREDICTION_FAILED,
                                  f"handler answer is not a {spec['datatype']} array for output '{spec['name']}': {exc}") from None
        else:
            arr, dt = as_array(response.body, "BYTES")
        result.append((spec["name"], arr, dt))
    if requested:
        by_name = {r[0]: r for r in result}
        missing = [n for n in requested if n not in by_name]
        if missing:
            raise bad_input(f"requested output(s) {', '.join(map(repr, missing))} not produced by the model; "
                            f"it has {', '.join(map(repr, by_name))}")
        result = [by_name[n] for n in requested]
    return result


def repository_index(registry: Any, model_store: str) -> list[dict]:
    """Every model registered or loadable from the model store, with its state."""
    from pathlib import Path

    index: dict[tuple[str, str], dict] = {}
    loaded_from = set()  # the store entries registered versions came from: listed by their model, not again
    for mv in registry.all_versions():
        state, reason = ("READY", "") if mv.ready else ("UNAVAILABLE", mv.unhealthy) if mv.unhealthy else ("LOADING", "")
        index[(mv.name, mv.version)] = {"name": mv.name, "version": mv.version, "state": state, "reason": reason}
        loaded_from.add(Path(str(getattr(mv, "url", "") or "")).name)
    names = {name for name, _ in index}
    store = Path(model_store)
    for p in sorted(store.iterdir()) if store.is_dir() else ():
        name = p.name
        for suffix in (".mar", ".tar.gz", ".tgz"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        else:
            if not (p / "MAR-INF").is_dir():
                continue
        if p.name in loaded_from or name in names:
            continue
        index[(name, "")] = {"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
    return [index[k] for k in sorted(index, key=lambda k: (k[0], _version_order(k[1])))]


def _version_order(version: str) -> tuple:
    """Versions in numeric order where they are numbers (1.0 before 2.0 before 10.0)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in version.split("."))


def archive_for(model_store: str, name: str) -> str:
    """The model-store entry (file or folder name) that holds model ``name``."""
    from pathlib import Path

    if not name or len(name) > 255 or name in (".", "..") or any(c in name for c in "/\\\0"):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise bad_input(f"model name {shown!r} is not a plain name of 1 to 255 characters without '/', '\\' or NUL")
    store = Path(model_store)
    for candidate in (f"{name}.mar", f"{name}.tar.gz", f"{name}.tgz", name):
        try:
            if (store / candidate).exists():
                return candidate
        except (OSError, ValueError):  # a name the file system cannot hold
            break
    raise OspreyError(ErrorKind.NOT_FOUND, f"no archive for model '{name}' in the model store")


async def load_model(registry: Any, model_store: str, name: str, enabled: bool) -> None:
    """Repository load: register model ``name`` from the model store (no-op if loaded)."""
    require_model_api(enabled, MODEL_API_OFF)
    if name not in registry.models:
        await registry.register(archive_for(model_store, name), model_name=name)


async def unload_model(registry: Any, name: str, enabled: bool) -> None:
    """Repository unload: unregister every version of ``name``."""
    require_model_api(enabled, MODEL_API_OFF)
    default = registry.default_version(name)
    for mv in registry.versions(name):  # the default version goes last
        if mv.version != default:
            await registry.unregister(name, mv.version)
    await registry.unregister(name, default)
