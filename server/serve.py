"""Process wiring: build the object graph, run every listener on one event loop, stop cleanly.

REST listeners are uvicorn servers (httptools + uvloop) sharing the loop with the gRPC
servers; SIGTERM/SIGINT stop accepting, fail what is still queued with 503 and exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import uvicorn

from monitoring.metrics import CONTENT_TYPE, ServingMetrics, connection_metrics

from server.core import cpus, heap
from monitoring.access_log import AccessLog
from monitoring.build import open_monitor
from monitoring.metrics_log import MetricsLog
from monitoring.ts_metrics_config import load_metrics_config
from server.frontends.supervisor import FrontEnds, reuseport_listeners
from server.log_files import LogFiles
from server.protocols.auth import Keys
from server.core.dataplane import DataPlane
from server.core.errors import ErrorKind, OspreyError
from server.core.events import event
from server.core.registry import Registry
from server.instances import forget_model_folder, instance_factory, return_device_memory
from server.protocols.rest.http_protocol import (begin_drain, connection_limit, drain_pass, http_protocol,
                                                 raise_open_files_limit)
from server.protocols.rest.asgi import Request, Response, Router
from server.protocols.rest.chunked import ChunkedAnswer
from server.protocols.rest.inference import add_inference_routes
from server.protocols.rest.management import add_management_routes
from server.protocols.rest.monitoring import add_monitoring_routes
from server.protocols.rest.openapi import Doc, add_api_description
from server.protocols.rest.retraining import add_retraining_routes
from server.protocols.rest.triggers import add_trigger_routes
from server.retraining.metrics import JobMetrics
from server.retraining.queue import job_queue
from server.retraining.triggers import Cooldown, LatencyWatch, Triggers
from server.protocols.rest.v2 import add_v2_routes
from server.protocols.stall import set_held
from server.protocols.rest.workflows import add_workflow_inference_routes, add_workflow_management_routes
from server.workflows.manager import Workflows
from server.settings import Settings, parse_address
from server.instances.runner import DECODE_INPUT_ENV
from server.model_overrides import archive_identity, overrides_for, parse_models, register_kwargs
from server.snapshots import Snapshot, SnapshotWriter, restore_models, snapshot_dir
from server.state import job_url, resolve_state_dir
from server.tls import Tls, TlsError, is_https

__all__ = ["Server", "run", "parse_model_specs", "StartupError"]

log = logging.getLogger("osprey.serve")

# module -> the distribution that installs it, for the message when gRPC cannot start
_PIP_NAMES = {"grpc": "grpcio", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
              "google": "protobuf", "google.protobuf": "protobuf", "google.rpc": "googleapis-common-protos"}


SETTLE_TIMEOUT_S = 300.0  # most time a starting replica waits for the shared routing's versions to load


class StartupError(Exception):
    """The server cannot start as configured (the message says why and what to do)."""


def _grpc_starter():
    """``start_grpc``, or a StartupError naming the missing module and how to install it."""
    try:
        from server.protocols.grpc.server import start_grpc
    except ImportError as exc:
        missing = exc.name or str(exc)
        top = missing.split(".")[0]
        dist = _PIP_NAMES.get(missing) or _PIP_NAMES.get(".".join(missing.split(".")[:2])) or _PIP_NAMES.get(top)
        how = f"install it with `pip install {dist}`" if dist else "reinstall Osprey (`pip install osprey`)"
        raise StartupError(f"gRPC is enabled but module {missing!r} cannot be imported ({exc}); {how}, "
                           "or start without gRPC (--no-grpc, enable_grpc=false)") from None
    return start_grpc
# During a drain, an idle kept-alive connection is closed once this long has passed since it was
# last used (a request received or an answer sent), not at once: a client that has just had an
# answer may already be sending its next request, which is then served with Connection: close
# instead of meeting a closed connection. Connections idle longer close as soon as the drain starts.
DRAIN_LINGER_S = 1.0


def parse_model_specs(specs: Iterable[str], model_store: str) -> list[tuple[str | None, str]]:
    """``NAME=FILE``, ``FILE`` or ``all`` -> [(name or None, url)]."""
    out: list[tuple[str | None, str]] = []
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            if item.lower() == "all":  # TorchServe: ALL, all, any case
                store = Path(model_store)
                for p in sorted(store.iterdir()) if store.is_dir() else ():
                    if p.name.endswith((".mar", ".tar.gz", ".tgz")) or (p / "MAR-INF").is_dir():
                        out.append((None, p.name))
                continue
            name, sep, url = item.partition("=")
            out.append((name, url) if sep else (None, item))
    return out


class Server:
    """Everything one Osprey process runs."""

    def __init__(self, settings: Settings, config_properties: dict[str, str] | None = None):
        """``config_properties``: the configuration as given (config file keys, command-line
        settings), which config snapshots record (server.snapshots)."""
        settings = resolve_state_dir(settings)  # <model_store>/.osprey, or <workdir>/.osprey on a read-only store
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        # TorchServe's log files (access, model, server; metrics in metrics_mode=log), or None
        self.log_files = LogFiles.from_settings(settings)
        metrics_log = MetricsLog(socket.gethostname(), self.log_files.write_now) \
            if self.log_files is not None and settings.metrics_mode == "log" else None
        auto = settings.model_metrics_auto_detect.lower()
        self.metrics = ServingMetrics(buckets=settings.metric_buckets, objectives=settings.latency_objectives,
                                      ts_config=load_metrics_config(settings.metrics_config) if settings.metrics_config
                                      else None, metrics_log=metrics_log,
                                      system_metrics=not settings.disable_system_metrics,
                                      auto_detect=None if not auto else auto == "true")
        # drift, feedback and live quality: instances hand it one Observation per sampled batch
        self.monitor = open_monitor(settings, self._monitored) if settings.monitoring else None
        observe = self.monitor.observe if self.monitor is not None else None
        self.registry = Registry(settings, self.loop, instance_factory(settings, self.metrics.handler_metric,
                                                                       observe=observe,
                                                                       monitor_link=getattr(self.monitor, "link", None)),
                                 on_batch=self.metrics.observe_batch if settings.request_metrics else None,
                                 on_release=self._released)
        self.metrics.watch(self.registry)
        # TorchServe's config snapshots: written from the startup snapshot on (see _main)
        self.snapshots = SnapshotWriter(snapshot_dir(settings), config_properties or {}, self.registry) \
            if settings.config_snapshots else None
        if self.snapshots is not None:
            self.registry.on_change = self.snapshots.changed
        self.access_log = AccessLog.from_settings(settings, self.loop)
        observers = [self.metrics.observe] if settings.request_metrics else []
        if self.access_log is not None:
            observers.append(self.access_log)
        if self.monitor is not None:
            # a label right after its answer waits for its observation; a model with retraining
            # has the answered request's inputs held for its label (one observer for both)
            observers.append(self.monitor.answered)
        self.dataplane = DataPlane(self.registry, observers,
                                   [self.metrics.refused] if settings.request_metrics else [], monitor=self.monitor,
                                   max_response_size=settings.max_response_size)
        # not ready until _main has loaded the startup models and applied the shared routing: the
        # listeners open in start(), before that, and a load balancer's readiness check arriving
        # then must not find a server with no models "ready" (it would send requests that 404)
        self.dataplane.started = False
        self.keys = Keys.from_settings(settings)  # supplied keys are shared through Redis with redis_url
        self._key_watch: asyncio.Task | None = None
        self.inference_app = Router(max_body=settings.max_request_size, auth_status=settings.token_auth_status)
        ChunkedAnswer.stall_s = float(settings.stream_stall_timeout)
        set_held(settings.max_response_size)  # what may wait for one streaming client (server.protocols.stall)
        add_inference_routes(self.inference_app, self.dataplane)
        add_v2_routes(self.inference_app, self.dataplane, model_store=settings.model_store,
                      enable_model_api=settings.enable_model_api, envelope=settings.service_envelope)
        # feedback labels and monitoring status (DataPlane.feedback / .monitoring; the monitor itself is
        # DataPlane.monitor, None while monitoring is off)
        add_monitoring_routes(self.inference_app, self.dataplane)
        self.management_app = Router(max_body=settings.max_request_size, auth_status=settings.token_auth_status)
        self.management_app.ignore_trailing_slash = True  # DELETE /models/m/ unregisters m, as in TorchServe
        add_management_routes(self.management_app, self.registry, enable_model_api=settings.enable_model_api,
                              rotate_key=self.keys.rotate_shared if self.keys else None,
                              custom_metadata=self.dataplane.describe_handle)
        # TorchServe's workflows: a .war's nodes run as models of the registry, its DAG over the data plane
        self.workflows = Workflows(self.registry, self.dataplane, settings.workflow_store or settings.model_store)
        add_workflow_management_routes(self.management_app, self.workflows)
        add_workflow_inference_routes(self.inference_app, self.workflows)
        # retraining: the job queue (Redis with redis_url, else child processes of this server),
        # the triggers that fill it, and the management routes for both
        self.jobs = job_queue(settings, Path(settings.model_store))
        # with redis_url, the replicas share each model's routing (default, canary, shadow, versions)
        self.shared = None
        if settings.redis_url:  # imported only then: redis-py takes ~0.3 s of a start to import
            from server.shared_routing import SharedRouting

            self.shared = SharedRouting(self.registry, settings.redis_url, settings.routing_sync_interval)
        self.registry.shared = self.shared
        self.triggers = Triggers(self.registry, self.monitor, self.jobs, Cooldown(self._redis_client()),
                                 params=self._job_params(), latency_breached=LatencyWatch(self.metrics.over_objective)
                                 if settings.request_metrics else None)
        self.job_metrics = JobMetrics(self.jobs)
        self.triggers.on_poll = self.job_metrics.refresh
        add_retraining_routes(self.management_app, self.jobs)
        add_trigger_routes(self.management_app, self.triggers)
        self.metrics_app = Router(max_body=1024)
        if settings.cors_allowed_origin:  # TorchServe's: on every port
            cors = (tuple(o.strip() for o in settings.cors_allowed_origin.split(",") if o.strip()),
                    settings.cors_allowed_methods.strip(), settings.cors_allowed_headers.strip())
            for app in (self.inference_app, self.management_app, self.metrics_app):
                app.cors = cors
        self.metrics_app.add("GET", "/metrics", self._metrics, doc=Doc(
            "Prometheus metrics (text exposition format)",
            responses={200: ("The metrics", {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}})},
            tags=("Metrics",)))
        # OPTIONS / and GET /api-description on each port: its OpenAPI description, generated from
        # the routes above (added last: it describes what is registered)
        add_api_description(self.inference_app, "Osprey inference API", "TorchServe's inference API, KServe v1, "
                            "the Open Inference Protocol (v2), feedback and monitoring")
        add_api_description(self.management_app, "Osprey management API", "TorchServe's management API, traffic, "
                            "token rotation and retraining")
        add_api_description(self.metrics_app, "Osprey metrics API", "Prometheus metrics")
        for app in (self.inference_app, self.management_app, self.metrics_app):
            app.on_response = self._answered
        if self.keys is not None:
            self.keys.attach("inference", self.inference_app)
            self.keys.attach("management", self.management_app)
        self._servers: list[uvicorn.Server] = []
        self.frontends: FrontEnds | None = None  # with frontends > 1: the other processes on the inference port
        self._grpc: list = []
        self.tls: Tls | None = None  # set by start(): the key and certificate of https and gRPC over TLS
        self.stopping = asyncio.Event()

    def reload_tls(self) -> None:
        """SIGHUP: this process and every front end read the key and certificate again."""
        self.tls.reload()
        if self.frontends is not None:
            self.frontends.signal(signal.SIGHUP)

    def _answered(self, scope: dict, status: int, started: float) -> None:
        """Router hook: every HTTP answer on every port (TorchServe's Requests2XX/4XX/5XX and access log)."""
        self.metrics.http_response(status)
        if self.log_files is not None:
            self.log_files.access(scope, status, started)

    def _redis_client(self):
        if not self.settings.redis_url:
            return None
        import redis as redis_lib

        return redis_lib.Redis.from_url(self.settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def _job_params(self) -> dict:
        """What every retraining job needs to reach this server and its data (see pipeline.run)."""
        s = self.settings
        params = {"model_store": str(Path(s.model_store).resolve()), "redis_url": s.redis_url, "state_dir": s.state_dir,
                  "management_url": job_url(s.management_address, s.advertised_host),
                  "inference_url": job_url(s.inference_address, s.advertised_host)}
        if self.keys is not None:
            params["key_file"] = str((Path(s.workdir) / s.key_file).resolve())
        return params

    def _monitored(self, model: str, version: str):
        """The monitor's view of the registry (its background thread asks): the version, or None."""
        try:
            return self.registry.get(model, version)
        except OspreyError:
            return None

    def _released(self, mv) -> None:
        """An unregistered version's workers have ended: forget its metrics, monitoring and modules."""
        self.metrics.forget(mv)
        if self.monitor is not None:
            self.monitor.forget(mv.name, mv.version)
        forget_model_folder(str(mv.archive.model_dir))
        if mv.archive.deps_dir is not None:  # thread instances put its packages on this process's path
            forget_model_folder(str(mv.archive.deps_dir))
        # next loop turn: after the registry's collection, which follows in the same step
        self.loop.call_soon(return_device_memory)

    def _connection_metrics(self) -> str:
        """osprey_connections_open / _refused_total per HTTP port, and the front ends' metrics."""
        fronts = self.frontends.stats() if self.frontends is not None else None
        ports = {}
        for name, server in zip(("inference", "management", "metrics"), self._servers):
            listener = server.config.http_protocol_class
            limited = getattr(listener, "max_connections", 0)
            open_ = len(server.server_state.connections)
            refused = getattr(listener, "refused_connections", 0) if limited else None
            if name == "inference" and fronts is not None:
                open_ += fronts["open"]
                if refused is not None:
                    refused += fronts["refused"]
            ports[name] = (open_, refused)
        return connection_metrics(ports, fronts)

    async def _metrics(self, req: Request) -> Response:
        body = self.metrics.render() + self._connection_metrics().encode()
        if self.monitor is not None:
            body += (await self.monitor.exposition()).encode()
        body += self.job_metrics.render().encode()
        return Response(body, 200, CONTENT_TYPE)

    async def start(self) -> None:
        s = self.settings
        try:  # before anything listens: a missing or broken key refuses the start, naming the setting
            self.tls = Tls.from_settings(s)
        except TlsError as exc:
            raise StartupError(str(exc)) from None
        start_grpc = _grpc_starter() if s.enable_grpc else None  # before anything listens
        for address, app in ((s.inference_address, self.inference_app),
                             (s.management_address, self.management_app),
                             (s.metrics_address, self.metrics_app)):
            host, port = parse_address(address)
            limit = connection_limit(s.max_connections) if app is self.inference_app else 0
            config = uvicorn.Config(app, host=host, port=port, lifespan="off",
                                    http=http_protocol(s.request_read_timeout, s.max_header_size, limit),
                                    loop="none", log_level="warning", access_log=False,
                                    server_header=False, date_header=False, timeout_keep_alive=s.keep_alive_timeout,
                                    backlog=2048, proxy_headers=False)
            config.load()
            if is_https(address):  # plain http listeners are untouched (config.ssl stays None)
                config.ssl = self.tls.context()
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)
            sockets = None
            if app is self.inference_app and s.frontends > 1:  # shared with the front ends (SO_REUSEPORT)
                try:
                    sockets = reuseport_listeners(host, port, exclusive=True)
                except OSError as exc:
                    raise OSError(f"could not listen on {address}: {exc.strerror or exc}") from None
            try:
                await server.startup(sockets=sockets)
            except SystemExit:
                raise OSError(f"could not listen on {address}") from None
            if server.should_exit:
                raise OSError(f"could not listen on {address}")
            self._servers.append(server)
        if s.frontends > 1:  # the inference port's connections, in processes of their own
            n_cpus = len(cpus.allowed_cpus()) or os.cpu_count() or 1
            if s.frontends >= n_cpus:
                log.warning("frontends=%d on %d CPUs: the front ends, this process and its models compete for "
                            "the same cores; on 2 cores 2-3 front ends answered 10-30%% fewer requests than one "
                            "process (benchmarks/CHANGES.md, session 19)", s.frontends, n_cpus)
            host, _ = parse_address(s.inference_address)
            port = self._servers[0].servers[0].sockets[0].getsockname()[1]
            self.frontends = FrontEnds(s, self.inference_app, host, port, s.frontends - 1, DRAIN_LINGER_S)
            await self.frontends.start()
        if start_grpc is not None:
            self._grpc = await start_grpc(self)
        await self.jobs.start()
        self.triggers.start()
        if self.log_files is not None:
            self.log_files.start(self.loop)
            if self.metrics.log is not None:
                self.metrics.log.start(self.loop)
            self.metrics.ts.start(self.loop, s.metric_time_interval, self.registry.all_versions)
        if self.shared is not None:
            await self.shared.start()
        if self.keys is not None and self.keys.store is not None:
            self._key_watch = self.loop.create_task(self.keys.watch())  # keys rotated through other replicas
        log.info("listening: inference %s, management %s, metrics %s", s.inference_address,
                 s.management_address, s.metrics_address)

    async def load_models(self, specs: list[tuple[str | None, str]]) -> int:
        """Register startup models concurrently; a model that fails is logged and skipped."""
        table = parse_models(self.settings.models) if self.settings.models else {}

        async def one(name, url):
            try:
                entry = None
                if table:  # TorchServe's models property: this version's settings, over model-config.yaml
                    listed, version = archive_identity(self.registry.resolve_url(url))
                    entry = overrides_for(table, name or listed, version)
                mv = await self.registry.register(url, model_name=name, loaded_at_startup=True,
                                                  **register_kwargs(entry or {}))
                if entry and "maxWorkers" in entry:
                    low = entry.get("minWorkers", mv.config.min_workers)
                    try:
                        await self.registry.scale(mv.name, mv.version, low, max(entry["maxWorkers"], low))
                    except OspreyError as exc:  # registered and serving: only the maximum is not as asked
                        log.warning("model %s version %s: maxWorkers from the models setting not applied: %s",
                                    mv.name, mv.version, exc.message)
                return True
            except OspreyError as exc:
                log.error("model %s (%s) not loaded: %s", name or url, url, exc.message)
            except Exception:
                log.exception("model %s (%s) not loaded", name or url, url)
            return False

        results = await asyncio.gather(*(one(n, u) for n, u in specs))
        return sum(results)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting at once, answer everything accepted, then stop the models.

        The REST listeners close first and the server reports itself not ready. Every open REST
        connection is told to drain: each answer from now on carries ``Connection: close`` and
        its connection closes after it, and a request still arriving on a kept-alive connection
        is served the same way. gRPC calls already running finish; new ones are answered
        UNAVAILABLE at once, and the gRPC servers stop only once the drain is over (stopping
        them first cancelled calls gRPC had received but not yet started). Queued and running
        requests are answered by the models as usual. When nothing is left in progress, or after
        ``drain_timeout`` seconds (the setting by default), the remaining connections close and
        whatever is still queued is answered 503. Idle connections close once unused for
        ``DRAIN_LINGER_S``.
        """
        timeout = self.settings.drain_timeout if drain_timeout is None else max(0.0, drain_timeout)
        deadline = time.monotonic() + timeout
        for server in self._servers:
            server.should_exit = True
            for listener in getattr(server, "servers", []):
                listener.close()
        self.dataplane.started = False  # not ready (health checks) from now on: send no more traffic here
        if self.frontends is not None:  # they stop accepting and drain their connections too
            self.frontends.begin_drain()
        for g in self._grpc:  # new gRPC calls: UNAVAILABLE at once; calls already running go on
            g.osprey_draining.begin()
        t0 = time.monotonic()
        if timeout > 0:  # not when a start that failed is undone
            queued, running = self._outstanding()
            event(log, "drain_started", queued=queued, running=running, timeout_s=timeout)
        begin_drain(self._connections())
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            busy = drain_pass(self._connections(), now, DRAIN_LINGER_S)
            # a gRPC client that was refused just now may send again: refuse that too rather
            # than stop under it (a call arriving as the server stops ends CANCELLED)
            if any(now - g.osprey_draining.last_call < DRAIN_LINGER_S for g in self._grpc):
                busy = True
            if self.frontends is not None and self.frontends.busy():
                busy = True  # a relayed request is unanswered, or a front end still drains its connections
            if not busy and self.registry.idle():
                break
            await asyncio.sleep(0.005)
        if timeout > 0:
            queued, running = self._outstanding()
            event(log, "drain_finished", seconds=round(time.monotonic() - t0, 3),
                  unanswered=queued + running, timed_out=bool(queued or running))
        if not self.registry.idle():  # the timeout cut the drain short: what is still queued gets 503 now
            for mv in self.registry.all_versions():
                mv.batcher.fail_all(OspreyError(ErrorKind.UNAVAILABLE, "Server is shutting down", retry_after=1))
        for conn in self._connections():
            conn.shutdown()
        left = max(0.0, deadline - time.monotonic())
        if self.frontends is not None:  # their answers are written; then they exit (or are killed)
            await self.frontends.close(grace=max(left, 0.5 if timeout > 0 else 0.05))
        if self._grpc:  # what the data plane ran is answered; management calls get what time is left
            await asyncio.gather(*(g.stop(grace=max(left, 0.05)) for g in self._grpc), return_exceptions=True)
        for server in self._servers:
            # a moment for those 503s to be written; requests still running in a model are cut
            server.config.timeout_graceful_shutdown = max(left, 0.5 if timeout > 0 else 0.05)
            await server.shutdown()
        if self.shared is not None:  # before the registry closes: a stopping replica unpublishes nothing
            await self.shared.close()
        await self.triggers.close()
        if self._key_watch is not None:
            self._key_watch.cancel()
            await asyncio.gather(self._key_watch, return_exceptions=True)
        if self.keys is not None:
            self.keys.close()
        await self.jobs.close()  # embedded: running jobs stop and are queued again for the next start
        if self.snapshots is not None:  # the models as they are now, before they are unloaded (TorchServe's order)
            self.snapshots.stop()
        await self.registry.close()
        await self.workflows.close()
        if self.monitor is not None:
            await asyncio.to_thread(self.monitor.close)
        if self.access_log is not None:
            self.access_log.close()
        self.metrics.ts.close()
        if self.metrics.log is not None:
            self.metrics.log.close()
        if self.log_files is not None:
            self.log_files.close()

    def _outstanding(self) -> tuple[int, int]:
        """(requests queued, requests running) over every model."""
        versions = self.registry.all_versions()
        return sum(mv.batcher.pending for mv in versions), sum(mv.batcher.in_flight for mv in versions)
    def _connections(self) -> list:
        return [c for server in self._servers for c in list(server.server_state.connections)]


def _write_pid(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(str(os.getpid()))


async def _main(settings: Settings, models: list[tuple[str | None, str]], ready_line: str | None = None,
                restore: Snapshot | None = None, config_properties: dict[str, str] | None = None) -> int:
    t0 = time.monotonic()
    server = Server(settings, config_properties)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopping.set)
    try:
        await server.start()
    except (OSError, StartupError) as exc:
        log.error("%s", exc)
        print(f"osprey: {exc}", file=sys.stderr, flush=True)
        await server.stop(drain_timeout=0)
        return 1
    if server.tls is not None:  # SIGHUP: read the key and certificate again, for new connections
        loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    if settings.pid_file:
        _write_pid(settings.pid_file)
    server.registry.extractions.clean_stale()  # folders of servers here that crashed or were killed
    loaded, wanted = await server.load_models(models), len(models)
    if restore is not None:  # a start that took the last config snapshot as its configuration
        restored, listed = await restore_models(server.registry, restore)
        loaded, wanted = loaded + restored, wanted + listed
    if server.shared is not None:  # ready only once the replicas' shared routing is applied here
        await server.shared.settle(SETTLE_TIMEOUT_S)
    heap.freeze()
    server.registry.heap_settled = True
    if server.snapshots is not None:
        server.snapshots.start()  # <time>-startup.cfg, with the models loaded
    server.dataplane.started = True
    try:  # last: every startup thread and child process has started on every CPU
        # the loop's executor threads (archive extraction, heap trims, gzip bodies, feedback),
        # started by the loop's thread whenever needed, run on every CPU, not on the loop's
        if cpus.parse_setting(str(settings.interpreter_cpu)) != "off":
            workers = min(32, (len(cpus.allowed_cpus()) or 1) + 4)
            loop.set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="osprey-executor",
                                                         initializer=cpus.leave))
        cpu = cpus.pin_interpreter(settings.interpreter_cpu)
    except ValueError as exc:
        log.error("%s: no thread is pinned", exc)
        cpu = None
    if cpu is not None:
        log.info("event loop pinned to CPU %d (setting interpreter_cpu %s)", cpu, settings.interpreter_cpu)
    log.info("ready: %d of %d models loaded in %.2f s", loaded, wanted, time.monotonic() - t0)
    print(f"Osprey ready: {loaded}/{wanted} models, inference at {settings.inference_address}", flush=True)
    if ready_line:  # `osprey torchserve`: the line TorchServe prints when ready, which its scripts wait for
        print(ready_line, flush=True)
    await server.stopping.wait()
    log.info("stopping")
    await server.stop()
    if settings.pid_file:
        try:
            Path(settings.pid_file).unlink()
        except FileNotFoundError:
            pass
    return 0


def apply_omp_wait_policy(policy: str, environ=os.environ, modules=sys.modules, spin_count: int = 0) -> bool:
    """Set OMP_WAIT_POLICY for torch's OpenMP runtime (and the process instances, which inherit
    the environment) unless the environment already has one; True when set. With ``passive``,
    ``spin_count`` (> 0) becomes GOMP_SPINCOUNT, the short spin before a thread sleeps, unless
    the environment has one. libgomp reads both once, when torch is first imported: a process
    that already imported torch keeps its own.

    A short spin is exported as OMP_WAIT_POLICY=ACTIVE with that GOMP_SPINCOUNT, not PASSIVE:
    libgomp spins its *throttled* count instead whenever it runs more threads than CPUs (two
    instance threads that each ran a parallel torch operation are four threads on two CPUs), and
    that count is 0 under PASSIVE but min(1,000, GOMP_SPINCOUNT) under ACTIVE. Under PASSIVE a
    second model's threads made the CNN's forward sleep between its regions again (+30-60%).
    An explicit GOMP_SPINCOUNT bounds ACTIVE's spin as it does PASSIVE's (then the thread
    sleeps). KMP_BLOCKTIME=0 keeps an LLVM OpenMP runtime, should one load, passive."""
    if not policy or "OMP_WAIT_POLICY" in environ:
        return False
    if "torch" in modules:
        log.info("omp_wait_policy=%s not applied: torch was imported before the server started", policy)
        return False
    if policy.lower() == "passive" and spin_count > 0 and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"] = "ACTIVE"
        environ["GOMP_SPINCOUNT"] = str(spin_count)
        environ.setdefault("KMP_BLOCKTIME", "0")
        return True
    environ["OMP_WAIT_POLICY"] = policy.upper()
    return True


BLAS_THREADS_ENV = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def apply_numpy_blas_threads(threads: int, environ=os.environ) -> int:
    """Limit the BLAS library bundled with numpy (OpenBLAS in numpy's wheels) to ``threads`` in
    this process, unless the environment sets a BLAS thread count of its own; how many libraries
    it limited. Its worker threads busy-wait after each threaded product: the monitor's
    projection of 4,096-row observations kept one spinning at 18 us of CPU per request of the
    tiny MLP on 2 cores. Only numpy's own copy (its wheel's ``numpy.libs``): torch's BLAS and
    OpenMP threads are torch_threads'."""
    if threads <= 0 or any(k in environ for k in BLAS_THREADS_ENV):
        return 0
    try:
        import numpy  # noqa: F401 (loads the library to limit)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # threadpoolctl comes with scikit-learn; without it numpy keeps its threads
        return 0
    numpy_own = [lib for lib in ThreadpoolController().lib_controllers
                 if lib.user_api == "blas" and f"{os.sep}numpy" in (lib.filepath or "")]
    for lib in numpy_own:
        lib.set_num_threads(threads)
    return len(numpy_own)


