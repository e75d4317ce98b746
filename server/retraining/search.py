"""A bounded hyperparameter search: ``trials`` draws from ``space``, random or grid.

``space`` maps a hyperparameter to its candidate values: a non-empty list (``lr: [0.001,
0.003]``), or for random search a range ``{low: 0.0001, high: 0.01, log: true}`` (uniform,
or log-uniform with ``log``; ``int: true`` rounds). Grid search walks the lists' product in
order and stops after ``trials`` combinations (ranges are not allowed in a grid). Random
search draws ``trials`` combinations with a seeded generator, without repeating one while
there are unused ones. Each trial is trained and scored on the validation split (never the
gate's holdout); the best is kept (:func:`server.retraining.training.run_training`).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from server.core.retraining_config import SearchConfig

__all__ = ["SearchConfig", "search_config", "draws"]

MAX_TRIALS = 100


def search_config(cfg: Any = None) -> SearchConfig:
    """A checked :class:`~server.core.retraining_config.SearchConfig` from None, a dict or an
    object with those attributes (``RetrainingConfig.search``; ranges are allowed here)."""
    if cfg is None:
        return SearchConfig()
    if isinstance(cfg, dict):
        unknown = set(cfg) - set(SearchConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"search: unknown setting {sorted(unknown)[0]!r}; known: trials, method, space, seed")
        get = cfg.get
    else:
        get = lambda k, d: getattr(cfg, k, d)  # noqa: E731
    trials, method, space, seed = get("trials", 0), get("method", "random"), get("space", {}) or {}, get("seed", 0)
    if isinstance(trials, bool) or not isinstance(trials, int) or not 0 <= trials <= MAX_TRIALS:
        raise ValueError(f"search.trials must be an integer 0..{MAX_TRIALS}, got {trials!r}")
    if method not in ("random", "grid"):
        raise ValueError(f"search.method must be random or grid, got {method!r}")
    if not isinstance(space, dict):
        raise ValueError(f"search.space must map hyperparameters to lists of values, got {type(space).__name__}")
    if trials and not space:
        raise ValueError("search.trials is set but search.space names no hyperparameter")
    for name, values in space.items():
        if isinstance(values, dict):
            if method == "grid":
                raise ValueError(f"search.space.{name}: a range needs method random; a grid takes a list of values")
            low, high = values.get("low"), values.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low <= high:
                raise ValueError(f"search.space.{name}: a range needs numbers low <= high, got {values!r}")
            if values.get("log") and low <= 0:
                raise ValueError(f"search.space.{name}: a log range needs low > 0")
            extra = set(values) - {"low", "high", "log", "int"}
            if extra:
                raise ValueError(f"search.space.{name}: unknown key {sorted(extra)[0]!r} (low, high, log, int)")
        elif not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"search.space.{name} must be a non-empty list of values, got {values!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"search.seed must be an integer, got {seed!r}")
    return SearchConfig(trials=trials, method=method, space=dict(space), seed=seed)


def _draw(rng: random.Random, spec: Any) -> Any:
    if isinstance(spec, dict):
        low, high = float(spec["low"]), float(spec["high"])
        v = math.exp(rng.uniform(math.log(low), math.log(high))) if spec.get("log") else rng.uniform(low, high)
        return int(round(v)) if spec.get("int") else v
    return spec[rng.randrange(len(spec))]


def draws(cfg: Any) -> list[dict[str, Any]]:
    """The hyperparameter combinations to try, in order ([] when the search is off)."""
    cfg = search_config(cfg)
    if not cfg.trials:
        return []
    names = list(cfg.space)
    if cfg.method == "grid":
        combos = itertools.islice(itertools.product(*(cfg.space[n] for n in names)), cfg.trials)
        return [dict(zip(names, c)) for c in combos]
    rng = random.Random(cfg.seed)
    finite = all(isinstance(cfg.space[n], (list, tuple)) for n in names)
    total = math.prod(len(cfg.space[n]) for n in names) if finite else None
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < cfg.trials:
        combo = {n: _draw(rng, cfg.space[n]) for n in names}
        key = repr(sorted(combo.items()))
        if key in seen and (total is None or len(seen) < total):
            continue  # a repeat while unused combinations remain
        seen.add(key)
        out.append(combo)
    return out
