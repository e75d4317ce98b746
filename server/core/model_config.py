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
from server.core.retraining_config import RetrainingConfig, parse_retraining

__all__ = ["ModelConfig", "MonitoringConfig", "TensorSpec", "parse_model_config", "parse_monitoring", "number",
           "LIMITS"]

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
class MonitoringConfig:
    """The ``monitoring:`` section of model-config.yaml (drift, feedback, live quality).

    Defaults work for the examples unchanged; see monitoring/README.md for what each does."""

    enabled: bool = True
    sample_rate: float = 1.0  # share of requests whose features are captured
    window: int = 500  # requests per analysis window
    window_seconds: float | None = None  # also close a window after this long (if it has min_window rows)
    min_window: int = 50  # fewest requests a time-closed window must hold to be analysed
    baseline_requests: int = 1000  # without a reference profile: the first requests become the baseline
    max_features: int = 50  # most features (inputs + predictions) monitored per version
    bins: int = 5  # quantile bins per numeric feature in a profile (benchmarks/DRIFT.md: 5 halves the noise)
    components: int = 5  # projection components of embeddings / penultimate activations
    layer: str | None = None  # the module whose output is the penultimate activation (None: found)
    method: str = "psi"  # psi | jensenshannon | wasserstein (per-feature distance)
    threshold: float | None = None  # per-feature distance threshold (None: the method's default)
    small_window_alpha: float = 0.01  # family-wise false-alarm rate of the chi-square test on small windows
    drift_share: float = 0.0  # a window drifted when this share of its input features drifted (0: any one) ...
    prediction_drift: str = "any"  # ... or (any) a prediction feature drifted; share: predictions count in the share; ignore
    episode_windows: int = 3  # n: the last n windows are looked at ...
    episode_drifted: int = 2  # k: ... and an episode opens when k of them drifted
    episode_clean: int = 3  # m: an open episode closes after m clean windows in a row
    feedback_ttl: float = 86400.0  # seconds a prediction is kept for joining its label
    max_predictions: int = 100_000  # most predictions kept for joins per version
    min_labels: int = 200  # fewest labels before quality is judged
    quality_window: int = 500  # labelled predictions per quality window
    quality_tolerance: float = 0.05  # degraded when a metric is worse than its baseline by more than this
    features: tuple[str, ...] = ()  # only these input features (empty: all the handler gives, up to max_features)


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
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    retraining: RetrainingConfig | None = None  # the retraining: section (None: no retraining)
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
        monitoring=parse_monitoring(cfg.get("monitoring"), source),
        retraining=parse_retraining(cfg.get("retraining"), source),
        raw=cfg,
    )


_METHODS = ("psi", "jensenshannon", "wasserstein")


def parse_monitoring(raw: Any, source: str = "model-config.yaml") -> MonitoringConfig:
    """The ``monitoring:`` section, every value checked; unknown keys are refused by name."""
    if raw is None:
        return MonitoringConfig()
    if raw is False or raw is True:
        return MonitoringConfig(enabled=bool(raw))
    if not isinstance(raw, Mapping):
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: monitoring must be a mapping of settings, got {show(raw)}")
    fields = {f.name: f for f in MonitoringConfig.__dataclass_fields__.values()}
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise OspreyError(ErrorKind.BAD_INPUT, f"{source}: monitoring has unknown setting(s) {', '.join(unknown)}; "
                                               f"known: {', '.join(sorted(fields))}")
    where = f"{source}: monitoring"
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "enabled":
            if not isinstance(value, bool):
                raise OspreyError(ErrorKind.BAD_INPUT, f"{where}.enabled must be true or false, got {show(value)}")
            out[key] = value
        elif key == "prediction_drift":
            if value not in ("any", "share", "ignore"):
                raise OspreyError(ErrorKind.BAD_INPUT, f"{where}.prediction_drift must be any, share or ignore, "
                                                       f"got {show(value)}")
            out[key] = value
        elif key in ("layer", "method"):
            if value is not None and not isinstance(value, str):
                raise OspreyError(ErrorKind.BAD_INPUT, f"{where}.{key} must be a string, got {show(value)}")
            if key == "method" and value not in _METHODS:
                raise OspreyError(ErrorKind.BAD_INPUT, f"{where}.method must be one of {', '.join(_METHODS)}, "
                                                       f"got {show(value)}")
            out[key] = value
        elif key == "features":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise OspreyError(ErrorKind.BAD_INPUT, f"{where}.features must be a list of feature names")
            out[key] = tuple(value)
        elif key in ("sample_rate", "drift_share"):
            out[key] = number(where, key, value, float, maximum=1.0)
        elif key == "small_window_alpha":
            out[key] = number(where, key, value, float, minimum=1e-6, maximum=0.5)
        elif key in ("quality_tolerance", "threshold"):
            out[key] = None if value is None and key == "threshold" else number(where, key, value, float, maximum=1e6)
        elif key in ("window_seconds",):
            out[key] = None if value is None else number(where, key, value, float, minimum=0.001, maximum=WEEK_S)
        elif key == "feedback_ttl":
            out[key] = number(where, key, value, float, minimum=1, maximum=30 * 24 * 3600)
        else:  # whole numbers
            low = 0 if key in ("baseline_requests",) else 1
            out[key] = number(where, key, value, int, minimum=low, maximum=10_000_000)
    cfg = MonitoringConfig(**out)
    if cfg.episode_drifted > cfg.episode_windows:
        raise OspreyError(ErrorKind.BAD_INPUT, f"{where}: episode_drifted ({cfg.episode_drifted}) is more than "
                                               f"episode_windows ({cfg.episode_windows})")
    return cfg
