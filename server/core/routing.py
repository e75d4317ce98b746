"""Per-model traffic routing: canary weights over versions and one shadow version.

Pure data and checks, no registry or event loop: the registry holds a :class:`Routing` for
each model that has weights or a shadow (and none for the others, so a request to a model
without them costs nothing extra), and asks it which version answers a request that named
no version. A request naming a version never comes here.

* ``weights``: ``{version: weight}``; a request is sent to a version with probability
  weight / sum of weights (one random draw and a bisect per request). Versions not named
  get no traffic that names no version. ``{}`` or None: every such request to the default.
* ``shadow``: a version that receives a copy of every request the default answered (see
  :mod:`server.core.shadow`); its answers are compared and discarded.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Any, Callable

from server.core.errors import ErrorKind, OspreyError, show

__all__ = ["Split", "Routing", "check_weights", "remember", "HISTORY"]

HISTORY = 16  # previous default versions remembered per model (for rollback)
MAX_VERSIONS = 64  # most versions one weights object may name


def check_weights(model: str, weights: Any) -> dict[str, float]:
    """``weights`` as ``{version: float}``; BAD_INPUT naming what is wrong: not an object, a
    version that is not text, a weight that is not a finite number >= 0, all weights zero.
    None or ``{}`` is ``{}`` (clear: everything to the default)."""
    if weights is None:
        return {}
    if not isinstance(weights, dict):
        raise OspreyError(ErrorKind.BAD_INPUT, f"weights for model {model} must be an object of version: weight "
                                               f"(e.g. {{\"1.0\": 90, \"2.0\": 10}}), got {show(weights)}")
    if len(weights) > MAX_VERSIONS:
        raise OspreyError(ErrorKind.BAD_INPUT, f"weights for model {model} name {len(weights)} versions; "
                                               f"at most {MAX_VERSIONS} are allowed")
    out: dict[str, float] = {}
    for version, weight in weights.items():
        if not isinstance(version, str) or not version:
            raise OspreyError(ErrorKind.BAD_INPUT, f"weights for model {model}: version {show(version)} "
                                                   "must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise OspreyError(ErrorKind.BAD_INPUT, f"weight of model {model} version {version} must be a number "
                                                   f">= 0, got {show(weight)}")
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise OspreyError(ErrorKind.BAD_INPUT, f"weight of model {model} version {version} must be a finite "
                                                   f"number >= 0, got {show(weight)}")
        out[version] = w
    if out and not any(out.values()):
        raise OspreyError(ErrorKind.BAD_INPUT, f"weights for model {model} are all zero: give at least one version "
                                               "a positive weight, or send {} to send everything to the default")
    return out


class Split:
    """Weights turned into cumulative edges: :meth:`pick` is one bisect."""

    __slots__ = ("weights", "_versions", "_edges", "_total")

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)
        self._versions: list[str] = []
        self._edges: list[float] = []
        total = 0.0
        for version, w in weights.items():
            if w > 0:
                total += w
                self._versions.append(version)
                self._edges.append(total)
        if not self._versions:
            raise ValueError("a split needs a positive weight")
        self._total = total

    def pick(self, draw: float) -> str:
        """The version for a uniform ``draw`` in [0, 1)."""
        i = bisect.bisect_right(self._edges, draw * self._total)
        return self._versions[i if i < len(self._versions) else -1]

    def shares(self) -> dict[str, float]:
        """Each named version's share of the traffic that names no version (0..1)."""
        return {v: w / self._total for v, w in self.weights.items()}

    def without(self, version: str) -> "Split | None":
        """This split with ``version`` left out; None when no positive weight is left."""
        rest = {v: w for v, w in self.weights.items() if v != version}
        return Split(rest) if any(rest.values()) else None


class Routing:
    """One model's non-default routing: a :class:`Split` and/or a shadow version."""

    __slots__ = ("split", "shadow", "draw")

    def __init__(self, draw: Callable[[], float] | None = None):
        self.split: Split | None = None
        self.shadow: str | None = None
        self.draw = draw or random.random  # tests pass a seeded random.Random().random

    @property
    def empty(self) -> bool:
        return self.split is None and self.shadow is None

    def pick(self) -> str | None:
        """The version for one request that named none (None: the default)."""
        split = self.split
        return None if split is None else split.pick(self.draw())

    def forget(self, version: str) -> None:
        """``version`` was unregistered: out of the weights and no longer the shadow."""
        if self.split is not None and version in self.split.weights:
            self.split = self.split.without(version)
        if self.shadow == version:
            self.shadow = None


def remember(history: list[str], old: str, new: str) -> None:
    """The default changes from ``old`` to ``new``: ``old`` becomes the most recent previous
    default (last in ``history``); ``new`` leaves the history (it is the default now); at most
    HISTORY are kept, each once."""
    history[:] = [v for v in history if v != old and v != new]
    if old and old != new:
        history.append(old)
    del history[:-HISTORY]
