"""The ``retraining:`` section of model-config.yaml, typed and checked.

What starts a job (``triggers``, ``cooldown``, ``min_labels``), how the worker trains
(``entry_point``, ``hyperparameters``, ``search``), what a challenger must beat (``gate``) and
how it reaches traffic (``promotion``). Every value is checked; an unknown key is refused with
its full path (``retraining.gate.min_improvment``), so a typo fails the register call (400)
instead of silently keeping a default. The section absent: no retraining for that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from server.core.errors import ErrorKind, OspreyError, show

__all__ = ["RetrainingConfig", "GateConfig", "PromotionConfig", "SearchConfig", "parse_retraining",
           "TRIGGERS", "POLICIES", "METRICS", "TOO_FEW_LABELS"]

#: a job's result "reason" when it ended rejected for fewer labelled rows than min_labels: it used no
#: data and trained nothing, so it does not hold the model's cooldown (server/retraining/triggers.py)
TOO_FEW_LABELS = "too_few_labels"

TRIGGERS = ("drift", "quality", "latency", "manual", "alert")
POLICIES = ("canary", "shadow", "direct")
METRICS = ("accuracy", "f1", "precision", "recall", "roc_auc", "log_loss", "mse", "mae", "r2",
           "reconstruction_error", "centroid_accuracy")
WEEK_S = 7 * 24 * 3600


@dataclass(frozen=True)
class SearchConfig:
    """A bounded hyperparameter search: ``trials`` draws (random) or the grid's points, best on
    the validation split (never on the gate's holdout). ``trials: 0``: no search."""

    trials: int = 0
    method: str = "random"  # random | grid
    space: Mapping[str, tuple] = field(default_factory=dict)  # name -> candidate values
    seed: int = 0


@dataclass(frozen=True)
class GateConfig:
    """What a challenger must do to replace the champion (same data for both)."""

    metric: str | None = None  # None: accuracy for classifiers, mse for regression
    # on the held-back fresh labelled rows; scores (accuracy, f1...) absolute, errors (mse, mae) relative
    min_improvement: float = 0.01
    max_regression: float = 0.02  # on the golden set (the archive's reference data), measured the same way
    max_latency_ratio: float = 1.5  # challenger / champion latency at batch 1 and batch 32
    max_size_ratio: float = 2.0  # challenger / champion archive size
    # with min_improvement >= 0: the share of bootstrap resamples of the holdout rows in which the
    # challenger must come out better (0: no such check); a one-row difference is not evidence
    confidence: float = 0.9
    # "module:function" judging models whose answers no label checks (generators): see
    # server/retraining/scoring.py; None: training.json's "scorer", if any
    scorer: str | None = None


@dataclass(frozen=True)
class PromotionConfig:
    """How a challenger that passed the gate reaches traffic, and when it is rolled back."""

    policy: str = "canary"  # canary | shadow | direct
    canary_share: float = 0.1  # share of live traffic the challenger takes during canary
    min_requests: int = 200  # the challenger serves at least this many requests ...
    min_seconds: float = 30.0  # ... and at least this long before it is judged
    max_seconds: float = 600.0  # judged (or abandoned, rejected) by then
    probation_s: float = 300.0  # after promotion: automatic rollback if it degrades within this
    max_error_rate_increase: float = 0.01  # challenger error rate - champion's
    max_latency_ratio: float = 1.5  # challenger / champion mean latency
    max_quality_drop: float = 0.02  # live quality (where labels arrive), champion - challenger


@dataclass(frozen=True)
class RetrainingConfig:
    enabled: bool = True
    triggers: tuple[str, ...] = ("drift", "quality", "manual", "alert")  # latency: off by default
    cooldown_s: float = 3600.0  # yaml: cooldown; no second automatic job for the model within this
    min_labels: int = 200  # labelled production rows a job needs (else it ends rejected, saying so)
    holdout: float = 0.3  # share of labelled rows held back for the gate
    entry_point: str | None = None  # module:function; None: training.json's entry_point
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    max_attempts: int = 3  # runs of a job whose failure may pass (RetryableError)
    backoff_s: float = 10.0  # first retry delay, doubled per attempt
    timeout_s: float = 3600.0  # a job running longer is stopped and failed
    capture_share: float = 1.0  # share of answered requests whose inputs are held for their labels
    max_held: int = 100_000  # most inputs held (waiting for a label) per model, in one process
    max_held_mb: float = 256.0  # ... and at most this many MB of them (oldest dropped first)
    max_rows: int = 50_000  # labelled rows kept per model (oldest dropped first)


def _bad(where: str, msg: str) -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, f"{where} {msg}")


def _num(where: str, value: Any, kind=float, low: float = 0.0, high: float = 1e9) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, f"must be a number from {low:g} to {high:g}, got {show(value)}")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise _bad(where, f"must be a whole number, got {show(value)}")
    if not (low <= value <= high):  # also refuses NaN
        raise _bad(where, f"must be from {low:g} to {high:g}, got {show(value)}")
    return kind(value)


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _bad(where, f"must be one of {', '.join(allowed)}, got {show(value)}")
    return value


def _mapping(where: str, raw: Any, cls) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise _bad(where, f"must be a mapping of settings, got {show(raw)}")
    known = {f.name for f in fields(cls)}
    aliases = {"cooldown": "cooldown_s", "probation": "probation_s", "backoff": "backoff_s", "timeout": "timeout_s"}
    out = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name not in known:
            shown = sorted({k for k in known} | {a for a, n in aliases.items() if n in known})
            raise _bad(f"{where}.{key}", f"is not a setting; known: {', '.join(shown)}")
        out[name] = value
    return out


