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
from server.core.types import InferenceResponse

__all__ = ["SERVER_METADATA", "BYTES_INPUT", "BYTES_OUTPUT", "tensor_specs", "model_metadata",
           "deadline_from", "output_tensors", "repository_index", "archive_for",
           "load_model", "unload_model"]

SERVER_METADATA = {"name": "osprey", "version": __version__,
                   "extensions": ["binary_tensor_data", "model_repository", "schedule_policy"]}
PLATFORM = "pytorch"
BYTES_INPUT = {"name": "body", "datatype": "BYTES", "shape": [-1]}
BYTES_OUTPUT = {"name": "output", "datatype": "BYTES", "shape": [-1]}


def _spec_dicts(specs: Any) -> list[dict]:
    out = []
    for s in specs or ():
        d = s.as_dict() if hasattr(s, "as_dict") else dict(s)
        out.append({"name": str(d["name"]), "datatype": str(d.get("datatype", "FP32")).upper(),
                    "shape": [int(x) for x in d.get("shape", [-1])]})
    return out


def tensor_specs(mv: Any) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of a model version: model-config.yaml first, then what the handler
    declares (``tensor_metadata()`` or ``inputs``/``outputs`` lists), else, for a handler
    that takes bytes, one BYTES input and output (the raw body)."""
    inputs, outputs = _spec_dicts(mv.config.inputs), _spec_dicts(mv.config.outputs)
    if not inputs or not outputs:
        for inst in mv.instances:
            if inst.status != "READY":
                continue
            declared_in, declared_out = inst.tensor_specs()
            inputs = inputs or (_spec_dicts(declared_in) if declared_in else [])
            outputs = outputs or (_spec_dicts(declared_out) if declared_out else [])
            break
    if not mv.accepts_tensors:
        inputs = inputs or [dict(BYTES_INPUT)]
        outputs = outputs or [dict(BYTES_OUTPUT)]
    return inputs, outputs


def model_metadata(registry: Any, name: str, version: str | None) -> dict:
    mv = registry.get(name, version)
    inputs, outputs = tensor_specs(mv)
    return {"name": mv.name, "versions": [v.version for v in registry.versions(name)],
            "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


def deadline_from(parameters: dict | None, received: float) -> float | None:
    """The protocol's ``timeout`` request parameter (microseconds) as a monotonic deadline."""
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
    return received + seconds if seconds else None


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

    index: dict[str, dict] = {}
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
        index[name] = {"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
    for mv in registry.all_versions():
        index[mv.name] = {"name": mv.name, "version": mv.version,
                          "state": "READY" if mv.ready else "LOADING", "reason": ""}
    return [index[k] for k in sorted(index)]


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


def _model_api(enabled: bool) -> None:
    if not enabled:
        raise OspreyError(ErrorKind.METHOD_NOT_ALLOWED,
                          "Model API is disabled: start the server with --enable-model-api (enable_model_api=true)")


async def load_model(registry: Any, model_store: str, name: str, enabled: bool) -> None:
    """Repository load: register model ``name`` from the model store (no-op if loaded)."""
    _model_api(enabled)
    if name not in registry.models:
        await registry.register(archive_for(model_store, name), model_name=name)


async def unload_model(registry: Any, name: str, enabled: bool) -> None:
    """Repository unload: unregister every version of ``name``."""
    _model_api(enabled)
    default = registry.default_version(name)
    for mv in registry.versions(name):  # the default version goes last
        if mv.version != default:
            await registry.unregister(name, mv.version)
    await registry.unregister(name, default)
