"""Models by name and version: register, scale, set the default version, unregister.

Each model version owns its archive, its typed config, its batcher and its instances.
Requests name a model and optionally a version; without one they go to the default
version, so a new version can be loaded under traffic and swapped in with
:meth:`Registry.set_default` (the seam for hot swap after retraining).

Supervision of instances lives here, in one place (:meth:`Registry._lost`): an instance that
is lost (its process crashed or was killed, a hung thread was abandoned) is taken out of
service, only the requests it was running fail (503 naming the crash), and a replacement
is started with the same index after an exponential backoff. ``crash_loop_restarts``
crashes within ``crash_loop_window`` seconds, or ``max_abandoned_threads`` hung threads,
stop the restarts and mark the version unhealthy (``/ping``, readiness, describe).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from server.core import heap
from server.core.archive import ExtractionArea, ModelArchive, download_target_in_store, open_archive
from server.core.batching import Batcher
from server.core.events import event
from server.core.errors import TS_STARTUP_TIMEOUT_LINE, ErrorKind, OspreyError, StartupTimeout, show
from server.core.model_deps import install_requirements
from server.core.model_config import LIMITS, ModelConfig, number, parse_model_config
from server.core.routing import HISTORY, Routing, Split, check_weights, remember
from server.core.shadow import RESULTS
from server.core.stats import VersionStats
from server.core.signature import Signature, signature_of
from server.core.instance import Instance, InstanceFactory, InstanceStatus
from server.core.worker_lines import worker_lines
from server.settings import Settings

__all__ = ["ModelVersion", "Registry", "newest_version"]

log = logging.getLogger("osprey.registry")

RELEASE_WAIT_S = 600.0  # most time to wait for removed instances' threads before the heap is released anyway
RELEASE_POLL_S = 0.1
MAX_URL_CHARS = 4096  # longest model URL accepted (Linux paths are at most 4096 bytes)
MAX_NAME_CHARS = 255  # longest model name (one file-name component)
MAX_VERSION_CHARS = 128  # longest model version
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_VERSION = re.compile(r"[A-Za-z0-9][^/\\\s\x00-\x1f\x7f%?#]*")  # no path separator, space, control, URL mark
_LIVE = (InstanceStatus.READY, InstanceStatus.LOADING)


def _reason(exc: Exception) -> str:
    """Why a path could not be used, without echoing the server's own folders."""
    return getattr(exc, "strerror", None) or str(exc)


@dataclass
class ModelVersion:
    name: str
    version: str
    url: str
    archive: ModelArchive
    config: ModelConfig
    batcher: Batcher
    loaded_at_startup: bool = False
    instances: list[Instance] = field(default_factory=list)
    load_seconds: float = 0.0
    created: float = field(default_factory=time.time)
    scaling: asyncio.Lock = field(default_factory=asyncio.Lock)  # one scale at a time (the cap holds)
    signature: Signature = field(default_factory=Signature)  # declared tensors, final once an instance loaded
    isolation: str = "thread"  # how its instances run: thread | process
    unhealthy: str | None = None  # why the version stopped restarting its instances (crash loop), or None
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent instance crashes
    restarts: int = 0  # instances restarted (osprey_instance_restarts_total)
    abandoned: list = field(default_factory=list)  # hung thread instances that have not ended yet
    abandoned_total: int = 0  # osprey_instances_abandoned_total
    stats: VersionStats = field(default_factory=VersionStats)  # live counters (DataPlane.version_stats)
    shadow_results: dict = field(default_factory=dict)  # result -> copies, once it has been a shadow
    workflow: str | None = None  # the workflow that registered it as one of its nodes (server.workflows), or None
    draining: bool = False  # unregistered, answering what was queued first: an instance lost meanwhile is restarted

    @property
    def handler(self) -> str:
        return self.archive.handler

    @property
    def ready(self) -> bool:
        return self.unhealthy is None and any(i.status == InstanceStatus.READY for i in self.instances)

    @property
    def ready_instances(self) -> int:
        return sum(i.status == InstanceStatus.READY for i in self.instances)

    @property
    def accepts_tensors(self) -> bool:
        return self.signature.accepts_tensors


@dataclass
class _Model:
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    default: str = ""
    previous: list[str] = field(default_factory=list)  # earlier defaults, most recent last (rollback)
    rollbacks: int = 0  # rollbacks done (osprey_model_rollbacks_total)


def _workers(mv: ModelVersion) -> str:
    """``workers: READY/LOADING`` or ``no workers`` (why a version cannot take traffic)."""
    states = sorted({str(i.status) for i in mv.instances})
    return f"workers: {'/'.join(states)}" if states else "no workers"


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-]", v))


def newest_version(versions) -> str:
    """The highest of ``versions`` (1.10 after 1.9): the default once the default is unregistered."""
    return max(versions, key=_version_key)


