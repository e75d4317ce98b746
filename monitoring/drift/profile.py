"""The reference profile of a model version (``osprey-profile.json`` at the archive root).

A profile keeps what drift analysis needs and not the data: per numeric feature quantile
bin edges (first -inf, last +inf, so every value has a bin) and the reference's proportions
on them, per categorical feature its categories and frequencies, mean and std, and a small
PCA basis for the model's embeddings / penultimate activations so a few components of a
high-dimensional input become ordinary numeric features (``embedding[0]`` ...). Proportions
have a floor (``stats.FLOOR``) so a bin the reference never saw keeps PSI finite.

The same builder serves ``osprey profile`` / ``package --reference-data`` (from requests run
through the handler) and a version without a profile (its first ``baseline_requests`` rows).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from server.core.capture import TASKS, Observation

from .stats import FLOOR

__all__ = ["FORMAT", "PROFILE_FILE", "ProfileError", "build_profile", "validate_profile", "load_profile",
           "save_profile", "project", "embedding_name", "bin_numeric"]

FORMAT = "osprey-profile/1"
PROFILE_FILE = "osprey-profile.json"


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file, the feature and the field."""


def embedding_name(i: int) -> str:
    return f"embedding[{i}]"


def bin_numeric(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin index of each value on ``edges`` (bins are [e_i, e_i+1)); non-finite edges at the ends."""
    return np.searchsorted(edges[1:-1], values, side="right")


def _floor(p: np.ndarray) -> list[float]:
    q = np.maximum(np.asarray(p, dtype=np.float64), FLOOR)
    return [float(x) for x in q / q.sum()]


def _numeric(name: str, kind: str, values: np.ndarray, bins: int) -> dict[str, Any] | None:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None
    inner = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])) if bins > 1 else np.array([])
    if len(inner) == 0:  # a constant feature: one edge at its value, so any change shows
        inner = np.array([x[0]])
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    counts = np.bincount(bin_numeric(edges, x), minlength=len(edges) - 1)
    return {"name": name, "kind": kind, "type": "numeric", "edges": [float(e) for e in edges],
            "proportions": _floor(counts / counts.sum()), "mean": float(x.mean()), "std": float(x.std())}


def _categorical(name: str, kind: str, values: np.ndarray) -> dict[str, Any] | None:
    v = np.asarray([str(x) for x in values], dtype=object)
    if len(v) == 0:
        return None
    cats, counts = np.unique(v.astype(str), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {"name": name, "kind": kind, "type": "categorical", "categories": [str(c) for c in cats[order]],
            "proportions": _floor(counts[order] / counts.sum()), "mean": None, "std": None}


def _concat(observations: list[Observation], attr: str) -> dict[str, np.ndarray]:
    """Columns of ``attr`` (features / predictions) over all observations, in first-seen order."""
    parts: dict[str, list[np.ndarray]] = {}
    for obs in observations:
        for name, col in getattr(obs, attr).items():
            parts.setdefault(name, []).append(np.asarray(col).reshape(-1))
    return {name: np.concatenate(cols) for name, cols in parts.items()}


def fit_projection(embedding: np.ndarray, components: int) -> dict[str, Any] | None:
    """A PCA basis (numpy SVD of the centered reference embeddings), ``components`` rows."""
    e = np.asarray(embedding, dtype=np.float64)
    if e.ndim != 2 or len(e) < 2 or components < 1:
        return None
    mean = e.mean(axis=0)
    _, s, vt = np.linalg.svd(e - mean, full_matrices=False)
    k = min(components, vt.shape[0])
    var = s ** 2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return {"mean": mean.tolist(), "components": vt[:k].tolist(), "explained_variance_ratio": ratio.tolist()}


def project(projection: dict[str, Any], embedding: np.ndarray) -> np.ndarray:
    """(n, k) coordinates of embeddings on a profile's basis."""
    mean = np.asarray(projection["mean"], dtype=np.float64)
    comps = np.asarray(projection["components"], dtype=np.float64)
    e = np.asarray(embedding, dtype=np.float64).reshape(len(embedding), -1)
    if e.shape[1] != len(mean):
        raise ProfileError(f"embedding has {e.shape[1]} columns, the profile's projection {len(mean)}")
    return (e - mean) @ comps.T


def build_profile(observations: Iterable[Observation], config: Any, source: str,
                  quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """The profile of ``observations`` (the reference rows) under a ``MonitoringConfig``.

    Prediction features come first and are always kept (a shift that only the outputs show is
    the most common real one), then embedding components, then named inputs (``config.features``
    when given) up to ``config.max_features``."""
    obs = [o for o in observations if o.error is None and len(o) > 0]
    if not obs:
        raise ProfileError("no reference rows to build a profile from")
    first = obs[0]
    categorical = frozenset().union(*(o.categorical for o in obs))
    bins = int(config.bins)

    def make(name: str, kind: str, col: np.ndarray):
        return _categorical(name, kind, col) if name in categorical or col.dtype == object \
            else _numeric(name, kind, col, bins)

    features: list[dict[str, Any]] = []
    for name, col in _concat(obs, "predictions").items():
        features.append(make(name, "prediction", col))
    projection = None
    embs = [o.embedding for o in obs if o.embedding is not None]
    if embs and int(config.components) > 0:
        emb = np.concatenate([np.asarray(e, dtype=np.float64).reshape(len(e), -1) for e in embs])
        projection = fit_projection(emb, int(config.components))
        if projection is not None:
            coords = project(projection, emb)
            features += [_numeric(embedding_name(i), "input", coords[:, i], bins) for i in range(coords.shape[1])]
    wanted = tuple(getattr(config, "features", ()) or ())
    for name, col in _concat(obs, "features").items():
        if not wanted or name in wanted:
            features.append(make(name, "input", col))
    features = [f for f in features if f is not None][: int(config.max_features)]
    classes = next((o.classes for o in obs if o.classes), None)
    profile = {"format": FORMAT, "model": first.model, "version": first.version,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source,
               "rows": int(sum(len(o) for o in obs)), "task": next((o.task for o in obs if o.task), None),
               "classes": list(classes) if classes else None, "features": features,
               "projection": projection, "quality": quality}
    validate_profile(profile)
    return profile


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_feature(i: int, f: Any, where: str) -> None:
    if not isinstance(f, dict):
        raise ProfileError(f"{where}: features[{i}] must be an object")
    name = f.get("name")
    at = f"{where}: feature {name!r}" if isinstance(name, str) and name else f"{where}: features[{i}]"
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{at}: 'name' must be a non-empty string")
    if f.get("kind") not in ("input", "prediction"):
        raise ProfileError(f"{at}: 'kind' must be 'input' or 'prediction', got {f.get('kind')!r}")
    props = f.get("proportions")
    if not isinstance(props, list) or not props or not all(_finite(p) and p >= 0 for p in props):
        raise ProfileError(f"{at}: 'proportions' must be a non-empty list of numbers >= 0")
    if abs(sum(props) - 1) > 1e-3:
        raise ProfileError(f"{at}: 'proportions' must add up to 1, they add up to {sum(props):g}")
    if f.get("type") == "numeric":
        edges = f.get("edges")
        if not isinstance(edges, list) or len(edges) < 2:
            raise ProfileError(f"{at}: 'edges' must be a list of at least 2 numbers")
        if edges[0] != -math.inf or edges[-1] != math.inf:
            raise ProfileError(f"{at}: 'edges' must start with -Infinity and end with Infinity")
        inner = edges[1:-1]
        if not all(_finite(e) for e in inner) or any(b <= a for a, b in zip(inner, inner[1:])):
            raise ProfileError(f"{at}: inner 'edges' must be finite and strictly increasing")
        if len(props) != len(edges) - 1:
            raise ProfileError(f"{at}: {len(edges)} edges need {len(edges) - 1} proportions, got {len(props)}")
        for key in ("mean", "std"):
            if not _finite(f.get(key)):
                raise ProfileError(f"{at}: '{key}' must be a finite number")
    elif f.get("type") == "categorical":
        cats = f.get("categories")
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats) or len(set(cats)) != len(cats):
            raise ProfileError(f"{at}: 'categories' must be a list of distinct strings")
        if len(props) != len(cats):
            raise ProfileError(f"{at}: {len(cats)} categories need {len(cats)} proportions, got {len(props)}")
    else:
        raise ProfileError(f"{at}: 'type' must be 'numeric' or 'categorical', got {f.get('type')!r}")


def validate_profile(profile: Any, where: str = "profile") -> dict[str, Any]:
    """``profile`` itself when it is usable, else a :class:`ProfileError` naming what is wrong."""
    if not isinstance(profile, dict):
        raise ProfileError(f"{where}: must be a JSON object")
    if profile.get("format") != FORMAT:
        raise ProfileError(f"{where}: 'format' must be {FORMAT!r}, got {profile.get('format')!r}")
    for key in ("model", "version", "source"):
        if not isinstance(profile.get(key), str):
            raise ProfileError(f"{where}: '{key}' must be a string")
    rows = profile.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ProfileError(f"{where}: 'rows' must be a whole number >= 1, got {rows!r}")
    if profile.get("task") not in (None, *TASKS):
        raise ProfileError(f"{where}: 'task' must be one of {', '.join(TASKS)} or null, got {profile.get('task')!r}")
    classes = profile.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ProfileError(f"{where}: 'classes' must be a list of strings or null")
    features = profile.get("features")
    if not isinstance(features, list):
        raise ProfileError(f"{where}: 'features' must be a list")
    seen: set[str] = set()
    for i, f in enumerate(features):
        _check_feature(i, f, where)
        if f["name"] in seen:
            raise ProfileError(f"{where}: feature {f['name']!r} appears twice")
        seen.add(f["name"])
    proj = profile.get("projection")
    if proj is not None:
        if not isinstance(proj, dict):
            raise ProfileError(f"{where}: 'projection' must be an object or null")
        mean, comps = proj.get("mean"), proj.get("components")
        if not isinstance(mean, list) or not mean or not all(_finite(x) for x in mean):
            raise ProfileError(f"{where}: projection 'mean' must be a non-empty list of numbers")
        if not isinstance(comps, list) or not comps or not all(
                isinstance(c, list) and len(c) == len(mean) and all(_finite(x) for x in c) for c in comps):
            raise ProfileError(f"{where}: projection 'components' must be rows of {len(mean)} numbers "
                               f"(the length of 'mean')")
    if profile.get("quality") is not None and not isinstance(profile.get("quality"), dict):
        raise ProfileError(f"{where}: 'quality' must be an object or null")
    return profile


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def dumps(profile: dict[str, Any]) -> str:
    """JSON text (-inf / +inf edges written as -Infinity / Infinity, which json reads back)."""
    return json.dumps(profile, default=_json_default, allow_nan=True)


def save_profile(profile: dict[str, Any], model_dir: str | os.PathLike) -> Path:
    """Write ``osprey-profile.json`` into ``model_dir`` atomically (write, then rename)."""
    validate_profile(profile)
    path = Path(model_dir) / PROFILE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(profile))
    os.replace(tmp, path)
    return path


def load_profile(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The validated profile in ``model_dir``, None when it has none; ProfileError when bad."""
    path = Path(model_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path}: not readable JSON: {e}") from None
    return validate_profile(profile, str(path))