def run(settings: Settings, models: list[tuple[str | None, str]], ready_line: str | None = None,
        restore: Snapshot | None = None, config_properties: dict[str, str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. ``restore``: a config snapshot whose models are registered at
    start (server.snapshots); ``config_properties``: the configuration the snapshots record."""
    heap.hold()  # until the startup models are loaded (_main's heap.freeze)
    raised = raise_open_files_limit()  # as the JVM does for TorchServe: connections take file descriptors
    if raised:
        log.info("open files limit raised from %d to %d (the hard limit)", *raised)
    if settings.switch_interval > 0:
        sys.setswitchinterval(settings.switch_interval)
    apply_omp_wait_policy(settings.omp_wait_policy, spin_count=settings.omp_spin_count)
    apply_numpy_blas_threads(settings.numpy_blas_threads)
    cpus.export_process_cpus(settings.interpreter_cpu)  # before any thread runs: children of a pinned thread restore them
    # TorchServe's frontend tells its workers so; instances (and process instances' children,
    # which inherit the environment) read it when they load (server/instances/runner.py)
    os.environ[DECODE_INPUT_ENV] = "true" if settings.decode_input_request else "false"
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        import uvloop

        return uvloop.run(_main(settings, models, ready_line, restore, config_properties))
    except ImportError:
        return asyncio.run(_main(settings, models, ready_line, restore, config_properties))
