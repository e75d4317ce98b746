"""TorchServe's management semantics, once for REST (port 8081) and gRPC (port 7071).

Each call takes parameters already decoded from the wire, calls the registry and returns
TorchServe's JSON body as a dict (the REST adapter sends it, the gRPC adapter wraps it in
``ManagementResponse{msg}``). The model-API guard lives here and in no other place.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Awaitable, Callable

from server.core.errors import METHOD_NOT_ALLOWED_TEXT, ErrorKind, OspreyError, show
from server.core.instance import InstanceStatus
from server.core.registry import ModelVersion, Registry

__all__ = ["require_model_api", "describe", "describe_models", "describe_customized", "list_models", "register", "scale",
           "unregister", "set_default", "traffic", "set_traffic", "set_shadow", "clear_shadow", "rollback",
           "PROCESSING", "MODEL_API_OFF"]

PROCESSING = {"status": "Processing worker updates..."}  # answered 202 (REST)
RUNTIMES = ("python", "python3")  # TorchServe's RuntimeType values Osprey runs ("LSP", its C++ backend, is not one)
_WORKER_STATUS = {InstanceStatus.READY: "READY", InstanceStatus.STOPPED: "UNLOADING",
                  InstanceStatus.LOADING: "LOADING", InstanceStatus.FAILED: "FAILED"}


log = logging.getLogger("osprey.management")

MODEL_API_OFF = "Model API disabled: start the server with --enable-model-api (enable_model_api=true)"


def require_model_api(enabled: bool, message: str = METHOD_NOT_ALLOWED_TEXT) -> None:
    """Registering and unregistering over the network is off unless --enable-model-api.

    Answered as TorchServe 0.12 answers it: over REST 405 with its fixed MethodNotAllowedException
    text (its clients compare the body verbatim), over gRPC PERMISSION_DENIED "Model API
    disabled" (its words, then how to turn it on). ``message``: the REST text for APIs that
    are not TorchServe's (the Open Inference Protocol's repository load/unload)."""
    if not enabled:
        global _OFF_LOGGED
        if not _OFF_LOGGED:  # the REST answer is TorchServe's fixed text: the log says what to do
            _OFF_LOGGED = True
            log.warning("a request to register or unregister a model was refused: %s (logged once)", MODEL_API_OFF)
        raise OspreyError(ErrorKind.METHOD_NOT_ALLOWED, message, grpc=("PERMISSION_DENIED", MODEL_API_OFF))


_OFF_LOGGED = False


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def worker_settings(cfg: Any) -> dict[str, Any]:
    """A version's workers and batching as TorchServe names them (describe, config snapshots)."""
    return {
        "minWorkers": cfg.min_workers,
        "maxWorkers": cfg.max_workers,
        "batchSize": cfg.batch_size,
        "maxBatchDelay": _number(cfg.max_batch_delay_ms),
        "responseTimeout": _number(cfg.response_timeout_s),
        "startupTimeout": _number(cfg.startup_timeout_s),
    }


def describe(mv: ModelVersion) -> dict[str, Any]:
    """One model version as TorchServe's describe API shows it."""
    cfg = mv.config
    pid = os.getpid()
    workers = [{
        "id": inst.id,
        "startTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(inst.start_time)),
        "status": _WORKER_STATUS.get(inst.status, str(inst.status)),
        "memoryUsage": 0,
        "pid": inst.pid or pid,
        "gpu": inst.gpu_id is not None,
        "gpuUsage": "N/A" if inst.gpu_id is None else f"gpuId::{inst.gpu_id}",
    } for inst in mv.instances]
    pending = mv.batcher.pending
    return {
        "modelName": mv.name,
        "modelVersion": mv.version,
        "modelUrl": mv.url,
        "runtime": mv.archive.manifest.get("runtime", "python"),
        **worker_settings(cfg),
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": int(cfg.client_timeout_ms or 0),
        "parallelType": "",
        "parallelLevel": 0,
        "deviceType": "gpu" if any(i.gpu_id is not None for i in mv.instances) else "cpu",
        "continuousBatching": False,
        "useJobTicket": False,
        "useVenv": False,
        "stateful": False,
        "sequenceMaxIdleMSec": 0,
        "sequenceTimeoutMSec": 0,
        "maxNumSequence": 0,
        "maxSequenceJobQueueSize": 0,
        "loadedAtStartup": mv.loaded_at_startup,
        "healthy": mv.unhealthy is None,
        "unhealthyReason": mv.unhealthy,
        "isolation": mv.isolation,
        "restarts": mv.restarts,
        "handler": mv.handler,
        "workers": workers,
        "jobQueueStatus": {"remainingCapacity": max(mv.batcher.queue_size - pending, 0),
                           "pendingRequests": pending},
    }