def _search(where: str, raw: Any) -> SearchConfig:
    vals = _mapping(where, raw, SearchConfig)
    out: dict[str, Any] = {}
    for key, value in vals.items():
        w = f"{where}.{key}"
        if key == "trials":
            out[key] = _num(w, value, int, 0, 100)
        elif key == "seed":
            out[key] = _num(w, value, int, 0, 2**31 - 1)
        elif key == "method":
            out[key] = _choice(w, value, ("random", "grid"))
        else:  # space
            if not isinstance(value, Mapping) or not value:
                raise _bad(w, f"must map each hyperparameter to a list of values, got {show(value)}")
            space = {}
            for name, cand in value.items():
                if not isinstance(cand, list) or not cand:
                    raise _bad(f"{w}.{name}", f"must be a non-empty list of values, got {show(cand)}")
                space[str(name)] = tuple(cand)
            out[key] = space
    cfg = SearchConfig(**out)
    if cfg.trials and not cfg.space:
        raise _bad(where, "has trials but no space to draw them from")
    return cfg


def _gate(where: str, raw: Any) -> GateConfig:
    out: dict[str, Any] = {}
    for key, value in _mapping(where, raw, GateConfig).items():
        w = f"{where}.{key}"
        if key == "metric":
            out[key] = None if value is None else _choice(w, value, METRICS)
        elif key == "scorer":
            if value is not None and (not isinstance(value, str) or value.count(":") != 1
                                      or not all(p.strip() for p in value.split(":"))):
                raise _bad(w, f"must be 'module:function' (e.g. examples.digits_vae:judge), got {show(value)}")
            out[key] = value
        elif key in ("min_improvement", "max_regression"):
            out[key] = _num(w, value, float, -1e6, 1e6)
        elif key == "confidence":
            out[key] = _num(w, value, float, 0.0, 0.999)
        else:
            out[key] = _num(w, value, float, 1.0, 1000.0)
    return GateConfig(**out)


def _promotion(where: str, raw: Any) -> PromotionConfig:
    out: dict[str, Any] = {}
    for key, value in _mapping(where, raw, PromotionConfig).items():
        w = f"{where}.{key}"
        if key == "policy":
            out[key] = _choice(w, value, POLICIES)
        elif key == "canary_share":
            out[key] = _num(w, value, float, 0.001, 1.0)
        elif key == "min_requests":
            out[key] = _num(w, value, int, 0, 10_000_000)
        elif key in ("min_seconds", "max_seconds", "probation_s"):
            out[key] = _num(w, value, float, 0.0, WEEK_S)
        elif key == "max_latency_ratio":
            out[key] = _num(w, value, float, 1.0, 1000.0)
        else:
            out[key] = _num(w, value, float, 0.0, 1.0)
    cfg = PromotionConfig(**out)
    if cfg.max_seconds < cfg.min_seconds:
        raise _bad(where, f"max_seconds ({cfg.max_seconds:g}) is below min_seconds ({cfg.min_seconds:g})")
    return cfg


def parse_retraining(raw: Any, source: str = "model-config.yaml") -> RetrainingConfig | None:
    """The section (None when absent or ``false``); BAD_INPUT naming the key when it is wrong."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return RetrainingConfig()
    where = f"{source}: retraining"
    out: dict[str, Any] = {}
    for key, value in _mapping(where, raw, RetrainingConfig).items():
        w = f"{where}.{key}"
        if key == "enabled":
            if not isinstance(value, bool):
                raise _bad(w, f"must be true or false, got {show(value)}")
            out[key] = value
        elif key == "triggers":
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise _bad(w, f"must be a list of {', '.join(TRIGGERS)}, got {show(value)}")
            for t in value:
                _choice(w, t, TRIGGERS)
            out[key] = tuple(dict.fromkeys(value))
        elif key == "cooldown_s":
            out[key] = _num(f"{where}.cooldown", value, float, 0.0, 30 * 24 * 3600)
        elif key == "min_labels":
            out[key] = _num(w, value, int, 1, 10_000_000)
        elif key == "holdout":
            out[key] = _num(w, value, float, 0.05, 0.9)
        elif key == "entry_point":
            if value is not None and (not isinstance(value, str) or ":" not in value):
                raise _bad(w, f"must be module:function, got {show(value)}")
            out[key] = value
        elif key == "hyperparameters":
            if not isinstance(value, Mapping):
                raise _bad(w, f"must be a mapping of name: value, got {show(value)}")
            out[key] = dict(value)
        elif key == "search":
            out[key] = _search(w, value)
        elif key == "gate":
            out[key] = _gate(w, value)
        elif key == "promotion":
            out[key] = _promotion(w, value)
        elif key == "max_attempts":
            out[key] = _num(w, value, int, 1, 100)
        elif key == "backoff_s":
            out[key] = _num(f"{where}.backoff", value, float, 0.0, 24 * 3600)
        elif key == "timeout_s":
            out[key] = _num(f"{where}.timeout", value, float, 1.0, WEEK_S)
        elif key == "capture_share":
            out[key] = _num(w, value, float, 0.0, 1.0)
        elif key in ("max_held", "max_rows"):
            out[key] = _num(w, value, int, 1, 10_000_000)
        elif key == "max_held_mb":
            out[key] = _num(w, value, float, 1.0, 1_000_000)
    return RetrainingConfig(**out)
