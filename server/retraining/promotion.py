"""Putting a challenger that passed the gate into traffic: canary, shadow or direct; probation.

The decisions are pure functions over live numbers (:func:`judge`), so they are tested on
their own; :func:`promote` drives them through the management API (``ServerClient``) from the
job's process: it registers nothing itself (the pipeline did), moves traffic, waits for the
numbers, and either makes the challenger the default or takes it out again. Whatever happens
(a failed check, an error, the job cancelled), a challenger that did not become the default
is taken out of traffic before this returns or raises, so serving is left as it was.

Numbers come from ``GET /models/{model}/traffic``: per version ``requests``, ``errors``,
``latency_sum_s``, ``latency_count`` (counters since the version was registered: the judge
works on differences over the observation period), and for a shadow its ``shadow`` counts;
live quality from the monitoring JSON where labels arrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from server.core.retraining_config import PromotionConfig

__all__ = ["Live", "judge", "promote", "Promotion"]


@dataclass
class Live:
    """What a version did over an observation period (differences of its counters)."""

    requests: int = 0
    errors: int = 0
    latency_sum_s: float = 0.0
    latency_count: int = 0
    quality: float | None = None  # the gate metric from live labels, when enough arrived
    higher_is_better: bool = True

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def latency_s(self) -> float | None:
        return self.latency_sum_s / self.latency_count if self.latency_count else None

    def minus(self, before: "Live") -> "Live":
        return Live(self.requests - before.requests, self.errors - before.errors,
                    self.latency_sum_s - before.latency_sum_s, self.latency_count - before.latency_count,
                    self.quality, self.higher_is_better)

    def as_dict(self) -> dict[str, Any]:
        lat = self.latency_s
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 5),
                "latency_ms": None if lat is None else round(lat * 1000, 3), "quality": self.quality}


def judge(champion: Live, challenger: Live, cfg: PromotionConfig) -> list[str]:
    """Why the challenger must not become the default (empty: it may)."""
    reasons = []
    if challenger.error_rate - champion.error_rate > cfg.max_error_rate_increase:
        reasons.append(f"error rate {challenger.error_rate:.4f} against the champion's {champion.error_rate:.4f} "
                       f"(more than +{cfg.max_error_rate_increase:g})")
    a, b = champion.latency_s, challenger.latency_s
    if a and b and b / a > cfg.max_latency_ratio:
        reasons.append(f"mean latency {b * 1000:.2f} ms against the champion's {a * 1000:.2f} ms "
                       f"(more than {cfg.max_latency_ratio:g}x)")
    if champion.quality is not None and challenger.quality is not None:
        drop = champion.quality - challenger.quality if challenger.higher_is_better else \
            challenger.quality - champion.quality
        if drop > cfg.max_quality_drop:
            reasons.append(f"live quality {challenger.quality:.4f} against the champion's {champion.quality:.4f} "
                           f"(worse by more than {cfg.max_quality_drop:g})")
    return reasons


def _live(stats: dict, version: str) -> Live:
    s = (stats or {}).get(version) or {}
    return Live(int(s.get("requests", 0)), int(s.get("errors", 0)), float(s.get("latency_sum_s", 0.0)),
                int(s.get("latency_count", 0)))


@dataclass
class Promotion:
    result: str  # promoted | rejected | rolled_back
    reasons: list
    numbers: dict


def promote(client: Any, model: str, champion: str, challenger: str, cfg: PromotionConfig, *,
            step: Callable[[str, str], None] = lambda s, d="": None,
            quality: Callable[[str], float | None] = lambda v: None,
            cancelled: Callable[[], bool] = lambda: False,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
            poll_s: float = 1.0) -> Promotion:
    """Canary, shadow or direct, then probation (see the module doc)."""
    numbers: dict[str, Any] = {"policy": cfg.policy}
    became_default = False
    try:
        if cfg.policy in ("canary", "shadow"):
            if cfg.policy == "canary":
                share = cfg.canary_share
                client.set_traffic(model, {champion: round(1.0 - share, 6), challenger: share})
                step("canary", f"{challenger} takes {share:.0%} of {model}'s traffic")
            else:
                client.set_shadow(model, challenger)
                step("shadow", f"{challenger} receives a copy of {model}'s traffic; its answers are discarded")
            start = client.traffic(model).get("stats", {})
            began = clock()
            while True:
                if cancelled():
                    raise InterruptedError("cancelled")
                sleep(poll_s)
                now_stats = client.traffic(model).get("stats", {})
                champ = _live(now_stats, champion).minus(_live(start, champion))
                chall = _live(now_stats, challenger).minus(_live(start, challenger))
                elapsed = clock() - began
                if chall.requests >= cfg.min_requests and elapsed >= cfg.min_seconds:
                    break
                if elapsed >= cfg.max_seconds:
                    numbers[cfg.policy] = {"champion": champ.as_dict(), "challenger": chall.as_dict(),
                                           "seconds": round(elapsed, 1)}
                    return Promotion("rejected", [f"{cfg.policy}: the challenger served {chall.requests} requests "
                                                  f"of the {cfg.min_requests} needed in {cfg.max_seconds:g} s"],
                                     numbers)
            champ.quality, chall.quality = quality(champion), quality(challenger)
            numbers[cfg.policy] = {"champion": champ.as_dict(), "challenger": chall.as_dict(),
                                   "seconds": round(clock() - began, 1)}
            reasons = judge(champ, chall, cfg)
            if reasons:
                step(f"{cfg.policy} failed", "; ".join(reasons))
                return Promotion("rejected", reasons, numbers)
            step(f"{cfg.policy} passed", f"challenger {chall.as_dict()} champion {champ.as_dict()}")
            baseline = champ
        else:  # direct: the champion's record so far is the bar the new default is held to
            baseline = _live(client.traffic(model).get("stats", {}), champion)
            baseline.quality = quality(champion)
        client.set_default(model, challenger)
        became_default = True
        client.set_traffic(model, None)
        if cfg.policy == "shadow":
            client.set_shadow(model, None)
        step("promoted", f"{challenger} is the default version of {model} (was {champion})")
        return _probation(client, model, champion, challenger, cfg, baseline, numbers, step, quality, cancelled,
                          clock, sleep, poll_s)
    finally:
        if not became_default:  # serving as it was: the champion takes all traffic again
            for undo in (lambda: client.set_traffic(model, None), lambda: client.set_shadow(model, None)):
                try:
                    undo()
                except Exception:
                    pass


def _probation(client, model, champion, challenger, cfg, baseline, numbers, step, quality, cancelled, clock,
               sleep, poll_s) -> Promotion:
    if cfg.probation_s <= 0:
        return Promotion("promoted", [], numbers)
    step("probation", f"watching {challenger} for {cfg.probation_s:g} s; rolled back if it degrades")
    start = client.traffic(model).get("stats", {})
    began = clock()
    while clock() - began < cfg.probation_s:
        if cancelled():
            break  # promotion stands; probation is a watch, not a step to undo
        sleep(poll_s)
        now_stats = client.traffic(model).get("stats", {})
        live = _live(now_stats, challenger).minus(_live(start, challenger))
        if baseline is None or live.requests < max(cfg.min_requests, 1):
            continue
        live.quality, base = quality(challenger), Live(baseline.requests, baseline.errors, baseline.latency_sum_s,
                                                       baseline.latency_count, baseline.quality)
        reasons = judge(base, live, cfg)
        if reasons:
            numbers["probation"] = {"challenger": live.as_dict(), "baseline": base.as_dict()}
            client.rollback(model)
            step("rolled back", f"{champion} is the default again: " + "; ".join(reasons))
            return Promotion("rolled_back", reasons, numbers)
    step("probation passed", f"{challenger} stays the default")
    return Promotion("promoted", [], numbers)
