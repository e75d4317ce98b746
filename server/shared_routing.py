"""Routing shared by the replicas behind one load balancer, kept in Redis (with redis_url).

Each model's routing is one Redis hash, ``osprey:routing:model:{name}``: ``revision`` (drawn
from the counter ``osprey:routing:revision``, so it only grows) and ``doc``, JSON::

    {"versions": {VERSION: {"url": URL, "options": {...}, "added": T}},  # registered, and how
     "removed": {VERSION: T},                       # unregistered at wall-clock time T
     "default": V, "previous": [V, ...], "weights": {V: W}, "shadow": V or null}

Writes are compare-and-set on the revision (one Lua script: check, INCR, HSET, PUBLISH), so two
replicas changing one model at the same moment never lose an update: the one that lost re-reads,
applies the newer state, makes its change again and retries. Who writes:

* a routing change taken by any replica (set-default, traffic weights, shadow, rollback):
  :meth:`SharedRouting.change` first brings this replica up to the shared state, makes the change
  here with the usual checks (404, 409) and writes the result; the call is answered once the
  write landed, so a promotion answered 200 is the default of every replica within one sync;
* a version registered or unregistered on a replica (management API, the Open Inference
  Protocol's repository API, a retraining job's challenger, startup models): the registry tells
  :meth:`~SharedRouting.registered` / :meth:`~SharedRouting.unregistered`, which publish it.

Every replica applies the shared state (:meth:`SharedRouting.reconcile`) when a pub/sub message
says a model changed and, whatever happens to messages, every ``routing_sync_interval`` seconds
when the shared revision moved (one GET), so a missed message or a restarted replica converges.
A version it lacks is registered from the shared model store, and the replica routes to it only
once it is READY; a version unregistered elsewhere is unregistered here (unless this replica
registered it again afterwards); a version only this replica holds (a startup model, one
registered while Redis was down) is published. The request path is untouched: it reads the
registry as before, and all of this runs beside it on the event loop.

Per replica, not shared: worker counts (scale), live counters and shadow results (the traffic
API's ``stats``), rollback counts (``osprey_model_rollbacks_total``, summed over replicas).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeout

from server.core.errors import ErrorKind, OspreyError
from server.core.events import event
from server.core.registry import ModelVersion, Registry, newest_version

__all__ = ["SharedRouting", "with_version", "without_version", "PREFIX"]

log = logging.getLogger("osprey.shared_routing")

PREFIX = "osprey:routing:"
REVISION = PREFIX + "revision"
MODELS = PREFIX + "models"
CHANNEL = PREFIX + "changed"
ATTEMPTS = 8  # compare-and-set rounds before a change is refused (another replica kept changing the model)
RETRY_FAILED_S = 10.0  # a version that failed to register here is tried again after this long
SETTLE_ROUNDS = 4  # a starting replica's syncs: load what is shared, then apply the routing, then slack
REMOVED_KEPT = 64  # tombstones of unregistered versions kept per model

_CAS = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'revision') or '0')
if cur ~= tonumber(ARGV[1]) then return -1 end
local rev = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'revision', rev, 'doc', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return rev
"""

Key = tuple[str, str]


def _key(name: str) -> str:
    return f"{PREFIX}model:{name}"


def _empty() -> dict[str, Any]:
    return {"versions": {}, "removed": {}, "default": "", "previous": [], "weights": {}, "shadow": None}


def entry(mv: ModelVersion) -> dict[str, Any]:
    """How another replica registers ``mv`` the same way: its archive and the call's numbers."""
    c = mv.config
    return {"url": mv.url, "added": mv.created,
            "options": {"handler": mv.handler or None, "batch_size": c.batch_size,
                        "max_batch_delay": c.max_batch_delay_ms, "response_timeout": c.response_timeout_s,
                        "initial_workers": c.min_workers}}


def with_version(doc: dict, version: str, item: dict) -> dict:
    """``doc`` with ``version`` registered (kept as it is when it already is)."""
    if version not in doc["versions"]:
        doc["versions"][version] = item
        doc["removed"].pop(version, None)
    if doc["default"] not in doc["versions"]:
        doc["default"] = version
    return doc


