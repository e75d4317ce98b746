"""Per-model settings from model-config.yaml and the register call, typed and checked.

Every number is checked against a range (:data:`LIMITS`): NaN, infinity, negatives and
values too large to serve (or to write back as JSON) are refused with a message naming the
setting, so a bad value fails the register call instead of a later request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from server.core.errors import ErrorKind, OspreyError, show

__all__ = ["ModelConfig", "TensorSpec", "parse_model_config", "number", "LIMITS"]

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "BF16", "FP32", "FP64", "BYTES")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelConfig:
    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: float = 100.0
    response_timeout_s: float = 120.0
    startup_timeout_s: float = 120.0
    device_type: str = "auto"  # auto | cpu | gpu
    device_ids: tuple[int, ...] = ()
    job_queue_size: int = 100
    client_timeout_ms: float | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    jit_optimize: bool | None = None  # TorchScript profiling executor; None: off on CPU, on on GPU
    isolation: str | None = None  # thread | process; None: the server's instance_isolation
    raw: Mapping[str, Any] = field(default_factory=dict)  # everything, for the handler


WEEK_S = 7 * 24 * 3600

# Largest value each setting takes (units as in model-config.yaml).
LIMITS: dict[str, float] = {
    "batchSize": 100_000,
    "maxBatchDelay": 3_600_000,  # ms: one hour
    "responseTimeout": WEEK_S,  # s
    "startupTimeout": WEEK_S,  # s
    "jobQueueSize": 1_000_000,
    "clientTimeoutInMills": WEEK_S * 1000,  # ms
    "maxWorkers": 2**31 - 1,  # only recorded (Osprey starts minWorkers); TorchServe's Java int
}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def number(source: str, key: str, value: Any, kind=int, minimum: float = 0,
           maximum: float | None = None, maximum_from: str = "") -> Any:
    """``value`` as ``kind`` (int or float) within [minimum, maximum], else a BAD_INPUT error
    naming ``key`` (and ``maximum_from``, the setting the maximum comes from, if given).
    Strings are parsed; NaN, infinity and (for int) fractions are refused."""
    if maximum is None:
        maximum = LIMITS.get(key, math.inf)
    where = f"{source}: {key}" if source else key
    span = f">= {_fmt(minimum)}" if math.isinf(maximum) else f"from {_fmt(minimum)} to {_fmt(maximum)}"
    if maximum_from:
        span += f" (the server's {maximum_from})"
    bad = OspreyError(ErrorKind.BAD_INPUT, f"{where} must be a {'whole ' if kind is int else ''}number "
                                           f"{span}, got {show(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        as_float = float(value)
    except (ValueError, OverflowError):
        as_float = None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)  # exact, however long
        except ValueError:
            if as_float is None:
                raise bad from None
            value = as_float
    if isinstance(value, float):
        if not math.isfinite(value) or (kind is int and not value.is_integer()):
            raise bad
    elif as_float is None:  # an int too large for a float
        raise bad
    if not minimum <= value <= maximum:
        raise bad
    return kind(value)


def _tensors(source: str, key: str, value: Any) -> tuple[TensorSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: {key} must be a list of {{name, datatype, shape}}")
    specs = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or "name" not in item:
            raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: {key}[{i}] needs a name")
        dt = str(item.get("datatype", "FP32")).upper()
        if dt not in DATATYPES:
            raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: {key}[{i}] datatype {dt!r} is not one of {', '.join(DATATYPES)}")
        shape = item.get("shape", [-1])
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: {key}[{i}] shape must be a list of integers (-1 for variable)")
        specs.append(TensorSpec(str(item["name"]), dt, tuple(shape)))
    return tuple(specs)


def parse_model_config(raw: Mapping[str, Any] | None, *, overrides: Mapping[str, Any] | None = None,
                       default_workers: int = 1, default_response_timeout: float = 120.0,
                       default_queue_size: int = 100, source: str = "model-config.yaml",
                       worker_cap: int | None = None) -> ModelConfig:
    """Merge model-config.yaml with register-call overrides (overrides win).

    ``worker_cap`` (the server's max_workers_per_model) bounds minWorkers, the instances
    Osprey starts; without minWorkers it starts ``default_workers`` cut to the cap.
    maxWorkers is only recorded, so it may exceed the cap, as in TorchServe."""
    cfg = dict(raw or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            cfg[key] = value
    cap = LIMITS["maxWorkers"] if worker_cap is None else worker_cap
    if "minWorkers" in cfg:
        min_w = number(source, "minWorkers", cfg["minWorkers"], maximum=cap,
                       maximum_from="" if worker_cap is None else "max_workers_per_model")
    else:
        min_w = min(default_workers, cap)
    max_w = number(source, "maxWorkers", cfg.get("maxWorkers", max(min_w, default_workers)))
    if max_w < min_w:
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: maxWorkers ({max_w}) is below minWorkers ({min_w})")
    device = str(cfg.get("deviceType", "auto")).lower()
    if device not in ("auto", "cpu", "gpu", "cuda"):
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: deviceType must be cpu or gpu, got {device!r}")
    ids = cfg.get("deviceIds") or ()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: deviceIds must be a list of integers")
    client_timeout = cfg.get("clientTimeoutInMills")
    jit_optimize = cfg.get("jit_optimize")
    if jit_optimize is not None and not isinstance(jit_optimize, bool):
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: jit_optimize must be true or false, got {jit_optimize!r}")
    isolation = cfg.get("isolation")
    if isolation is not None and isolation not in ("thread", "process"):
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: isolation must be thread or process, got {show(isolation)}")
    return ModelConfig(
        min_workers=min_w,
        max_workers=max_w,
        batch_size=number(source, "batchSize", cfg.get("batchSize", 1), minimum=1),
        max_batch_delay_ms=number(source, "maxBatchDelay", cfg.get("maxBatchDelay", 100), float),
        response_timeout_s=number(source, "responseTimeout", cfg.get("responseTimeout", default_response_timeout), float, minimum=0.001),
        startup_timeout_s=number(source, "startupTimeout", cfg.get("startupTimeout", 120), float, minimum=0.001),
        device_type="gpu" if device == "cuda" else device,
        device_ids=tuple(ids),
        job_queue_size=number(source, "jobQueueSize", cfg.get("jobQueueSize", default_queue_size), minimum=1),
        client_timeout_ms=None if client_timeout is None else number(source, "clientTimeoutInMills", client_timeout, float),
        inputs=_tensors(source, "inputs", cfg.get("inputs")),
        outputs=_tensors(source, "outputs", cfg.get("outputs")),
        jit_optimize=jit_optimize,
        isolation=isolation,
        raw=cfg,
    )
