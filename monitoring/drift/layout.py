"""A profile compiled for streaming: which flat slot each (feature, bin) count goes to.

A window is one int64 vector of bin counts for all features side by side (offsets per
feature), so a batch adds one vector, windows from several replicas add up key by key, and
memory is the number of bins whatever the traffic. Categorical features get one extra bin,
"other", for categories the reference never saw. ``fingerprint`` names the layout, so counts
made on another profile are never mixed in (store keys carry it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from server.core.capture import Observation

from .profile import ProfileError, embedding_name
from .stats import centers

__all__ = ["Layout"]


class Layout:
    def __init__(self, profile: dict[str, Any], max_features: int | None = None):
        feats = profile["features"][: max_features or None]
        self.profile = profile
        self.features = feats
        self.names = [f["name"] for f in feats]
        self.kinds = [f["kind"] for f in feats]
        self.numeric = np.array([f["type"] == "numeric" for f in feats], dtype=bool)
        self.sizes = [len(f["proportions"]) + (0 if f["type"] == "numeric" else 1) for f in feats]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.length = int(self.offsets[-1])
        width = max(self.sizes, default=1)
        n = len(feats)
        self.valid = np.zeros((n, width), dtype=bool)
        self.ref = np.zeros((n, width))
        self.positions = np.zeros((n, width))
        self.std = np.array([float(f.get("std") or 0.0) for f in feats])
        for i, f in enumerate(feats):
            self.valid[i, : self.sizes[i]] = True
            props = list(f["proportions"]) + ([] if f["type"] == "numeric" else [0.0])
            self.ref[i, : len(props)] = props
            if f["type"] == "numeric":
                self.positions[i, : self.sizes[i]] = centers(f["edges"], self.std[i])
        self._edges = {f["name"]: np.asarray(f["edges"], dtype=np.float64) for f in feats if f["type"] == "numeric"}
        self._cats = {f["name"]: {c: j for j, c in enumerate(f["categories"])} for f in feats
                      if f["type"] == "categorical"}
        self._index = {name: i for i, name in enumerate(self.names)}
        self._inner = {name: e[1:-1] for name, e in self._edges.items()}  # bin_numeric's edges
        self._offset = [int(o) for o in self.offsets[:-1]]
        self.projection = profile.get("projection")
        self.components = len(self.projection["components"]) if self.projection else 0
        self._proj = None if self.projection is None else (
            np.asarray(self.projection["mean"], dtype=np.float64),
            np.asarray(self.projection["components"], dtype=np.float64))
        shape = [(f["name"], f.get("edges") or f.get("categories")) for f in feats]
        self.fingerprint = hashlib.sha1(json.dumps(shape, default=str).encode()).hexdigest()[:10]
        self.max_bins = width

    def columns(self, obs: Observation) -> dict[str, np.ndarray]:
        """The observation's columns by feature name, embeddings projected on the basis."""
        cols = {**obs.features, **obs.predictions}
        if self._proj is not None and obs.embedding is not None and len(obs):
            mean, comps = self._proj
            e = np.asarray(obs.embedding).reshape(len(obs), -1)
            if e.shape[1] != len(mean):
                raise ProfileError(f"embedding has {e.shape[1]} columns, the profile's projection {len(mean)}")
            coords = (e - mean) @ comps.T
            cols.update({embedding_name(i): coords[:, i] for i in range(coords.shape[1])})
        return cols

    def count(self, obs: Observation) -> np.ndarray:
        """Bin counts of one observation in the flat layout: each feature's bin indices shifted
        by its offset, then one bincount for all (not one per feature), categories by dict."""
        return self.count_slots(self.slots(obs))

    def slots(self, obs: Observation) -> np.ndarray:
        """Each row's flat slot for each of its values, (rows, values per row); -1 for a value
        that is not counted (NaN). Binned once per observation: row ranges of it are then
        counted with :meth:`count_slots` (the monitor counts an observation in window chunks).
        A column whose length is not a multiple of the rows is counted as a whole (one row)."""
        n = len(obs)
        parts = []
        for name, col in self.columns(obs).items():
            i = self._index.get(name)
            if i is None:
                continue
            col = np.asarray(col).reshape(-1)
            if self.numeric[i]:
                x = col.astype(np.float64, copy=False)
                idx = np.searchsorted(self._inner[name], x, side="right") + self._offset[i]
                nan = np.isnan(x)
                if nan.any():
                    idx[nan] = -1
            else:
                cats = self._cats[name]
                other = len(cats)
                idx = np.fromiter((cats.get(v if type(v) is str else str(v), other) for v in col.tolist()),
                                  dtype=np.int64, count=len(col)) + self._offset[i]
            parts.append(idx)
        if not parts:
            return np.empty((n, 0), dtype=np.int64)
        if n and all(len(p) % n == 0 for p in parts):
            return np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
        return np.concatenate(parts).reshape(1, -1)

    def count_slots(self, slots: np.ndarray) -> np.ndarray:
        """Flat bin counts of rows of :meth:`slots`."""
        flat = slots.reshape(-1)
        if flat.size and flat.min() < 0:
            flat = flat[flat >= 0]
        return np.bincount(flat, minlength=self.length).astype(np.int64, copy=False)

    def matrix(self, flat: np.ndarray) -> np.ndarray:
        """(features, max_bins) counts from a flat vector, padded with zeros."""
        m = np.zeros(self.valid.shape, dtype=np.int64)
        for i in range(len(self.names)):
            m[i, : self.sizes[i]] = flat[self.offsets[i]: self.offsets[i + 1]]
        return m

    def reference(self, i: int) -> dict[str, Any]:
        f = self.features[i]
        key = "edges" if f["type"] == "numeric" else "categories"
        return {key: f[key], "proportions": f["proportions"]}