def without_version(doc: dict, version: str, when: float) -> dict:
    """``doc`` with ``version`` unregistered, as Registry.unregister leaves a model: the default
    moves to the newest version left, and the version leaves the history, weights and shadow."""
    versions = doc["versions"]
    if version not in versions:
        return doc
    del versions[version]
    doc["removed"][version] = when
    doc["removed"] = dict(sorted(doc["removed"].items(), key=lambda kv: kv[1])[-REMOVED_KEPT:])
    if doc["default"] == version or doc["default"] not in versions:
        doc["default"] = newest_version(versions) if versions else ""
    doc["previous"] = [v for v in doc["previous"] if v in versions and v != doc["default"]]
    weights = {v: w for v, w in doc["weights"].items() if v in versions}
    doc["weights"] = weights if any(weights.values()) else {}
    if doc["shadow"] not in versions or doc["shadow"] == doc["default"]:
        doc["shadow"] = None
    return doc


def _unavailable(exc: Exception) -> OspreyError:
    return OspreyError(ErrorKind.UNAVAILABLE, f"the replicas' shared routing state in Redis is unavailable "
                                              f"({type(exc).__name__}: {exc}); nothing was changed", retry_after=1)


class SharedRouting:
    """This replica's side of the shared routing (see the module's docstring)."""

    def __init__(self, registry: Registry, url: str, interval: float = 1.0):
        self.registry = registry
        self.interval = interval
        # a connection Redis closed (it restarted) is retried on a new one rather than failing a call
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                             retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
                                             retry_on_error=[RedisConnectionError, RedisTimeout])
        # pub/sub waits for messages without a read timeout; its own connection
        self._sub = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, health_check_interval=30)
        self._cas = self.redis.register_script(_CAS)
        self.applied: dict[str, int] = {}  # model -> the shared revision applied completely here
        self.seen = -1  # the shared counter at the last reconcile that left nothing to do
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: dict[Key, asyncio.Task] = {}
        self._dropping: dict[Key, asyncio.Task] = {}
        self._failed: dict[Key, float] = {}  # monotonic time a registration from the shared state failed
        self._removing: dict[Key, float] = {}  # unregistered here, not yet published: wall-clock time
        self._quiet: set[Key] = set()  # registered or unregistered by this module: nothing to publish
        self._poke = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._outage = False

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._spawn(self._listen())
        self._spawn(self._loop())

    async def settle(self, timeout: float) -> bool:
        """Apply the shared state and wait for the versions it names to load here (at most
        ``timeout`` s): a replica reports ready only after this. True when nothing is left; a
        version that fails to load here is logged and left out (tried again later)."""
        try:
            for _ in range(SETTLE_ROUNDS):
                if await asyncio.wait_for(self.reconcile(wait=True), timeout):
                    return True
                await asyncio.sleep(min(self.interval, 0.05))
        except asyncio.TimeoutError:
            log.warning("shared routing: the shared versions did not all load within %g s; serving what is "
                        "loaded here", timeout)
        except RedisError as exc:
            log.warning("shared routing: Redis unavailable while starting (%s); serving what is loaded here", exc)
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self.redis, self._sub):
            try:
                await client.aclose()
            except (RedisError, OSError):
                pass

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # --- the registry's notices ----------------------------------------------------------
    def registered(self, mv: ModelVersion) -> None:
        """A version was registered here: publish it (in the background)."""
        if (mv.name, mv.version) in self._quiet:
            return
        item = entry(mv)
        self._spawn(self._publish(mv.name, lambda doc: with_version(doc, mv.version, item)))

    def unregistered(self, name: str, version: str) -> None:
        """A version was unregistered here: every replica unregisters it (published in the
        background; until then no reconcile registers it here again)."""
        if (name, version) in self._quiet:
            return
        when = time.time()
        self._removing[(name, version)] = when
        self._spawn(self._publish_removal(name, version, when))

    async def _publish(self, name: str, transform: Callable[[dict], dict]) -> None:
        try:
            await self._update(name, transform)
        except (RedisError, OspreyError) as exc:
            self.seen = -1  # the next reconcile looks again (and publishes what is only here)
            log.warning("shared routing: could not publish model %s (%s); retried on the next sync", name, exc)

    async def _publish_removal(self, name: str, version: str, when: float) -> None:
        try:
            await self._update(name, lambda doc: without_version(doc, version, when))
        except (RedisError, OspreyError) as exc:
            log.warning("shared routing: could not publish that model %s version %s was unregistered (%s); "
                        "retried on the next sync", name, version, exc)
            return
        if self._removing.get((name, version)) == when:
            del self._removing[(name, version)]

    # --- Redis -------------------------------------------------------------------------------
    async def _read(self, name: str) -> tuple[int, dict]:
        rev, raw = await self.redis.hmget(_key(name), "revision", "doc")
        doc = _empty()
        if raw:
            doc.update(json.loads(raw))
        return int(rev or 0), doc

    async def _write(self, name: str, expected: int, doc: dict) -> int:
        """Compare-and-set: the new revision, or -1 when the model changed since ``expected``."""
        return int(await self._cas(keys=[_key(name), REVISION, MODELS],
                                   args=[expected, json.dumps(doc), name, CHANNEL]))

    async def _update(self, name: str, transform: Callable[[dict], dict]) -> int:
        for _ in range(ATTEMPTS):
            rev, doc = await self._read(name)
            new = transform(copy.deepcopy(doc))
            if rev and new == doc:
                return rev
            got = await self._write(name, rev, new)
            if got >= 0:
                self._poke.set()
                return got
        raise OspreyError(ErrorKind.CONFLICT, f"model {name} kept changing on other replicas; retry")

    # --- a routing change taken here ---------------------------------------------------
    async def change(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a registry change of model ``name``'s routing, with its checks) on top of
        the shared state and publish what it left; fn's result."""
        async with self._lock(name):
            for _ in range(ATTEMPTS):
                try:
                    rev, doc = await self._read(name)
                    missing = await self._converge(name, rev, doc, wait=True, publish=False) if rev else []
                except RedisError as exc:
                    raise _unavailable(exc) from None
                if missing:
                    raise OspreyError(ErrorKind.UNAVAILABLE, f"model {name}: version(s) {', '.join(missing)} of the "
                                                             "replicas' shared routing are not ready on this replica "
                                                             "yet; retry", retry_after=1)
                result = fn()  # the registry's checks: an error here changed nothing
                new = copy.deepcopy(doc)
                if name in self.registry.models:
                    for mv in self.registry.versions(name):
                        if self._local_only(mv, doc):
                            with_version(new, mv.version, entry(mv))
                    new.update(self.registry.routing_state(name))
                try:
                    got = await self._write(name, rev, new)
                except RedisError as exc:
                    self.applied.pop(name, None)  # the next sync puts the shared state back here
                    self.seen = -1
                    raise _unavailable(exc) from None
                if got >= 0:
                    self.applied[name] = got
                    return result
                self.applied.pop(name, None)  # another replica wrote first: apply its state, then again
            raise OspreyError(ErrorKind.CONFLICT, f"model {name} kept changing on other replicas while this change "
                                                  "was being made; retry")

    # --- applying the shared state here ------------------------------------------------
    def _local_only(self, mv: ModelVersion, doc: dict) -> bool:
        """``mv`` is registered here and the shared state does not know it (not unregistered
        elsewhere after it was registered here, nor being unregistered here)."""
        if mv.version in doc["versions"] or (mv.name, mv.version) in self._removing:
            return False
        removed = doc["removed"].get(mv.version)
        return removed is None or mv.created > removed

    async def _converge(self, name: str, rev: int, doc: dict, *, wait: bool, publish: bool = True) -> list[str]:
        """Bring model ``name`` here to ``doc`` (revision ``rev``); the versions it names that
        cannot take traffic here yet (empty: applied completely). ``publish``: versions only
        this replica holds are published first (a change publishes them with its own write)."""
        reg = self.registry
        model = reg.models.get(name)
        held = dict(model.versions) if model is not None else {}
        local_only = [mv for mv in held.values() if publish and self._local_only(mv, doc)]
        for v, mv in held.items():
            removed = doc["removed"].get(v)
            if v not in doc["versions"] and removed is not None and mv.created <= removed:
                self._drop(name, v)
        loads = [t for v, item in doc["versions"].items()
                 if v not in held and (name, v) not in self._removing
                 and (t := self._load(name, v, item)) is not None]
        if wait and loads:
            await asyncio.gather(*loads, return_exceptions=True)
        if local_only:
            if rev == 0:  # nothing shared yet (a new model, or Redis was emptied): what this replica has
                first = copy.deepcopy(doc)
                for mv in local_only:
                    with_version(first, mv.version, entry(mv))
                first.update(reg.routing_state(name))
                await self._write(name, 0, first)
            else:
                items = {mv.version: entry(mv) for mv in local_only}

                def add(d: dict) -> dict:
                    for v, item in items.items():
                        with_version(d, v, item)
                    return d
                await self._update(name, add)
            self._poke.set()
            return [mv.version for mv in local_only]  # applied on the next round, at the new revision
        model = reg.models.get(name)
        missing = [v for v in doc["versions"] if model is None or v not in model.versions]
        if model is not None and rev:
            missing += reg.adopt(name, doc)
        missing = sorted(set(missing))
        if not missing:
            self.applied[name] = rev
        return missing

    def _load(self, name: str, version: str, item: dict) -> asyncio.Task | None:
        key = (name, version)
        task = self._loading.get(key)
        if task is None:
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() - failed < RETRY_FAILED_S:
                return None
            task = self._spawn(self._register(name, version, item))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return task

    async def _register(self, name: str, version: str, item: dict) -> None:
        options = {k: v for k, v in (item.get("options") or {}).items() if v is not None}
        self._quiet.add((name, version))
        try:
            mv = await self.registry.register(item["url"], model_name=name, **options)
        except OspreyError as exc:
            if exc.kind is not ErrorKind.CONFLICT:  # CONFLICT: registered here meanwhile
                self._failed[(name, version)] = time.monotonic()
                log.error("shared routing: model %s version %s from %s could not be registered here: %s; "
                          "tried again in %g s", name, version, item.get("url"), exc.message, RETRY_FAILED_S)
            return
        except Exception:
            self._failed[(name, version)] = time.monotonic()
            log.exception("shared routing: registering model %s version %s failed", name, version)
            return
        finally:
            self._quiet.discard((name, version))
        self._failed.pop((name, version), None)
        if mv.version != version:  # not tried again until the retry delay: the archive is not what was shared
            self._failed[(name, version)] = time.monotonic()
            log.error("shared routing: %s holds model %s version %s, not %s as the shared state says",
                      item.get("url"), name, mv.version, version)
        event(log, "shared_version_registered", model=name, version=mv.version, url=item.get("url"))
        self._poke.set()

    def _drop(self, name: str, version: str) -> None:
        key = (name, version)
        if key in self._dropping:
            return

        async def run() -> None:
            self._quiet.add(key)
            try:
                await self.registry.unregister(name, version, force=True)
                event(log, "shared_version_unregistered", model=name, version=version)
            except OspreyError as exc:
                if exc.kind is not ErrorKind.NOT_FOUND:
                    log.error("shared routing: unregistering model %s version %s here failed: %s",
                              name, version, exc.message)
            finally:
                self._quiet.discard(key)
                self._dropping.pop(key, None)
                self._poke.set()
        self._dropping[key] = self._spawn(run())

    async def reconcile(self, *, wait: bool = False) -> bool:
        """Apply whatever changed in the shared state since the last time; True when this
        replica matches it completely. RedisError when Redis cannot be reached."""
        for (name, version), when in list(self._removing.items()):
            await self._update(name, lambda doc: without_version(doc, version, when))
            if self._removing.get((name, version)) == when:
                del self._removing[(name, version)]
        rev = int(await self.redis.get(REVISION) or 0)
        if rev == self.seen and not wait:
            return True
        names = {n.decode() for n in await self.redis.smembers(MODELS)} | set(self.registry.models)
        complete = True
        for name in sorted(names):
            lock = self._lock(name)
            if lock.locked():  # a change of this model is being made here: the next round
                complete = False
                continue
            async with lock:
                r, doc = await self._read(name)
                if r and self.applied.get(name) == r and not self._drifted(name, doc):
                    continue
                if await self._converge(name, r, doc, wait=wait):
                    complete = False
        if complete and not self._loading and not self._dropping:
            self.seen = rev
        return complete

    def _drifted(self, name: str, doc: dict) -> bool:
        """Applied, but this replica's versions no longer match (a version lost here, or one
        registered here that the shared state does not list yet)."""
        model = self.registry.models.get(name)
        held = set(model.versions) if model is not None else set()
        return held != set(doc["versions"])

    async def _loop(self) -> None:
        while True:
            self._poke.clear()
            try:
                await self.reconcile()
                if self._outage:
                    log.info("shared routing: Redis reachable again")
                    self._outage = False
            except RedisError as exc:
                if not self._outage:
                    log.warning("shared routing: Redis unavailable (%s); this replica keeps its routing and "
                                "syncs again once Redis answers", exc)
                    self._outage = True
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("shared routing: sync failed")
            try:
                await asyncio.wait_for(self._poke.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def _listen(self) -> None:
        """A pub/sub message naming a changed model: sync now rather than at the next tick."""
        while True:
            try:
                async with self._sub.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self._poke.set()  # anything published while not subscribed
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.seen = -1
                            self._poke.set()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                await asyncio.sleep(self.interval)
