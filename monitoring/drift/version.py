"""Drift monitoring of one model version, driven by the monitor's background thread.

Holds the reference (the archive's ``osprey-profile.json``, else a baseline built from the
first ``baseline_requests`` rows and published to the store so every replica adopts the same
one), bins each observation into chunks of counts, hands the chunks to the store (which
closes windows atomically), scores the windows it closed, advances the episode state and
keeps a snapshot for :meth:`status` and metrics, so the event loop never waits on the store.

While the store is unavailable, chunks wait in a bounded buffer (``MAX_CHUNKS``; the oldest
are dropped and counted past it) and the status says ``degraded`` with the reason; the next
successful flush sends them in order, so the windows catch up. A failing capture hook
(``obs.error``) marks the version degraded; predictions never see any of it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

import numpy as np

from server.core.capture import Observation

from ..store import Closed, Store, StoreUnavailable
from . import episodes
from .layout import Layout
from .profile import PROFILE_FILE, ProfileError, build_profile, load_profile, validate_profile
from .window import WindowResult, analyze

__all__ = ["VersionMonitor", "MAX_CHUNKS", "CHUNKS_PER_WINDOW"]

log = logging.getLogger("osprey.monitoring")

CHUNKS_PER_WINDOW = 10  # a chunk holds at most window / 10 rows, so a window overshoots by little
MAX_CHUNKS = 4 * CHUNKS_PER_WINDOW  # about four windows buffered while the store is down
MAX_UNSCORED = 4  # windows taken from the store whose commit failed, kept to commit later


def _features_out(result: WindowResult) -> list[dict[str, Any]]:
    return [{"name": f.name, "kind": f.kind, "method": f.method, "score": f.score, "threshold": f.threshold,
             "drifted": f.drifted} for f in result.features]


class VersionMonitor:
    def __init__(self, model: str, version: str, config: Any, model_dir: Any, store: Store,
                 clock: Callable[[], float], quality: Any = None):
        self.model, self.version, self.config, self.store, self.clock = model, version, config, store, clock
        self.quality = quality
        self.lock = threading.Lock()  # guards what status() and metrics read from the loop
        self.problems: dict[str, str] = {}  # what is degraded: source -> why
        self.hook_failures = 0
        self.local_rows = 0  # rows this replica monitored (osprey_monitored_requests_total)
        self.lost_rows = 0  # rows dropped from the buffer while the store was down
        self.layout: Layout | None = None
        self.reference = "baseline"
        self.baseline: list[Observation] = []
        self.baseline_local = 0
        self.baseline_shared = 0
        self.pending: deque[list] = deque()  # [counts, rows] chunks not yet in the store
        self.unscored: deque[Closed] = deque()  # closed windows whose commit has not succeeded
        self.snapshot: tuple[dict | None, list[dict], int] = (None, [], 0)
        try:
            profile = load_profile(model_dir) if model_dir is not None else None
        except ProfileError as e:
            profile = None
            self.problems["profile"] = f"{PROFILE_FILE} unusable, using a baseline: {e}"
            log.warning("event=monitoring_profile_invalid model=%s version=%s error=%s", model, version, e)
        if profile is not None:
            self._adopt(profile, "archive")

    # -- reference -----------------------------------------------------------------------
    def _adopt(self, profile: dict, reference: str) -> None:
        self.layout = Layout(profile, int(self.config.max_features))
        self.reference = reference
        self.baseline = []

    def _collect_baseline(self, obs: Observation) -> None:
        needed = int(self.config.baseline_requests)
        self.baseline.append(obs)
        self.baseline_local += len(obs)
        try:
            self.baseline_shared = self.store.baseline_rows(self.model, self.version, len(obs))
            self._clear("store")
        except StoreUnavailable as e:
            self._problem("store", str(e))
        if self.baseline_local < needed:
            return
        try:
            profile = build_profile(self.baseline, self.config, f"baseline: first {self.baseline_local} requests")
        except ProfileError as e:
            self._problem("baseline", f"baseline profile not built: {e}")
            self.baseline = []
            return
        try:
            profile = validate_profile(self.store.put_profile(self.model, self.version, profile))
        except StoreUnavailable as e:
            self._problem("store", str(e))  # adopt ours; the store gets its counts once back
        self._adopt(profile, "baseline")

    # -- observations ----------------------------------------------------------------------
    def record(self, obs: Observation) -> None:
        """One observation (background thread)."""
        if obs.error is not None:
            self.hook_failures += 1
            self._problem("hook", f"monitoring hook failed on {self.hook_failures} batch(es): {obs.error}")
            return
        if self.quality is not None:
            try:
                self.quality.record(obs)
            except Exception as e:  # the quality part must not stop drift
                self._problem("quality", f"quality part failed: {type(e).__name__}: {e}")
        n = len(obs)
        if n == 0:
            return
        self.local_rows += n
        if self.layout is None:
            self._collect_baseline(obs)
            return
        limit = max(1, int(self.config.window) // CHUNKS_PER_WINDOW)
        # an observation may hold many batches (capture is amortized): binned once, then
        # counted in slices of at most a chunk, so that a window closes within a chunk of its
        # size, not an observation's
        try:
            slots = self.layout.slots(obs)
        except (ProfileError, ValueError, TypeError) as e:
            self._problem("features", f"features do not match the profile: {e}")
            return
        self._clear("features")
        if len(slots) != n:  # columns that are not one value set per row: the whole as one chunk
            limit = n
        for start in range(0, n, limit):
            counts = self.layout.count_slots(slots if limit >= n else slots[start:start + limit])
            rows = min(n, start + limit) - start
            if self.pending and self.pending[-1][1] + rows <= limit:
                self.pending[-1][0] += counts
                self.pending[-1][1] += rows
            else:
                self.pending.append([counts, rows])
        while len(self.pending) > MAX_CHUNKS:
            self.lost_rows += self.pending.popleft()[1]

    def flush(self, check_time: bool = True) -> bool:
        """Send buffered chunks to the store in order, scoring any window they close (and, with
        ``check_time``, a window past ``window_seconds``). False (and degraded) when the store
        is unavailable: chunks not sent stay buffered, and a window taken but not committed is
        kept (``MAX_UNSCORED``) and committed first next time."""
        if self.layout is None:
            return True
        lay = self.layout
        try:
            while self.unscored:
                self._score(self.unscored[0])
                self.unscored.popleft()
            while self.pending:
                counts, rows = self.pending[0]
                closed = self.store.add(self.model, self.version, lay.fingerprint, lay.length, counts, rows,
                                        self.clock(), int(self.config.window))
                self.pending.popleft()
                if closed is not None:
                    self._take(closed)
            if check_time and self.config.window_seconds:
                closed = self.store.close_due(self.model, self.version, lay.fingerprint, lay.length, self.clock(),
                                              float(self.config.window_seconds), int(self.config.min_window))
                if closed is not None:
                    self._take(closed)
        except StoreUnavailable as e:
            self._problem("store", str(e) + (f" ({self.lost_rows} rows dropped from the buffer)"
                                             if self.lost_rows else ""))
            return False
        self._clear("store")
        return True

    def _take(self, closed: Closed) -> None:
        closed.ended = self.clock()
        self.unscored.append(closed)
        while len(self.unscored) > MAX_UNSCORED:
            self.lost_rows += self.unscored.popleft().rows
        self._score(closed)
        self.unscored.remove(closed)

    def _adopt_published(self) -> None:
        try:
            profile = self.store.get_profile(self.model, self.version)
        except StoreUnavailable as e:
            self._problem("store", str(e))
            return
        if profile is not None:
            self._adopt(validate_profile(profile), "baseline")

    def _score(self, closed: Closed) -> None:
        ended = closed.ended if closed.ended is not None else self.clock()
        result = analyze(self.layout, closed.counts, closed.rows, ended, self.config)
        quality = None
        if self.quality is not None:
            try:
                quality = self.quality.status().get("metrics")
            except Exception:
                quality = None
        last = {"rows": result.rows, "ended": ended, "score": result.score, "drifted": result.drifted,
                "small": result.small, "features": _features_out(result), "current": result.current}

        opened = False  # this commit opened the episode (the store may run update more than once)

        def update(state: dict | None):
            nonlocal opened
            new = episodes.advance(state, result.drifted, ended, self.config)
            new["last"] = last
            opened = new["episodes"] > (state or {}).get("episodes", 0)
            entry = {"window": new["windows"], "ended": ended, "score": result.score, "drifted": result.drifted,
                     "features": {f.name: f.score for f in result.features}, "quality": quality}
            return new, entry

        state = self.store.commit(self.model, self.version, update)
        if opened and state["episode"] and state["episode"]["open"]:
            log.warning("event=drift_episode_opened model=%s version=%s episode=%s top_feature=%s", self.model,
                        self.version, state["episode"]["id"], result.features[0].name if result.features else "")

    def refresh(self) -> None:
        """Re-read the shared state for status (background thread); in baseline mode with a
        shared store, adopt the profile another replica published."""
        if self.layout is None and self.store.redis is not None:
            self._adopt_published()
        try:
            snap = self.store.read(self.model, self.version)
        except StoreUnavailable as e:
            self._problem("store", str(e))
            return
        with self.lock:
            self.snapshot = snap

    # -- degraded ----------------------------------------------------------------------------
    def _problem(self, source: str, why: str) -> None:
        if self.problems.get(source) != why:
            if source not in self.problems:
                log.warning("event=monitoring_degraded model=%s version=%s source=%s why=%s",
                            self.model, self.version, source, why)
            with self.lock:
                self.problems[source] = why

    def _clear(self, source: str) -> None:
        if source in self.problems:
            with self.lock:
                self.problems.pop(source, None)

    @property
    def degraded(self) -> str | None:
        with self.lock:
            return "; ".join(self.problems.values()) or None

    # -- what shows ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The monitoring JSON (the plan's format) from the last snapshot."""
        with self.lock:
            state, history, requests = self.snapshot
            problems = "; ".join(self.problems.values()) or None
        state = state or episodes.new_state()
        last = state.get("last") or {}
        layout = self.layout
        refs = {}
        if layout is not None:
            for i, name in enumerate(layout.names):
                ref = layout.reference(i)
                if "edges" in ref:  # JSON has no infinity: the open ends are null
                    ref = {**ref, "edges": [e if np.isfinite(e) else None for e in ref["edges"]]}
                refs[name] = ref
        feats = []
        for f in last.get("features", []):
            cur = last.get("current", {}).get(f["name"], [])
            ref = refs.get(f["name"])
            if ref is not None and "categories" in ref:
                cur = cur[: len(ref["categories"])]  # the "other" bin is reported by its absence
            feats.append({**f, "reference": ref, "current": {"proportions": cur}})
        episode = state.get("episode")
        out: dict[str, Any] = {"model": self.model, "version": self.version, "reference": self.reference}
        if self.reference == "baseline":
            needed = int(self.config.baseline_requests)
            rows = needed if layout is not None else min(max(self.baseline_shared, self.baseline_local), needed)
            out["baseline_progress"] = {"rows": rows, "needed": needed}
        out.update({
            "degraded": problems,
            "requests": requests + self.baseline_shared,  # rows in windows + rows that made the baseline
            "windows": state.get("windows", 0),
            "drift": {"detected": bool(episode and episode["open"]), "score": float(last.get("score", 0.0)),
                      "method": self.config.method, "episode": episode, "episodes": state.get("episodes", 0),
                      "features": feats},
            "quality": self._quality_status(),
            "history": history,
        })
        return out

    def _quality_status(self) -> dict | None:
        if self.quality is None:
            return None
        try:
            return self.quality.status()
        except Exception as e:
            return {"degraded": True, "error": f"{type(e).__name__}: {e}"}

    def metrics(self) -> dict[str, Any]:
        """What render() exposes: scores per feature of the last window, episode, counters."""
        with self.lock:
            state = self.snapshot[0] or {}
            degraded = bool(self.problems)
        last = state.get("last") or {}
        episode = state.get("episode")
        return {"scores": [(f["name"], f["score"]) for f in last.get("features", [])][: int(self.config.max_features)],
                "detected": bool(episode and episode["open"]), "episodes": int(state.get("episodes", 0)),
                "requests": self.local_rows, "degraded": degraded}
