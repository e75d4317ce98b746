"""What starts a retraining job: drift episodes, degraded quality, alerts, and people.

Exactly one job per model per episode, whichever replica saw it and however often it fires:

- every trigger names an *episode* (``drift:1.0:3`` is version 1.0's third drift episode, a
  number shared by the replicas through the monitor's store), and the queue keeps one job per
  (model, episode);
- automatic triggers (drift, quality, latency, alert) also take the model's *cooldown*
  (``SET NX`` with the cooldown as expiry, in Redis when the server has one), so a second
  episode within the cooldown, or the same episode seen under another name (an alert),
  starts nothing;
- a trigger that cannot be delivered (Redis down) is kept and retried on the next poll: the
  episode key makes the retry safe.

:class:`Triggers` polls the monitor's status of every default version with ``retraining`` once
per ``poll_s`` (a snapshot: no Redis round trip on the loop) and fires on the transitions: a
drift episode opening, quality turning degraded, the latency objective breached for
``latency_for_s``. ``manual`` and ``alert`` are the management API's entry points.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from server.core.errors import ErrorKind, OspreyError, show
from server.core.retraining_config import TOO_FEW_LABELS, RetrainingConfig

__all__ = ["Triggers", "Cooldown", "Trigger", "LatencyWatch", "entry_point_of", "ALERTS"]

log = logging.getLogger("osprey.retraining")

#: Alertmanager alert names that start a job, and the trigger each one is
ALERTS = {"OspreyDriftDetected": "drift", "OspreyQualityDegraded": "quality"}


@dataclass
class Trigger:
    model: str
    version: str
    trigger: str  # drift | quality | latency | manual | alert
    episode: str
    params: dict = field(default_factory=dict)
    automatic: bool = True  # takes the cooldown


def entry_point_of(mv: Any) -> str | None:
    """The training entry point of a model version: retraining.entry_point, else training.json's."""
    cfg = mv.config.retraining
    if cfg is not None and cfg.entry_point:
        return cfg.entry_point
    path = Path(mv.archive.model_dir) / "training.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ep = data.get("entry_point") if isinstance(data, dict) else None
    return ep if isinstance(ep, str) and ":" in ep else None


class Cooldown:
    """``take(model, seconds, token)``: True for the first caller within ``seconds`` (shared
    through Redis when ``redis`` is given; raises when Redis cannot answer, so the trigger is
    kept). The holder's ``token`` makes :meth:`release` end only its own cooldown: one taken
    since by another trigger or replica stays."""

    # delete the key only while it holds this token (Redis: one atomic step)
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, redis: Any = None, clock: Callable[[], float] = time.monotonic):
        self.redis, self.clock = redis, clock
        self._until: dict[str, tuple[float, str]] = {}

    def take(self, model: str, seconds: float, token: str = "1") -> bool:
        if seconds <= 0:
            return True
        if self.redis is not None:
            return bool(self.redis.set(f"osprey:retraining:cooldown:{model}", token.encode(), nx=True,
                                       px=max(int(seconds * 1000), 1)))
        now = self.clock()
        if self._until.get(model, (0.0, ""))[0] > now:
            return False
        self._until[model] = (now + seconds, token)
        return True

    def release(self, model: str, token: str) -> None:
        """End the model's cooldown now if ``token`` still holds it (its job trained nothing)."""
        if self.redis is not None:
            self.redis.eval(self._RELEASE, 1, f"osprey:retraining:cooldown:{model}", token)
        held = self._until.get(model)
        if held is not None and held[1] == token:
            del self._until[model]


class LatencyWatch:
    """``watch(model, version) -> bool``: over the requests since the last call, is the p99
    above the latency objective (more than 1% slower than it, over at least ``min_requests``)?
    ``counts(model, version)`` gives (requests, slower than the objective) so far, or None."""

    def __init__(self, counts: Callable[[str, str], tuple[int, int] | None], min_requests: int = 100,
                 share: float = 0.01):
        self.counts, self.min_requests, self.share = counts, min_requests, share
        self._last: dict[tuple[str, str], tuple[int, int]] = {}
        self._verdict: dict[tuple[str, str], bool] = {}

    def __call__(self, model: str, version: str) -> bool:
        now = self.counts(model, version)
        key = (model, version)
        if now is None:
            return False
        n0, o0 = self._last.get(key, (0, 0))
        n, over = now[0] - n0, now[1] - o0
        if n < self.min_requests:  # too few since the last verdict: keep it, keep counting
            return self._verdict.get(key, False)
        self._last[key] = now
        self._verdict[key] = over > self.share * n
        return self._verdict[key]