def describe_models(registry: Registry, name: str, version: str | None) -> list[dict[str, Any]]:
    """``GET /models/{m}[/{v}|/all]``: a JSON array, as TorchServe answers."""
    versions = registry.versions(name) if version == "all" else [registry.get(name, version)]
    routing = registry.traffic(name)  # Osprey's: default, canary weights and shares, shadow, earlier defaults
    return [{**describe(mv), "routing": routing} for mv in versions]


CustomMetadata = Callable[[ModelVersion, dict], Awaitable[dict]]


async def describe_customized(registry: Registry, name: str, version: str | None, custom: CustomMetadata,
                              headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``GET /models/{m}[/{v}]?customized=true``: the version described as above, with
    ``customizedMetadata``, what its handler's ``describe_handle()`` answers (``custom``: the
    data plane's :meth:`~server.core.dataplane.DataPlane.describe_handle`, which runs it as
    TorchServe's worker does, through the version's queue), the description made once it has
    answered. A handler that fails fails the call, as in TorchServe (503 "Prediction failed").
    ``/all`` is described without it, as TorchServe 0.12 does."""
    if version == "all":
        return describe_models(registry, name, version)
    metadata = await custom(registry.get(name, version), headers or {})
    mv = registry.get(name, version)  # afresh: the description as of the answer (unregistered meanwhile: 404)
    return [{**describe(mv), "customizedMetadata": metadata, "routing": registry.traffic(name)}]


def list_models(registry: Registry, limit: int, token: int) -> dict[str, Any]:
    """``GET /models?limit=&next_page_token=``: at most 100 a page. As in TorchServe, a limit
    below 0 or above 100 is 100 and a negative token is 0 (limit=0: an empty page)."""
    if limit < 0 or limit > 100:
        limit = 100
    page, nxt = registry.list_page(limit, max(token, 0))
    body: dict[str, Any] = {}
    if nxt is not None:
        body["nextPageToken"] = str(nxt)
    body["models"] = [{"modelName": mv.name, "modelUrl": mv.url} for mv in page]
    return body


def _check_runtime(runtime: str | None) -> None:
    if runtime is None or runtime in RUNTIMES:
        return
    if runtime == "LSP":
        raise OspreyError(ErrorKind.BAD_INPUT, "Runtime LSP (TorchServe's C++ backend) is not supported; "
                                               "Osprey runs Python handlers (runtime python or python3)")
    shown = runtime if len(runtime) <= 64 and runtime.isprintable() else show(runtime)
    raise OspreyError(ErrorKind.BAD_INPUT, f"Invalid RuntimeType value: {shown}")  # TorchServe's words


async def register(registry: Registry, enabled: bool, url: str | None, *, synchronous: bool,
                   runtime: str | None = None, initial_workers: int | None = None,
                   **options: Any) -> dict[str, Any]:
    """``POST /models``. ``url`` None: not given (400); "" given empty (404 "empty url", as
    TorchServe answers; gRPC cannot tell the two apart and its "" is "not given").

    Workers, as TorchServe decides them: ``initial_workers``, else the archive's minWorkers,
    else default_workers_per_model, where 0 (TorchServe's "not configured") starts none and
    answers 200 "registered with 0 initial workers. Use scale workers API..." even when
    ``synchronous`` is false (nothing is left to do in the background). A negative
    ``initial_workers`` is taken as not given with a default of 0, as TorchServe takes it.
    An asynchronous register that starts workers answers :data:`PROCESSING` (202)."""
    require_model_api(enabled)
    if url is None:
        raise OspreyError(ErrorKind.BAD_INPUT, "Parameter url is required.")
    if url == "":
        raise OspreyError(ErrorKind.NOT_FOUND, "empty url")
    _check_runtime(runtime)
    default_workers = registry.settings.default_workers_per_model
    if isinstance(initial_workers, int) and not isinstance(initial_workers, bool) and initial_workers < 0:
        initial_workers, default_workers = None, 0
    try:
        mv = await registry.register(url, synchronous=synchronous, runtime=runtime, initial_workers=initial_workers,
                                     default_workers=default_workers, **options)
    except OspreyError as exc:
        if exc.kind is ErrorKind.CONFLICT and exc.grpc is None:
            # A version already registered: REST 409, as in TorchServe. Its gRPC API answers
            # UNKNOWN with no message (a quirk: its ManagementImpl lets the ConflictStatusException
            # escape); the status is matched, the message is kept.
            exc.grpc = ("UNKNOWN", exc.message)
        raise
    if mv.config.min_workers == 0:
        return {"status": f"Model \"{mv.name}\" Version: {mv.version} registered with 0 initial workers. "
                          "Use scale workers API to add workers for the model."}
    if not synchronous:
        return PROCESSING
    return {"status": f"Model \"{mv.name}\" Version: {mv.version} registered with "
                      f"{len(mv.instances)} initial workers"}


async def scale(registry: Registry, name: str, version: str | None, min_worker: int | None,
                max_worker: int | None, *, synchronous: bool) -> dict[str, Any]:
    """``PUT /models/{m}[/{v}]``. A negative ``min_worker`` is answered 500, as TorchServe
    answers it (its quirk: an IndexOutOfBoundsException in its worker manager, not a rule it
    checks); a synchronous scale whose workers fail to start is 500 "Failed to start workers
    for model M version: V" (TorchServe's words; V is "null" when the call named no version),
    followed by why."""
    if min_worker is not None and min_worker < 0:
        registry.get(name, version)  # an unknown model or version is 404 first, as in TorchServe
        raise OspreyError(ErrorKind.INTERNAL, f"Cannot scale model {name} to {min_worker} workers: "
                                              "min_worker must not be negative")
    _, lo, hi = registry.plan_scale(name, version, min_worker, max_worker)  # errors now, not later
    if not synchronous:
        registry.scale_in_background(name, version, lo, hi)
        return PROCESSING
    try:
        await registry.scale(name, version, lo, hi)
    except OspreyError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:  # unregistered meanwhile
            raise
        raise OspreyError(ErrorKind.INTERNAL, f"Failed to start workers for model {name} version: "
                                              f"{version or 'null'} ({exc.message})") from None
    return {"status": f"Workers scaled to {lo} for model: {name}" + (f", version: {version}" if version else "")}


async def unregister(registry: Registry, enabled: bool, name: str, version: str | None) -> dict[str, Any]:
    require_model_api(enabled)
    await registry.unregister(name, version)
    return {"status": f"Model \"{name}\" unregistered"}


async def _routing_change(registry: Registry, name: str, change: Callable[[], Any]) -> Any:
    """A change of a model's routing: made here, or, with replicas sharing their routing in
    Redis (``registry.shared``), made on top of the shared state and published to every replica
    before the call is answered (server.shared_routing)."""
    if registry.shared is None:
        return change()
    return await registry.shared.change(name, change)


async def set_default(registry: Registry, name: str, version: str) -> dict[str, Any]:
    await _routing_change(registry, name, lambda: registry.set_default(name, version))
    return {"status": f"Default version successfully updated for model \"{name}\" to \"{version}\""}


# --- traffic: canary weights, shadow, rollback (Osprey's own, not TorchServe's) ---------
def _body_object(body: Any, fields: tuple[str, ...], example: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OspreyError(ErrorKind.BAD_INPUT, f"request body must be a JSON object like {example}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise OspreyError(ErrorKind.BAD_INPUT, f"unknown field(s) {', '.join(map(repr, unknown))} in the request body; "
                                               f"expected {example}")
    return body


def traffic(registry: Registry, name: str) -> dict[str, Any]:
    """``GET /models/{m}/traffic``: default, weights, shares, shadow, previous defaults."""
    return registry.traffic(name)


async def set_traffic(registry: Registry, name: str, body: Any) -> dict[str, Any]:
    """``PUT /models/{m}/traffic`` with ``{"weights": {"1.0": 90, "2.0": 10}}``; ``{}`` or null
    weights send everything to the default again."""
    example = '{"weights": {"1.0": 90, "2.0": 10}}'
    body = _body_object(body, ("weights",), example)
    if "weights" not in body:
        raise OspreyError(ErrorKind.BAD_INPUT, f"field 'weights' is required: {example}, or {{\"weights\": {{}}}} "
                                               "to send every request to the default version")
    weights = body["weights"]
    return await _routing_change(registry, name, lambda: registry.set_traffic(name, weights))


async def set_shadow(registry: Registry, name: str, body: Any) -> dict[str, Any]:
    """``PUT /models/{m}/shadow`` with ``{"version": "2.0"}``."""
    example = '{"version": "2.0"}'
    version = _body_object(body, ("version",), example).get("version")
    if not isinstance(version, str) or not version:
        raise OspreyError(ErrorKind.BAD_INPUT, f"field 'version' must be a version string, got {show(version)} "
                                               f"(e.g. {example}; DELETE /models/{name}/shadow stops the copies)")
    return await _routing_change(registry, name, lambda: registry.set_shadow(name, version))


async def clear_shadow(registry: Registry, name: str) -> dict[str, Any]:
    """``DELETE /models/{m}/shadow``."""
    return await _routing_change(registry, name, lambda: registry.set_shadow(name, None))


async def rollback(registry: Registry, name: str) -> dict[str, Any]:
    """``POST /models/{m}/rollback``: the previous default becomes the default again."""
    def change() -> tuple[str, str]:
        return registry.default_version(name), registry.rollback(name)
    old, version = await _routing_change(registry, name, change)
    return {"status": f"Model \"{name}\" rolled back from version \"{old}\" to \"{version}\"",
            "model": name, "default": version, "previous": old}