class Registry:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop, instance_factory: InstanceFactory,
                 on_batch: Callable[[ModelVersion, list], None] | None = None,
                 on_release: Callable[[ModelVersion], None] | None = None):
        self.settings = settings
        self.loop = loop
        self.models: dict[str, _Model] = {}
        # models with canary weights or a shadow, and only those: a request to any other model,
        # or to any model while this is empty, is routed as before (see route)
        self.routes: dict[str, Routing] = {}
        self._new_instance = instance_factory
        # the lines (and timeout answer) of lost and replaced instances: Osprey's or TorchServe's
        self.lines = worker_lines(settings.worker_lifecycle, log)
        self._on_batch = on_batch
        self._loading: dict[tuple[str, str], ModelVersion] = {}  # registering, not yet listed
        self._tasks: set[asyncio.Task] = set()
        self._retired_threads: list[Instance] = []
        self._retired_versions: list[ModelVersion] = []
        self._on_release = on_release  # told once an unregistered version's threads have ended
        self.heap_settled = False  # set once startup models are loaded and the heap frozen
        self._release_task: asyncio.Task | None = None
        self.work_root = Path(settings.workdir) / ".osprey" / "models"
        self.extractions = ExtractionArea(self.work_root)  # this server's folder under work_root
        # with redis_url: server.shared_routing.SharedRouting, told of each version registered and
        # unregistered here (it publishes them to the replicas' shared state); None: this process alone
        self.shared: Any = None
        # told (no arguments, synchronously) after each change a management call can make:
        # register, unregister, scale, set_default, rollback (server.snapshots writes TorchServe's
        # config snapshot then); workflows' own nodes are left out. It must not raise into the
        # change: what it raises is logged
        self.on_change: Callable[[], None] | None = None

    def _changed(self, mv: ModelVersion | None = None) -> None:
        """Tell on_change of a change (of ``mv``: not when it is a workflow's node)."""
        if self.on_change is None or (mv is not None and mv.workflow is not None):
            return
        try:
            self.on_change()
        except Exception:
            log.exception("the model change observer failed (the change itself is made)")

    # --- lookups --------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelVersion:
        model = self.models.get(name)
        if model is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found: {name}")
        if not version:
            return model.versions[model.default]
        mv = model.versions.get(version)
        if mv is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model version: {version} does not exist for model: {name}",
                              type_name="ModelVersionNotFoundException")
        return mv

    def versions(self, name: str) -> list[ModelVersion]:
        model = self.models.get(name)
        if model is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found: {name}")
        return sorted(model.versions.values(), key=lambda m: _version_key(m.version))

    def default_version(self, name: str) -> str:
        return self.get(name).version

    def all_versions(self) -> list[ModelVersion]:
        return [mv for m in self.models.values() for mv in m.versions.values()]

    def list_page(self, limit: int, token: int) -> tuple[list[ModelVersion], int | None]:
        """The default versions of up to ``limit`` models from position ``token`` (by name),
        and the token of the next page (None on the last)."""
        names = sorted(self.models)
        page = [self.get(n) for n in names[token: token + limit]]
        return page, (token + limit if token + limit < len(names) else None)

    # --- registration ---------------------------------------------------------------
    @property
    def max_workers(self) -> int:
        """Most instances one model version may run (setting max_workers_per_model)."""
        return max(1, self.settings.max_workers_per_model)

    def _started_workers(self, key: str, value: Any) -> int:
        """A count of workers to start (initial_workers, min_worker): at most the cap."""
        return number("", key, value, maximum=self.max_workers, maximum_from="max_workers_per_model")

    def _held(self, mv: ModelVersion) -> bool:
        """The registry still holds ``mv`` (listed, or being registered): not unregistered."""
        model = self.models.get(mv.name)
        listed = model is not None and model.versions.get(mv.version) is mv
        return listed or self._loading.get((mv.name, mv.version)) is mv

    def _unregistered(self, mv: ModelVersion) -> OspreyError:
        return OspreyError(ErrorKind.NOT_FOUND, f"Model {mv.name} version {mv.version} was unregistered "
                                                "while its workers were starting")

    def resolve_url(self, url: str) -> Path:
        """An archive in the model store (by file name), or a file:// path allowed by allowed_urls.

        The model store is the operator's own folder: an archive there may be a symbolic link to
        an archive elsewhere, and it is followed, as TorchServe does. What keeps a caller inside
        the store is the URL itself: it may not climb out with ``..`` nor name a path outside it
        (checked on the text, before any link is followed). Extracting the archive's members stays
        safe whatever the link points at (server.core.archive refuses absolute, ``..`` and link
        members)."""
        if not isinstance(url, str):
            raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter url must be a string, got {type(url).__name__}")
        if "\x00" in url:
            raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter url must not contain a NUL character: {show(url)}")
        if len(url) > MAX_URL_CHARS:
            raise OspreyError(ErrorKind.BAD_INPUT,
                              f"Parameter url is {len(url)} characters long; at most {MAX_URL_CHARS} are allowed")
        if ".." in re.split(r"[/\\]", url):
            # TorchServe 0.12's answer, for a path or a URL (http, file) alike, checked before
            # anything else. Its 404 is kept (its clients test for it). It refuses ".." anywhere
            # in the text ("a..b.mar" too, a quirk); Osprey refuses it as a path segment only.
            raise OspreyError(ErrorKind.NOT_FOUND, f"Relative path is not allowed in url: "
                                                   f"{url if len(url) <= 200 else show(url)}")
        if re.match(r"^https?://", url, re.I):
            # Osprey downloads nothing; a file already in the store gets TorchServe's 500 (see there)
            name = download_target_in_store(self.settings.model_store, url)
            if name is not None:
                raise OspreyError(ErrorKind.INTERNAL, f"Model file already exists {name}")
        if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I) and not url.lower().startswith("file://"):
            raise OspreyError(ErrorKind.BAD_INPUT,
                              f"Model URL {url!r}: downloading archives is not supported; put the archive in the model store")
        if url.lower().startswith("file://"):
            if not any(re.fullmatch(p, url) for p in self.settings.allowed_urls):
                raise OspreyError(ErrorKind.BAD_INPUT, f"Model URL {url!r} is not allowed by allowed_urls")
            return Path(url[7:])
        store = Path(os.path.abspath(self.settings.model_store))
        path = Path(os.path.normpath(store / url))  # no ".." left: normpath only drops "." and "//"
        if store != path and store not in path.parents:
            # an absolute path elsewhere: TorchServe 0.12 looks for it in the model store and
            # answers 404 "Model not found at: URL"; its status and words, then why
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found at: {url if len(url) <= 200 else show(url)} "
                                                   "(it is outside the model store)")
        return path

    def check_name(self, name: Any) -> str:
        """``name`` if it may name a model (BAD_INPUT saying why not)."""
        return self._check_name(name)

    def _check_name(self, name: Any) -> str:
        if not isinstance(name, str):
            raise OspreyError(ErrorKind.BAD_INPUT, f"Model name must be a string, got {type(name).__name__}")
        if len(name) > MAX_NAME_CHARS:
            raise OspreyError(ErrorKind.BAD_INPUT,
                              f"Model name is {len(name)} characters long; at most {MAX_NAME_CHARS} are allowed")
        if not _NAME.fullmatch(name):
            raise OspreyError(ErrorKind.BAD_INPUT,
                              f"Model name {show(name)} may hold only ASCII letters, digits, '_', '-' and '.', "
                              "starting with a letter or a digit")
        return name

    @staticmethod
    def _check_version(version: Any) -> str:
        """A manifest's modelVersion: it names folders (per-model packages) and URL path parts
        (``/models/NAME/VERSION``), so it takes the model name's characters, without a slash or
        a leading dot (a version ``../../x`` put per-model packages outside the state folder)."""
        if not isinstance(version, str) or not version or len(version) > MAX_VERSION_CHARS or \
                not _VERSION.fullmatch(version):
            raise OspreyError(ErrorKind.BAD_INPUT,
                              f"Model version {show(version)} in the archive's manifest must be 1 to "
                              f"{MAX_VERSION_CHARS} characters starting with a letter or a digit, without '/', '\\', "
                              "spaces, control characters, '%', '?' or '#' (e.g. 1.0)")
        return version

    async def register(self, url: str, *, model_name: str | None = None, handler: str | None = None,
                       batch_size: int | None = None, max_batch_delay: float | None = None,
                       initial_workers: int | None = None, response_timeout: float | None = None,
                       startup_timeout: float | None = None, synchronous: bool = True,
                       loaded_at_startup: bool = False, runtime: str | None = None,
                       default_workers: int | None = None, path: Path | None = None,
                       workflow: str | None = None) -> ModelVersion:
        """Open the archive at ``url``, check the call's numbers, start the version's workers
        (or, ``synchronous=False``, start them in the background) and list it.

        Workers: ``initial_workers``, else the archive's minWorkers, else ``default_workers``
        (the TorchServe register API passes default_workers_per_model, which may be 0: no
        workers), else default_workers_per_model or 1. ``startup_timeout=0`` is accepted, as
        TorchServe accepts it; no worker can load in no time, so a synchronous register that
        would start workers fails at once with TorchServe's 500 (its answer: a worker start
        that timed out), and the version is not kept."""
        if path is None:  # ``path``: an archive the server made itself (a workflow's function node), not a url
            if not url:
                raise OspreyError(ErrorKind.BAD_INPUT, "Parameter url is required.")
            path = self.resolve_url(url)
        if model_name is not None:
            self._check_name(model_name)
        if handler is not None and (not isinstance(handler, str) or "\x00" in handler or len(handler) > MAX_URL_CHARS):
            raise OspreyError(ErrorKind.BAD_INPUT, f"Parameter handler must be a module or file name, got {show(handler)}")
        # the call's numbers, checked before any work and named as the caller named them
        if batch_size is not None:
            batch_size = number("", "batch_size", batch_size, minimum=1, maximum=LIMITS["batchSize"])
        if max_batch_delay is not None:
            max_batch_delay = number("", "max_batch_delay", max_batch_delay, float, maximum=LIMITS["maxBatchDelay"])
        if response_timeout is not None:
            response_timeout = number("", "response_timeout", response_timeout, float, minimum=0.001,
                                      maximum=LIMITS["responseTimeout"])
        if startup_timeout is not None:
            startup_timeout = number("", "startup_timeout", startup_timeout, float, minimum=0,
                                     maximum=LIMITS["startupTimeout"])
        if initial_workers is not None:
            initial_workers = self._started_workers("initial_workers", initial_workers)
        try:
            found = path.exists()
        except (OSError, ValueError) as exc:  # e.g. a file name longer than the file system allows
            raise OspreyError(ErrorKind.BAD_INPUT, f"Model URL {show(url)} is not a usable path: {_reason(exc)}") from None
        if not found:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found at: {url if len(url) <= 200 else show(url)}")
        archive = await self.loop.run_in_executor(
            None, lambda: open_archive(path, self.extractions.folder(), self.settings.max_archive_size))
        try:
            name = self._check_name(model_name or archive.name)
            if handler:
                archive.manifest["model"]["handler"] = handler
            if runtime:
                archive.manifest["runtime"] = runtime
            version = self._check_version(archive.version)
            model = self.models.get(name)
            if (model and version in model.versions) or (name, version) in self._loading:
                raise OspreyError(ErrorKind.CONFLICT, f"Model version {version} is already registered for model {name}")
            overrides = {"batchSize": batch_size, "maxBatchDelay": max_batch_delay,
                         "responseTimeout": response_timeout, "startupTimeout": startup_timeout or None}
            source = f"{Path(url).name}: model-config"
            if initial_workers is not None:
                overrides["minWorkers"] = initial_workers
                configured = archive.config.get("maxWorkers")
                overrides["maxWorkers"] = initial_workers if configured is None else max(
                    initial_workers, number(source, "maxWorkers", configured))
            if default_workers is None:
                default_workers = self.settings.default_workers_per_model or 1
            config = parse_model_config(
                archive.config, overrides=overrides, default_workers=max(default_workers, 0),
                default_response_timeout=self.settings.default_response_timeout,
                default_queue_size=self.settings.job_queue_size, source=source, worker_cap=self.max_workers)
            if startup_timeout == 0:
                config = dataclasses.replace(config, startup_timeout_s=0.0)
                if synchronous and config.min_workers > 0:
                    # TorchServe: the workers time out at once, "Failed to start workers", 500
                    raise OspreyError(ErrorKind.INTERNAL, f"Failed to start workers for model {name} version: "
                                                          f"{version} (startup_timeout is 0: no worker can load "
                                                          "in no time)")
        except BaseException:
            archive.cleanup()
            raise
        if archive.requirements_file and config.isolation is None and self.settings.install_py_dep_per_model:
            # its packages go first on the import path of its own processes, never into the one
            # interpreter all thread instances share (README "Per-model Python packages")
            config = dataclasses.replace(config, isolation="process")
        batcher = Batcher(name, version, batch_size=config.batch_size,
                          max_batch_delay_s=config.max_batch_delay_ms / 1000,
                          queue_size=config.job_queue_size, loop=self.loop,
                          hang_after_s=config.response_timeout_s + max(self.settings.hang_grace, 0.0),
                          running_timeout=self.lines.running_timeout)
        mv = ModelVersion(name, version, url, archive, config, batcher, loaded_at_startup=loaded_at_startup,
                          signature=signature_of(config, None, False),
                          isolation=config.isolation or self.settings.instance_isolation, workflow=workflow)
        batcher.on_hung = functools.partial(self._hung, mv)
        if self._on_batch is not None:
            batcher.on_batch = functools.partial(self._on_batch, mv)
        self._loading[(name, version)] = mv
        try:
            await self._install_requirements(mv)
            if synchronous:
                await self._start_instances(mv, config.min_workers)
            else:
                self._background(self._start_in_background(mv))
        except BaseException:
            self._loading.pop((name, version), None)
            self._stop(mv)
            raise
        self._loading.pop((name, version), None)
        model = self.models.setdefault(name, _Model())
        model.versions[version] = mv
        if not model.default:
            model.default = version
        event(log, "model_registered", model=name, version=version, workers=len(mv.instances),
              batch_size=config.batch_size, isolation=mv.isolation)
        if self.shared is not None and workflow is None:  # a workflow's nodes are this replica's own
            self.shared.registered(mv)
        self._changed(mv)
        return mv

    async def _install_requirements(self, mv: ModelVersion) -> None:
        """The archive's requirements.txt, installed for this version when install_py_dep_per_model
        is on (before any instance starts, as TorchServe installs them before its workers); else
        one log line saying it is not."""
        archive = mv.archive
        if archive.config.get("useVenv") is True:
            log.warning("model %s version %s: model-config.yaml says useVenv: true; Osprey has no per-model virtual "
                        "environments: its requirements (with install_py_dep_per_model) go to a folder of its own, "
                        "first on its process instances' import path", mv.name, mv.version)
        if not archive.requirements_file:
            return
        if not self.settings.install_py_dep_per_model:
            log.info("model %s version %s: its archive names %s, which is not installed (install_py_dep_per_model "
                     "is off)", mv.name, mv.version, archive.requirements_file)
            return
        root = Path(self.settings.state_dir or Path(self.settings.workdir) / ".osprey") / "deps"
        archive.deps_dir = await install_requirements(mv.name, mv.version, archive.model_dir,
                                                      archive.requirements_file, root,
                                                      self.settings.py_dep_install_timeout)
        if mv.isolation == "thread":
            log.warning("model %s version %s runs thread instances (its model-config.yaml says isolation: thread): "
                        "the packages of its requirements.txt are added at the end of the import path of the one "
                        "interpreter every thread instance shares, so they add packages but never replace ones "
                        "the server or another model imported; isolation: process keeps them to its own processes",
                        mv.name, mv.version)

    def _background(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_in_background(self, mv: ModelVersion) -> None:
        try:
            async with mv.scaling:
                if not self._held(mv):
                    raise self._unregistered(mv)
                await self._start_instances(mv, mv.config.min_workers)
        except Exception as exc:
            if not self._held(mv):  # unregistered while loading: nothing failed
                log.info("model %s version %s was unregistered before it finished loading", mv.name, mv.version)
                return
            message = exc.message if isinstance(exc, OspreyError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, StartupTimeout):  # in TorchServe's words too (a second line), which scripts read
                message = f"Backend worker error: {message}\n{TS_STARTUP_TIMEOUT_LINE}"
            log.error("model %s version %s failed to load: %s; unregistering it", mv.name, mv.version, message)
            model = self.models.get(mv.name)
            if model is not None and model.versions.get(mv.version) is mv:
                await self.unregister(mv.name, mv.version, force=True)

    async def _start_instances(self, mv: ModelVersion, count: int) -> None:
        """Start ``count`` more instances (never past max_workers_per_model) and wait until
        they load; if any fails to start or load, or ``mv`` is unregistered meanwhile, the
        ones started here are stopped and removed again."""
        t0 = time.monotonic()
        live = sum(i.status in _LIVE for i in mv.instances)
        count = min(count, self.max_workers - live)
        new = []
        try:
            for _ in range(count):
                index = len(mv.instances)
                inst = self._new_instance(mv.name, mv.version, mv.archive, mv.config, index)
                inst.on_lost = functools.partial(self._lost, mv)
                inst.siblings = mv.instances
                mv.instances.append(inst)
                new.append(inst)
                try:
                    inst.start()
                except RuntimeError as exc:  # "can't start new thread": out of threads or memory
                    raise OspreyError(ErrorKind.UNAVAILABLE, f"Model {mv.name} version {mv.version}: could not start "
                                                             f"worker {len(new)} of {count} ({exc})") from None
                await asyncio.sleep(0)  # let requests run between thread starts
                if not self._held(mv):
                    raise self._unregistered(mv)
            await asyncio.gather(*(i.wait_loaded(mv.config.startup_timeout_s) for i in new))
            if not self._held(mv):
                raise self._unregistered(mv)
        except BaseException as exc:
            for inst in new:
                inst.stop()
                if inst in mv.instances:
                    mv.instances.remove(inst)
            if isinstance(exc, Exception) and not self._held(mv):  # stopped by unregister, not failed
                raise self._unregistered(mv) from None
            raise
        if new and not any(i.status == InstanceStatus.READY for i in mv.batcher.all_instances()):
            mv.signature = signature_of(mv.config, new[0].tensor_specs(), new[0].accepts_tensors,
                                        new[0].model_precision())
        for inst in new:
            if inst.status == InstanceStatus.READY:  # one lost meanwhile (its process died) is being restarted
                mv.batcher.add_instance(inst)
        if new and mv.unhealthy is not None:  # scaled up again by hand: give it another chance
            event(log, "model_healthy", model=mv.name, version=mv.version, was=mv.unhealthy)
            mv.unhealthy = None
            mv.crashes.clear()
        mv.load_seconds = time.monotonic() - t0
        if self.heap_settled:  # startup loads are frozen once, all together, by serve
            heap.freeze()

    def plan_scale(self, name: str, version: str | None, min_worker: int | None,
                   max_worker: int | None) -> tuple[ModelVersion, int, int]:
        """Check a scale request; return the model version and its new (min, max)."""
        mv = self.get(name, version)
        lo = mv.config.min_workers if min_worker is None else self._started_workers("min_worker", min_worker)
        hi = max(lo, mv.config.max_workers) if max_worker is None else number("", "max_worker", max_worker,
                                                                              maximum=LIMITS["maxWorkers"])
        if hi < lo:
            raise OspreyError(ErrorKind.BAD_INPUT, f"max_worker ({hi}) cannot be less than min_worker ({lo})")
        return mv, lo, hi

    async def scale(self, name: str, version: str | None, min_worker: int | None,
                    max_worker: int | None) -> ModelVersion:
        """Run ``min_worker`` instances (TorchServe starts the minimum; ``max_worker`` is only
        recorded). Scale calls for one version run one after another, so together they never
        pass max_workers_per_model; one that finds the version unregistered is NOT_FOUND."""
        mv, lo, hi = self.plan_scale(name, version, min_worker, max_worker)
        async with mv.scaling:
            if not self._held(mv):
                raise self._unregistered(mv)
            mv.config = dataclasses.replace(mv.config, min_workers=lo, max_workers=hi)
            live = [i for i in mv.instances if i.status in _LIVE]
            if lo > len(live):
                await self._start_instances(mv, lo - len(live))
            elif lo < len(live):
                answered = 0
                if lo == 0:  # the last workers go: first answer what is queued for them
                    answered, _ = await self._finish_queued(mv)
                    if not self._held(mv):  # unregistered meanwhile: the unregister stopped them
                        raise OspreyError(ErrorKind.NOT_FOUND, f"Model {mv.name} version {mv.version} was "
                                                               "unregistered while it was being scaled to 0 workers")
                removed = mv.batcher.remove_instances(len(live) - lo)
                for inst in removed:
                    if inst in mv.instances:
                        mv.instances.remove(inst)
                if mv.batcher.instances <= 0:
                    mv.batcher.fail_all(OspreyError(ErrorKind.UNAVAILABLE,
                                                    f"Model \"{mv.name}\" version {mv.version} was scaled to 0 workers "
                                                    "before this request could run"))
                self._release_heap_after(removed)
            if lo != len(live):
                event(log, "model_scaled", model=mv.name, version=mv.version, workers_before=len(live), workers=lo,
                      **({"answered_first": answered} if lo == 0 else {}))
        self._changed(mv)
        return mv

    def scale_in_background(self, name: str, version: str | None, min_worker: int | None,
                            max_worker: int | None) -> None:
        """:meth:`scale` as a task (the API's synchronous=false); a failure is logged."""
        async def run() -> None:
            try:
                await self.scale(name, version, min_worker, max_worker)
            except Exception as exc:
                message = exc.message if isinstance(exc, OspreyError) else f"{type(exc).__name__}: {exc}"
                if isinstance(exc, OspreyError) and exc.kind is ErrorKind.NOT_FOUND:  # unregistered meanwhile
                    log.info("scaling model %s to %s workers stopped: %s", name, min_worker, message)
                else:
                    log.error("scaling model %s to %s workers failed: %s", name, min_worker, message)
        self._background(run())

    # --- supervision: lost instances, restarts, crash loops, hangs ---------------------
    def _lost(self, mv: ModelVersion, inst: Instance, reason: str, *, crash: bool = True) -> None:
        """On the loop: ``inst`` is gone (``reason``: exit status, signal, hang). Fail what it
        ran, take it out of service and restart it (backoff), unless the version crash-loops."""
        known = inst in mv.instances and (self._held(mv) or mv.draining)
        if known:
            mv.instances.remove(inst)
            self.lines.lost(mv, inst, reason)
            self._schedule_restart(mv, inst.index, reason, crash=crash)
        mv.batcher.lose(inst, OspreyError(
            ErrorKind.UNAVAILABLE, f"Model \"{mv.name}\" version {mv.version}: the worker running this request "
                                   f"{'crashed' if crash else 'was replaced'} ({reason}); retry"))

    def _schedule_restart(self, mv: ModelVersion, index: int, reason: str, *, crash: bool) -> None:
        s = self.settings
        delay = 0.0
        if crash:
            now = time.monotonic()
            mv.crashes = [t for t in mv.crashes if now - t < s.crash_loop_window] + [now]
            if len(mv.crashes) >= max(1, s.crash_loop_restarts):
                mv.unhealthy = (f"crash loop: {len(mv.crashes)} crashes within {s.crash_loop_window:g} s "
                                f"(last: {reason}); not restarting")
                event(log, "model_unhealthy", logging.ERROR, model=mv.name, version=mv.version, reason=mv.unhealthy)
                return
            delay = min(s.instance_restart_backoff * 2 ** (len(mv.crashes) - 1), s.instance_restart_backoff_max)
        self.lines.restarting(mv, index, delay)
        mv.batcher.restarting += 1
        self._background(self._restart(mv, index, delay))

    async def _restart(self, mv: ModelVersion, index: int, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            if not self._held(mv) and not mv.draining:  # (unregistered, with requests queued: restarted for them)
                return
            live = sum(i.status in _LIVE for i in mv.instances)
            if live >= mv.config.min_workers:  # a scale call meanwhile already brought it to its minimum
                log.info("model %s version %s: instance %d not restarted: %d workers run (minWorkers %d)",
                         mv.name, mv.version, index, live, mv.config.min_workers)
                return
            inst = self._new_instance(mv.name, mv.version, mv.archive, mv.config, index)
            inst.on_lost = functools.partial(self._lost, mv)
            inst.siblings = mv.instances
            mv.instances.append(inst)
            try:
                inst.start()
                await inst.wait_loaded(mv.config.startup_timeout_s)
            except Exception as exc:
                inst.stop()
                if inst in mv.instances:
                    mv.instances.remove(inst)
                if self._held(mv) or mv.draining:
                    message = exc.message if isinstance(exc, OspreyError) else f"{type(exc).__name__}: {exc}"
                    self.lines.restart_failed(mv, index, message)
                    self._schedule_restart(mv, index, f"restart failed: {message}", crash=True)
                return
            if (not self._held(mv) and not mv.draining) or inst not in mv.instances:  # unregistered, or lost again
                inst.stop()
                return
            mv.restarts += 1
            self.lines.restarted(mv, index)
            mv.batcher.add_instance(inst)
        finally:
            mv.batcher.restarting -= 1
            if mv.batcher.instances <= 0:
                mv.batcher.fail_all(OspreyError(ErrorKind.UNAVAILABLE, f"Model \"{mv.name}\" version {mv.version} "
                                                                       f"has no worker left ({mv.unhealthy or 'restart failed'})"))

    def _hung(self, mv: ModelVersion, inst: Instance, seconds: float) -> None:
        """The batcher saw ``inst`` busy past responseTimeout plus the grace: replace it."""
        reason = (f"busy {seconds:.1f} s, past the model's responseTimeout of {mv.config.response_timeout_s:g} s")
        in_a_row = mv.batcher.hung_in_a_row
        if inst.kill():  # a process: killed; its reader reports it lost too (then ignored)
            self.lines.hung(mv, inst, in_a_row, reason, "killed")
            self._lost(mv, inst, f"killed: {reason}", crash=True)
            return
        mv.abandoned = [i for i in mv.abandoned if not i.ended] + [inst]
        mv.abandoned_total += 1
        self.lines.hung(mv, inst, in_a_row, reason, "abandoned", abandoned_alive=len(mv.abandoned))
        if len(mv.abandoned) >= max(1, self.settings.max_abandoned_threads):
            mv.unhealthy = (f"{len(mv.abandoned)} hung threads abandoned (limit max_abandoned_threads); "
                            "not starting more")
            event(log, "model_unhealthy", logging.ERROR, model=mv.name, version=mv.version, reason=mv.unhealthy)
            if inst in mv.instances:
                mv.instances.remove(inst)
            mv.batcher.lose(inst, OspreyError(ErrorKind.UNAVAILABLE, f"Model \"{mv.name}\" version {mv.version}: "
                                                                     f"the worker hung ({reason})"))
            return
        self._lost(mv, inst, f"abandoned: {reason}", crash=False)

    def set_default(self, name: str, version: str) -> None:
        """Send requests that name no version to ``version``: only once it can serve them
        (a version still loading, failed or without workers is refused, 409). The old default
        is remembered for :meth:`rollback`. Canary weights are left as they are (they name
        versions, not roles: promotion is set_default, then set_traffic(name, None)); a shadow
        that becomes the default stops being the shadow."""
        model = self._model(name)
        mv = self._version(model, name, version)
        if not mv.ready:
            raise OspreyError(ErrorKind.CONFLICT, f"Model {name} version {version} is not ready to serve "
                                                  f"({_workers(mv)}); it can become the default once a worker is READY")
        old, model.default = model.default, version
        if old != version:
            remember(model.previous, old, version)
            r = self.routes.get(name)
            if r is not None and r.shadow == version:
                r.shadow = None
                self._tidy(name)
            event(log, "default_version_changed", model=name, old=old, new=version)
        self._changed()  # also when it already was the default, as TorchServe writes its snapshot then too

    # --- traffic: canary weights, shadow, rollback (server.core.routing) --------------
    def _model(self, name: str) -> _Model:
        model = self.models.get(name)
        if model is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found: {name}")
        return model

    @staticmethod
    def _version(model: _Model, name: str, version: str) -> ModelVersion:
        mv = model.versions.get(version)
        if mv is None:
            raise OspreyError(ErrorKind.NOT_FOUND, f"Model version {version} does not exist for model {name}",
                              type_name="ModelVersionNotFoundException")
        return mv

    def _tidy(self, name: str) -> None:
        r = self.routes.get(name)
        if r is not None and r.empty:
            del self.routes[name]

    def route(self, name: str) -> ModelVersion:
        """The version answering a request to ``name`` that named none: drawn by the model's
        weights, else the default. A drawn version that cannot serve now (no READY worker,
        crash loop) gives way to the default. The data plane calls this only while
        :attr:`routes` is not empty."""
        model = self._model(name)
        r = self.routes.get(name)
        if r is not None:
            version = r.pick()
            if version is not None and version != model.default:
                mv = model.versions.get(version)
                if mv is not None and mv.ready:
                    return mv
        return model.versions[model.default]

    def shadow_for(self, mv: ModelVersion) -> ModelVersion | None:
        """The shadow version of ``mv``'s model when ``mv`` is its default, else None."""
        r = self.routes.get(mv.name)
        if r is None or r.shadow is None:
            return None
        model = self.models.get(mv.name)
        if model is None or model.default != mv.version or model.versions.get(mv.version) is not mv:
            return None
        return model.versions.get(r.shadow)

    def set_traffic(self, name: str, weights: dict[str, float] | None) -> dict[str, Any]:
        """Route requests to ``name`` that name no version by ``weights`` ({version: weight},
        numbers >= 0, not all zero; each version registered (404) and READY (409)). None or
        {}: all to the default. Returns :meth:`traffic`."""
        model = self._model(name)
        checked = check_weights(name, weights)
        for version in checked:
            mv = self._version(model, name, version)
            if not mv.ready:
                raise OspreyError(ErrorKind.CONFLICT, f"Model {name} version {version} is not ready to serve "
                                                      f"({_workers(mv)}); it can take traffic once a worker is READY")
        r = self.routes.get(name) or Routing()
        r.split = Split(checked) if checked else None
        self.routes[name] = r
        self._tidy(name)
        event(log, "traffic_changed", model=name, default=model.default,
              weights=",".join(f"{v}:{w:g}" for v, w in checked.items()) or "default")
        return self.traffic(name)

    def traffic(self, name: str) -> dict[str, Any]:
        """``{"model", "default", "weights", "shares", "shadow", "shadow_results", "previous",
        "stats"}``:
        the weights as set, each version's share of the requests that name no version, the
        shadow version (or None) and its copies' results (agree, disagree, error, dropped),
        the earlier defaults, most recent first, and each version's live counters."""
        model = self._model(name)
        r = self.routes.get(name)
        split = r.split if r is not None else None
        shadow = r.shadow if r is not None else None
        return {"model": name, "default": model.default, "weights": dict(split.weights) if split else {},
                "shares": split.shares() if split else {model.default: 1.0}, "shadow": shadow,
                "shadow_results": dict(model.versions[shadow].shadow_results) if shadow else {},
                "previous": self.default_history(name),
                "stats": {v: mv.stats.as_dict() for v, mv in model.versions.items()}}

    def set_shadow(self, name: str, version: str | None) -> dict[str, Any]:
        """Copy every request the default answers to ``version`` (registered, 404; READY and not
        the default, 409); None stops the copies. Returns :meth:`traffic`."""
        model = self._model(name)
        r = self.routes.get(name) or Routing()
        if version is not None:
            mv = self._version(model, name, version)
            if version == model.default:
                raise OspreyError(ErrorKind.CONFLICT, f"Model {name} version {version} is the default version: "
                                                      "a shadow must be another version")
            if not mv.ready:
                raise OspreyError(ErrorKind.CONFLICT, f"Model {name} version {version} is not ready to serve "
                                                      f"({_workers(mv)}); it can be the shadow once a worker is READY")
            for result in RESULTS:
                mv.shadow_results.setdefault(result, 0)
        old, r.shadow = r.shadow, version
        self.routes[name] = r
        self._tidy(name)
        if old != version:
            event(log, "shadow_changed", model=name, old=old, new=version)
        return self.traffic(name)

    def default_history(self, name: str) -> list[str]:
        """The earlier default versions still registered, most recent first."""
        return self._model(name).previous[::-1]

    def routing_state(self, name: str) -> dict[str, Any]:
        """The model's routing as the replicas share it: ``default``, ``previous`` (oldest
        first), ``weights`` and ``shadow`` (server.shared_routing)."""
        model = self._model(name)
        r = self.routes.get(name)
        return {"default": model.default, "previous": list(model.previous),
                "weights": dict(r.split.weights) if r is not None and r.split is not None else {},
                "shadow": r.shadow if r is not None else None}

    def adopt(self, name: str, state: dict[str, Any]) -> list[str]:
        """Apply routing decided on another replica (:meth:`routing_state`'s shape). Only versions
        registered here and READY take part: a default, weight or shadow naming another version is
        left out for now and named in the returned list (empty: all of ``state`` applied). The
        checks of set_default/set_traffic/set_shadow were made where the change was asked for."""
        model = self._model(name)
        missing: list[str] = []

        def usable(version: str) -> bool:
            mv = model.versions.get(version)
            if mv is None or not mv.ready:
                missing.append(version)
                return False
            return True

        default = state.get("default") or model.default
        if default != model.default and usable(default):
            old, model.default = model.default, default
            event(log, "default_version_changed", model=name, old=old, new=default, source="shared")
        model.previous[:] = [v for v in state.get("previous") or () if v in model.versions
                             and v != model.default][-HISTORY:]
        weights = {v: float(w) for v, w in (state.get("weights") or {}).items() if usable(v)}
        shadow = state.get("shadow")
        if shadow is not None and (shadow == model.default or not usable(shadow)):
            shadow = None
        r = self.routes.get(name) or Routing()
        before = (dict(r.split.weights) if r.split is not None else {}, r.shadow)
        r.split = Split(weights) if any(weights.values()) else None
        if shadow is not None:
            for result in RESULTS:
                model.versions[shadow].shadow_results.setdefault(result, 0)
        r.shadow = shadow
        self.routes[name] = r
        self._tidy(name)
        if before != (dict(r.split.weights) if r.split is not None else {}, r.shadow):
            event(log, "traffic_changed", model=name, default=model.default, source="shared",
                  weights=",".join(f"{v}:{w:g}" for v, w in weights.items()) or "default", shadow=shadow)
        return missing

    def rollbacks(self, name: str) -> int:
        """How many times :meth:`rollback` moved the model's default back since it was registered."""
        return self._model(name).rollbacks

    def rollback(self, name: str) -> str:
        """Make the most recent earlier default the default again and clear the canary weights;
        returns that version. CONFLICT (409) when there is none, or when it is not READY. The
        version rolled back from is not remembered: a second rollback goes one further back."""
        model = self._model(name)
        if not model.previous:
            raise OspreyError(ErrorKind.CONFLICT, f"Model {name} has no earlier default version to roll back to "
                                                  f"(version {model.default} is the only default it has had, or the "
                                                  "earlier ones were unregistered)")
        version = model.previous[-1]
        mv = model.versions[version]  # unregister takes a version out of the history
        if not mv.ready:
            raise OspreyError(ErrorKind.CONFLICT, f"Cannot roll back model {name} to version {version}: it is not "
                                                  f"ready to serve ({_workers(mv)})")
        old = model.default
        model.previous.pop()
        model.default = version
        model.rollbacks += 1
        r = self.routes.get(name)
        if r is not None:
            r.split = None
            if r.shadow == version:
                r.shadow = None
            self._tidy(name)
        event(log, "default_version_rolled_back", model=name, old=old, new=version)
        self._changed()
        return version

    async def unregister(self, name: str, version: str | None = None, *, force: bool = False) -> ModelVersion:
        mv = self.get(name, version)
        model = self.models[name]
        if mv.version == model.default and len(model.versions) > 1 and not force:
            raise OspreyError(ErrorKind.FORBIDDEN, f"Cannot remove default version for model {name}")
        del model.versions[mv.version]
        if self.shared is not None and mv.workflow is None:
            self.shared.unregistered(name, mv.version)
        if not model.versions:
            del self.models[name]
            self.routes.pop(name, None)
        else:
            if model.default == mv.version:
                model.default = max(model.versions, key=_version_key)
            model.previous[:] = [v for v in model.previous if v != mv.version and v != model.default]
            r = self.routes.get(name)
            if r is not None:
                r.forget(mv.version)
                if r.shadow == model.default:
                    r.shadow = None
                self._tidy(name)
        # new requests are 404 from here on; what was queued or running is answered first
        running = mv.batcher.in_flight  # running batches end and are answered even after their instance stops
        mv.draining = True  # an instance being restarted (a crash) still comes back to answer the queue
        try:
            answered, left = await self._finish_queued(mv)
        finally:
            mv.draining = False
        answered += running
        mv.batcher.fail_all(OspreyError(ErrorKind.UNAVAILABLE, f"Model {name} version {mv.version} was unregistered "
                                                               "before this request could run (unregister_timeout "
                                                               f"{self.settings.unregister_timeout:g} s)"))
        stopped = list(mv.instances)
        self._stop(mv)
        event(log, "model_unregistered", model=name, version=mv.version, drained=answered, failed=left)
        self._release_heap_after(stopped, mv)
        self._changed(mv)
        return mv

    async def _finish_queued(self, mv: ModelVersion) -> tuple[int, int]:
        """Wait until the requests queued for ``mv`` now are answered by its instances, at
        most unregister_timeout; return how many were answered and how many are left."""
        futures = [r.future for r in mv.batcher.queue if r.future is not None and not r.future.done()]
        if not futures or (mv.batcher.instances <= 0 and mv.batcher.restarting <= 0):
            return 0, len(futures)
        timeout = self.settings.unregister_timeout
        await asyncio.wait(futures, timeout=timeout if timeout > 0 else None)
        left = sum(not f.done() for f in futures)
        return len(futures) - left, left

    def _release_heap_after(self, instances: list, mv: ModelVersion | None = None) -> None:
        """Once the threads of removed instances have ended (their last batch run, their
        models dropped), give what they left in reference cycles back: one full collection.
        Requests close together share one collection. ``mv``: an unregistered version, whose
        references are cut then, so nothing (metrics, batcher, frozen heap) keeps it."""
        self._retired_threads.extend(instances)
        if mv is not None:
            self._retired_versions.append(mv)
        if self._release_task is None or self._release_task.done():
            self._release_task = self.loop.create_task(self._release_heap())
            self._tasks.add(self._release_task)
            self._release_task.add_done_callback(self._tasks.discard)

    async def _release_heap(self) -> None:
        # removals made while this runs are taken by its next round (no second task starts)
        while self._retired_threads or self._retired_versions:
            deadline = time.monotonic() + RELEASE_WAIT_S
            while time.monotonic() < deadline and not all(i.ended for i in self._retired_threads):
                await asyncio.sleep(RELEASE_POLL_S)  # a thread ends after its last batch; never block the loop
            names = self._release_round()  # its frame, and what it held, is gone before the collection
            heap.release()
            await self.loop.run_in_executor(None, heap.trim)  # what was freed goes back to the system
            for name, version in names:
                event(log, "model_released", model=name, version=version)

    def _release_round(self) -> list[tuple[str, str]]:
        """Cut the references to what was removed (instances whose threads ended, unregistered
        versions); return the versions' (name, version)."""
        ended = [i for i in self._retired_threads if i.ended]  # one still running keeps its model until it ends
        self._retired_threads.clear()
        versions, self._retired_versions = self._retired_versions, []
        for inst in ended:
            inst.release()
        for mv in versions:
            if self._on_release is not None:
                try:
                    self._on_release(mv)
                except Exception:
                    log.exception("model %s version %s: release observer failed", mv.name, mv.version)
            mv.batcher.release()
            mv.instances.clear()
        return [(mv.name, mv.version) for mv in versions]

    def _stop(self, mv: ModelVersion) -> None:
        for inst in mv.instances:
            inst.stop()
        mv.instances.clear()
        mv.archive.cleanup()

    def idle(self) -> bool:
        """No request is queued or running on any model version."""
        return all(not mv.batcher.pending and not mv.batcher.in_flight for mv in self.all_versions())

    async def close(self) -> None:
        for mv in self.all_versions():
            mv.batcher.fail_all(OspreyError(ErrorKind.UNAVAILABLE, "Server is shutting down"))
            self._stop(mv)
        self.models.clear()
        self.extractions.release()