class Triggers:
    """Turns transitions, alerts and requests into jobs (see the module doc).

    ``registry`` gives versions (``get``, ``all_versions``, ``default_version``); ``monitor``
    is the server's Monitor or None; ``queue`` a ``server.retraining.queue.JobQueue``;
    ``latency_breached(model, version) -> bool`` (optional) says whether the version is over
    its latency objective now."""

    def __init__(self, registry: Any, monitor: Any, queue: Any, cooldown: Cooldown, *, poll_s: float = 1.0,
                 latency_breached: Callable[[str, str], bool] | None = None, latency_for_s: float = 300.0,
                 params: dict | None = None):
        self.registry, self.monitor, self.queue, self.cooldown = registry, monitor, queue, cooldown
        self.poll_s = poll_s
        self.latency_breached, self.latency_for_s = latency_breached, latency_for_s
        self.params = dict(params or {})  # added to every job (e.g. where the model store is)
        self._seen: dict[tuple[str, str, str], Any] = {}  # (model, version, kind) -> last state seen
        self._breach_since: dict[tuple[str, str], float] = {}
        self.pending: list[Trigger] = []  # not delivered yet (queue or Redis down)
        self.fired: dict[str, int] = {}  # trigger kind -> jobs created (for metrics)
        self._task: asyncio.Task | None = None
        # automatic jobs this process created and whose cooldown they hold: job id -> model
        self._charged: dict[str, tuple[str, str]] = {}  # job id -> (model, the cooldown's token)
        self.on_poll: Callable[[], Any] | None = None  # an async callable after each poll (job metrics)

    # -- entry points ---------------------------------------------------------------------------------
    def _version(self, model: str, version: str | None = None) -> tuple[Any, RetrainingConfig]:
        mv = self.registry.get(model, version)  # NOT_FOUND (404) for an unknown model or version
        if entry_point_of(mv) is None:
            raise OspreyError(ErrorKind.BAD_INPUT, f"model {model} version {mv.version} has no training entry point: "
                                                   "set retraining.entry_point in its model-config.yaml or "
                                                   "entry_point in the archive's training.json")
        return mv, mv.config.retraining or RetrainingConfig()

    async def manual(self, model: str, version: str | None = None, *, reason: str = "") -> tuple[Any, bool]:
        """``osprey retrain`` / ``POST /models/{model}/retrain``: a job now (no cooldown), unless
        one is already queued or running for the model: then that one (created False)."""
        mv, cfg = self._version(model, version)
        if cfg is not None and not cfg.enabled:
            raise OspreyError(ErrorKind.BAD_INPUT, f"retraining is disabled for model {model} "
                                                   "(retraining.enabled: false)")
        try:
            jobs = await self.queue.list(model)
        except OspreyError:
            raise
        except Exception as exc:
            raise OspreyError(ErrorKind.UNAVAILABLE, f"the job queue is unavailable ({exc}); nothing was queued: "
                                                     "try again when it is back") from None
        for job in jobs:
            if str(getattr(job.state, "value", job.state)) in ("queued", "running"):
                return job, False
        episode = f"manual:{uuid.uuid4().hex[:12]}"
        return await self._submit(Trigger(model, mv.version, "manual", episode,
                                          {"reason": reason} if reason else {}, automatic=False))

    async def alert(self, payload: Any) -> dict[str, Any]:
        """Alertmanager's webhook JSON: firing OspreyDriftDetected / OspreyQualityDegraded alerts
        start the same job the monitor would (same episode when this server knows it)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise OspreyError(ErrorKind.BAD_INPUT, "expected Alertmanager's webhook JSON: an object with an "
                                                   f"\"alerts\" list, got {show(payload)}")
        out: dict[str, Any] = {"jobs": [], "ignored": 0, "errors": []}
        for i, a in enumerate(payload["alerts"]):
            labels = a.get("labels") if isinstance(a, dict) else None
            if not isinstance(labels, dict) or a.get("status", "firing") != "firing" \
                    or labels.get("alertname") not in ALERTS:
                out["ignored"] += 1
                continue
            model = labels.get("model")
            if not isinstance(model, str) or not model:
                out["errors"].append(f"alerts[{i}]: {labels.get('alertname')} has no model label")
                continue
            try:
                mv, cfg = self._version(model, labels.get("version") or None)
            except OspreyError as exc:
                out["errors"].append(f"alerts[{i}]: {exc.message}")
                continue
            if "alert" not in cfg.triggers or not cfg.enabled:
                out["ignored"] += 1
                continue
            kind = ALERTS[labels["alertname"]]
            episode = await self._episode_of(mv, kind) or \
                f"alert:{a.get('fingerprint') or labels['alertname']}:{a.get('startsAt', '')}"
            job, created = await self._submit(Trigger(model, mv.version, "alert", episode,
                                                      {"alert": labels["alertname"]}), cfg)
            if job is not None and created:  # (the episode's job, started before, is not this alert's)
                out["jobs"].append({"id": job.id, "model": model, "created": created})
        return out

    async def register_challenger(self, job_id: str, archive: str) -> Any:
        """Register the challenger a running job wrote into the model store (its
        ``MODEL-vVERSION-JOB.mar``): the job's own way in, which works with the model API
        off, because it can register nothing but what that job produced."""
        job = await self.queue.get(job_id)
        if job is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"no retraining job {job_id}")
        if str(getattr(job.state, "value", job.state)) != "running":
            raise OspreyError(ErrorKind.CONFLICT, f"job {job_id} is {getattr(job.state, 'value', job.state)}: "
                                                  "only a running job registers its challenger")
        name = Path(str(archive)).name
        if name != archive or not name.startswith(f"{job.model}-v") or not name.endswith(f"-{job.id[:12]}.mar"):
            raise OspreyError(ErrorKind.BAD_INPUT, f"archive {show(archive)} is not one job {job_id} wrote "
                                                   f"(expected {job.model}-vVERSION-{job.id[:12]}.mar in the model store)")
        return await self.registry.register(name, model_name=job.model, initial_workers=1, synchronous=True)

    async def _episode_of(self, mv: Any, kind: str) -> str | None:
        """The episode key the monitor's trigger uses for this version's current state, if open."""
        if self.monitor is None:
            return None
        try:
            status = await asyncio.to_thread(self.monitor.status, mv.name, mv.version)
        except Exception:
            return None
        return self._episodes(mv.version, status).get(kind)

    @staticmethod
    def _episodes(version: str, status: dict) -> dict[str, str]:
        out = {}
        drift = status.get("drift") or {}
        if drift.get("detected"):
            out["drift"] = f"drift:{version}:{drift.get('episodes', 0)}"
        quality = status.get("quality") or {}
        if quality.get("degraded"):
            # named by the quality window it turned degraded in (shared counts with Redis): the
            # cooldown keeps a later window of the same slump from starting a second job
            out["quality"] = f"quality:{version}:{int(quality.get('windows') or 0)}"
        return out

    # -- delivery ----------------------------------------------------------------------------------------
    async def _submit(self, t: Trigger, cfg: RetrainingConfig | None = None) -> tuple[Any, bool]:
        cfg = cfg or self.registry.get(t.model, t.version).config.retraining or RetrainingConfig()
        took = False
        token = uuid.uuid4().hex
        try:
            if t.automatic:
                if not await asyncio.to_thread(self.cooldown.take, t.model, cfg.cooldown_s, token):
                    log.info("event=retrain_trigger_cooling model=%s trigger=%s episode=%s", t.model, t.trigger,
                             t.episode)
                    return None, False
                took = cfg.cooldown_s > 0
            try:
                job, created = await self.queue.submit(t.model, t.version, t.trigger, t.episode,
                                                       {**self.params, **t.params})
            except BaseException:
                if took:  # nothing was queued: a kept trigger must not find its own cooldown later
                    await asyncio.to_thread(self._release_quietly, t.model, token)
                raise
            if not created:  # the episode's job exists: it took the cooldown when it was made
                log.info("event=retrain_trigger_known model=%s trigger=%s episode=%s job=%s", t.model, t.trigger,
                         t.episode, job.id)
                if took:
                    await asyncio.to_thread(self.cooldown.release, t.model, token)
            elif took:
                self._charged[job.id] = (t.model, token)
        except OspreyError:
            raise
        except Exception as exc:
            if not t.automatic:  # a person is told, and retries: keeping it too could make two jobs
                raise OspreyError(ErrorKind.UNAVAILABLE, f"the job queue is unavailable ({exc}); nothing was "
                                                         "queued: try again when it is back") from None
            # Redis down: keep it, deliver on a later poll (the episode dedups)
            if t not in self.pending:
                self.pending.append(t)
            log.warning("event=retrain_trigger_kept model=%s trigger=%s episode=%s reason=%s",
                        t.model, t.trigger, t.episode, exc)
            return None, False
        if created:
            self.fired[t.trigger] = self.fired.get(t.trigger, 0) + 1
            log.info("event=retrain_job_queued model=%s version=%s trigger=%s episode=%s job=%s",
                     t.model, t.version, t.trigger, t.episode, job.id)
        return job, created

    def _release_quietly(self, model: str, token: str) -> None:
        try:
            self.cooldown.release(model, token)
        except Exception:  # Redis down: the cooldown expires on its own
            pass

    async def _uncharge(self) -> None:
        """A job that ended rejected for too few labelled rows trained nothing: its model's
        cooldown ends, so that a later trigger (quality turning degraded once labels arrived)
        is not refused for a job that never ran (a drift episode often opens before labels)."""
        for job_id, (model, token) in list(self._charged.items()):
            try:
                rec = await self.queue.get(job_id)
            except Exception:  # the queue is unreachable: look again on a later poll
                return
            if rec is not None and not rec.terminal:
                continue
            del self._charged[job_id]
            if rec is not None and rec.state.value == "rejected" and rec.result.get("reason") == TOO_FEW_LABELS:
                try:
                    await asyncio.to_thread(self.cooldown.release, model, token)
                except Exception as exc:  # Redis down: the cooldown expires on its own
                    log.warning("event=retrain_cooldown_release_failed model=%s job=%s reason=%s", model, job_id, exc)
                    continue
                log.info("event=retrain_cooldown_released model=%s job=%s reason=%s", model, job_id, TOO_FEW_LABELS)

    async def poll(self) -> None:
        """One pass: retry kept triggers, end cooldowns held by jobs that trained nothing, then
        look for new transitions."""
        kept, self.pending = self.pending, []
        for t in kept:
            await self._submit(t)
        if self._charged:
            await self._uncharge()
        if self.monitor is None:
            return
        for mv in list(self.registry.all_versions()):
            cfg = mv.config.retraining
            if cfg is None or not cfg.enabled:
                continue
            try:
                if self.registry.default_version(mv.name) != mv.version:
                    continue
            except OspreyError:
                continue
            try:
                status = await asyncio.to_thread(self.monitor.status, mv.name, mv.version)
            except Exception:
                continue
            episodes = self._episodes(mv.version, status)
            for kind in ("drift", "quality"):
                key = (mv.name, mv.version, kind)
                current = episodes.get(kind)
                if kind in cfg.triggers and current is not None and self._seen.get(key) != current:
                    await self._submit(Trigger(mv.name, mv.version, kind, current), cfg)
                self._seen[key] = current
            if "latency" in cfg.triggers and self.latency_breached is not None:
                await self._latency(mv, cfg)

    async def _latency(self, mv: Any, cfg: RetrainingConfig) -> None:
        key = (mv.name, mv.version)
        now = time.monotonic()
        if not self.latency_breached(mv.name, mv.version):
            self._breach_since.pop(key, None)
            return
        since = self._breach_since.setdefault(key, now)
        if now - since >= self.latency_for_s:
            await self._submit(Trigger(mv.name, mv.version, "latency", f"latency:{mv.version}:{int(since)}"), cfg)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        async def run() -> None:
            while True:
                try:
                    await self.poll()
                    if self.on_poll is not None:
                        await self.on_poll()
                except Exception:
                    log.exception("event=retrain_poll_failed")
                await asyncio.sleep(self.poll_s)
        self._task = asyncio.get_running_loop().create_task(run(), name="osprey-retraining-triggers")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
