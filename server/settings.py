"""One typed settings object.

Precedence: TorchServe's ``TS_<KEY>`` environment variables when config.properties says
``enable_envvars_config=true`` > command line > ``OSPREY_<FIELD>`` environment variables >
TorchServe ``config.properties`` > defaults. TorchServe applies its ``TS_`` variables after its
command-line flags, so there they win over the flags too (``TS_DISABLE_TOKEN_AUTHORIZATION=false``
turns token authorization on even with ``--disable-token-auth``); Osprey does the same.
Pure data: reading settings has no side effects.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

__all__ = ["Settings", "parse_properties", "parse_address", "load_settings"]


@dataclass(frozen=True)
class Settings:
    inference_address: str = "http://127.0.0.1:8080"
    management_address: str = "http://127.0.0.1:8081"
    metrics_address: str = "http://127.0.0.1:8082"
    grpc_inference_address: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    enable_grpc: bool = True
    model_store: str = "model_store"
    # where POST /workflows finds .war files (TorchServe's workflow_store); empty: the model store
    workflow_store: str = ""
    load_models: tuple[str, ...] = ()
    # TorchServe's ``models``: JSON settings per model version for the models loaded at start
    # (server/model_overrides.py)
    models: str = ""
    # TorchServe's decode_input_request: false hands handlers every field as the bytes that came
    decode_input_request: bool = True
    # TorchServe's CORS keys: an Origin ("*" for any, or a comma-separated list) and what a
    # preflight may use (server/protocols/rest/asgi.py Router.cors); empty: no CORS headers
    cors_allowed_origin: str = ""
    cors_allowed_methods: str = ""
    cors_allowed_headers: str = ""
    job_queue_size: int = 100
    # workers a model gets when neither its model-config.yaml (minWorkers) nor the call names a
    # number. 0 is TorchServe's "not configured": the register API then starts no workers
    # ("registered with 0 initial workers"), as TorchServe does, and startup loads start 1.
    default_workers_per_model: int = 1
    max_workers_per_model: int = 64  # most instances (threads) one model version may run
    default_response_timeout: float = 120.0  # seconds
    # seconds an unregister (or a scale to 0 workers) waits for the requests queued for the
    # version to be answered before failing the rest with 503; 0 waits without a limit
    unregister_timeout: float = 30.0
    max_request_size: int = 6553500
    # seconds a request's head may take to arrive, and its body may stall between reads (408 then)
    request_read_timeout: float = 60.0
    # bytes a request's line and headers may take together (431, or 414 for the line alone)
    max_header_size: int = 65536
    # seconds a shutdown (SIGTERM) may take to answer what was accepted: listeners close at once,
    # queued and running requests finish, kept-alive connections close after their next answer
    drain_timeout: float = 30.0
    # open connections on the inference port (per process, front ends included) before new ones
    # are answered 503 and closed at once; 0: the open-files limit less 256 kept for the server's
    # own files (the server raises its soft limit to the hard one at start, as the JVM does)
    max_connections: int = 0
    # processes serving the inference port's connections (server/frontends): 1 is this process
    # alone; N > 1 adds N - 1 front-end processes sharing the port (SO_REUSEPORT) that relay
    # every request to this one, so batching, metrics and state stay in one place
    frontends: int = 1
    # seconds a front-end process may stay silent (it answers a heartbeat every second) before it
    # is taken for hung, killed and started again
    frontend_timeout: float = 10.0
    keep_alive_timeout: float = 120.0  # seconds an idle connection (also a new one that sends nothing) stays open
    # seconds a client may take nothing of a streamed answer (a handler's intermediate responses
    # on REST, a streaming gRPC call's messages) while more than 64 MiB of it wait on the server,
    # before its connection is reset (REST) or its call ended (gRPC) and what waited dropped
    # (server/protocols/rest/chunked.py, server/protocols/grpc/streams.py); 0: never. Whatever
    # this is, a client is cut once 256 MiB (or twice max_response_size) wait for it
    # (server/protocols/stall.py)
    stream_stall_timeout: float = 10.0
    # bytes an answer may hold: a larger one is answered 500 naming its size (TorchServe's frontend
    # answers 500 "Worker died."), on every protocol, a streamed part too (server/core/answer_size.py);
    # gRPC's transport sends messages up to twice that (protobuf's framing, a streamed part) and 64 KiB
    max_response_size: int = 6553500
    max_archive_size: int = 4 * 1024**3  # bytes an archive may extract to
    disable_token_authorization: bool = False
    # a missing, wrong or expired token is answered 401, the status HTTP defines for it; TorchServe
    # answers 400 (its clients and tests expect that): token_auth_status=400 matches it
    token_auth_status: int = 401
    # minutes a management or inference key lives (TorchServe's token_expiration_min; its default is
    # 60); 0, Osprey's default, keeps keys until they are rotated with /token or the server restarts
    token_expiration_min: float = 0.0
    key_file: str = "key_file.json"
    # TLS (server/tls.py): an https:// address above, and enable_grpc_ssl for both gRPC ports, are
    # served with this key and certificate chain: PEM files, or a PKCS#12 keystore (which wins)
    private_key_file: str = ""
    certificate_file: str = ""
    keystore: str = ""
    keystore_pass: str = "changeit"  # TorchServe's default
    keystore_type: str = "PKCS12"  # JKS is refused with how to convert it
    enable_grpc_ssl: bool = False
    enable_model_api: bool = False
    # TorchServe's request envelope around every (TorchServe-style) handler's entry point: body,
    # json, kserve, kservev2 (kfserving / kfservingv2, its earlier names, mean the last two); with
    # kservev2, /v2/models/{m}/infer|explain hand such handlers the KServe v2 body (TorchServe's
    # answers) instead of decoding it as Open Inference Protocol tensors. Empty: none (handlers/envelopes.py)
    service_envelope: str = ""
    allowed_urls: tuple[str, ...] = ("file://.*",)
    pid_file: str = ""
    log_file: str = ""
    access_log: str = "off"  # off | on | sample:<fraction>
    access_log_file: str = ""  # empty: standard output
    request_metrics: bool = True  # per-request/per-batch Prometheus metrics (scrape-time gauges stay on)
    # TorchServe's metrics (monitoring/ts_metrics.py): /metrics always serves them (and Osprey's);
    # metrics_mode=log also writes them as TorchServe's lines to ts_metrics.log and model_metrics.log.
    # TorchServe's default is log; Osprey's is prometheus (no per-request file writes unless asked).
    metrics_mode: str = "prometheus"  # prometheus | log
    metrics_config: str = ""  # TorchServe metrics yaml naming the metrics exported; empty: TorchServe's default
    # handler metrics metrics_config does not declare are exported too (TorchServe's key); unset
    # (empty): on without metrics_config, off with one, as TorchServe
    model_metrics_auto_detect: str = ""
    metric_time_interval: float = 60.0  # seconds between system metrics lines in log mode (TorchServe's key)
    disable_system_metrics: bool = False  # no CPUUtilization, MemoryUsed, ... (TorchServe's key)
    # TorchServe's log files (server/log_files.py): access_log.log, model_log.log, ts_log.log here
    # (environment LOG_LOCATION when unset); empty and no LOG_LOCATION: none are written
    log_location: str = ""
    # ts_metrics.log and model_metrics.log (metrics_mode=log) here; empty: METRICS_LOCATION, else
    # log_location, else "logs" (TorchServe's default)
    metrics_location: str = ""
    # with log files on, what handlers print also goes to the server's standard output as its
    # model_log.log lines (TorchServe's console has them); off: only to model_log.log
    model_log_console: bool = False
    # TorchServe's config snapshots (server/snapshots.py): <log_location, else logs>/config/
    # <time>-startup.cfg at start, -snapshot.cfg after each management change, -shutdown.cfg at
    # stop; a start without a config file restores the models of the last one. On for
    # `osprey torchserve` (as in TorchServe; --ncs turns it off), off for `osprey serve`, whose
    # configuration is what it is given (config.properties, environment, --models), not what
    # API calls made of the previous run
    config_snapshots: bool = False
    log_max_bytes: int = 100 * 1024 * 1024  # a log file is rotated at this size (TorchServe: 100 MB) ...
    log_backup_count: int = 5  # ... keeping this many gzipped older files (TorchServe: 5)
    metric_buckets: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                         1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # latency histogram edges, seconds
    latency_objectives: tuple[float, ...] = (0.5,)  # seconds; each is a bucket edge, the largest the p99 objective
    torch_threads: int = 0  # 0: leave torch's default
    # how torch's OpenMP threads wait between parallel regions (libgomp's OMP_WAIT_POLICY, read
    # once when torch loads): passive, they sleep at once; active, they spin on a core first
    # (on a small machine that core is taken from the event loop and the clients: the tiny MLP
    # answered 9% fewer requests batched, 28% fewer unbatched); "" leaves torch's default.
    # OMP_WAIT_POLICY in the environment wins over this setting.
    omp_wait_policy: str = "passive"
    # with omp_wait_policy passive: how many busy-wait loops an OpenMP thread spins after a
    # parallel region before it sleeps (libgomp's GOMP_SPINCOUNT; 1,000 is about 10 us by libgomp's estimate).
    # It covers the gaps between the regions of one forward pass (a ResNet-18 runs dozens),
    # not the gaps between batches: sleeping at once (0) made each of those regions wake a
    # sleeping thread, and the ResNet-18-sized CNN's forward 40% slower (13.4 vs 9.7 ms). Exported
    # as OMP_WAIT_POLICY=ACTIVE with this GOMP_SPINCOUNT, so that it holds with more OpenMP threads
    # than CPUs too (server/serve.py apply_omp_wait_policy).
    # GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins over this setting.
    omp_spin_count: int = 1000
    # threads of the BLAS library numpy brings (OpenBLAS), in the server process (thread
    # instances, the monitor): its workers spin after each threaded product, on the cores the
    # event loop needs (18 us of CPU per request of the tiny MLP when the monitor's projections
    # went threaded). 0 leaves numpy's default; OPENBLAS_NUM_THREADS, MKL_NUM_THREADS or
    # OMP_NUM_THREADS in the environment win over this setting.
    numpy_blas_threads: int = 1
    # the CPU the event loop's thread, and the instance threads of small models (batches under
    # 5 ms, one instance), run on once the server is ready (server/core/cpus.py): they take turns
    # holding the GIL, and on one CPU a turn does not wake a thread on another (on 2 CPUs the
    # tiny MLP answered 11% more requests batched, 35% more unbatched at c=32). torch's OpenMP workers,
    # models with long batches or several instances, and child processes keep every CPU.
    # auto: the CPU the loop is on unless another Osprey server here claimed it (then a free
    # one; none free, or fewer than 2 CPUs: nothing pinned); off: the system places every
    # thread; a number: that CPU.
    interpreter_cpu: str = "auto"
    # GIL switch interval (s): short, so the event loop and model threads hand off quickly
    # (Python's default of 5 ms adds up to 5 ms to every handoff between busy threads).
    switch_interval: float = 0.0005
    workdir: str = "."
    # model instances: "thread" (in this process) or "process" (a child process each); a model's
    # model-config.yaml ``isolation`` overrides it
    instance_isolation: str = "thread"
    instance_restart_backoff: float = 0.5  # seconds before the first restart of a crashed instance; doubles
    instance_restart_backoff_max: float = 30.0  # longest wait between restarts
    crash_loop_restarts: int = 5  # this many crashes of one model version within crash_loop_window ...
    crash_loop_window: float = 60.0  # ... seconds: stop restarting, the version is unhealthy
    hang_grace: float = 1.0  # seconds past responseTimeout a busy instance is replaced (process killed, thread abandoned)
    # how lost and replaced instances are reported (server/core/worker_lines.py): osprey (structured
    # event= lines; a request past responseTimeout is answered 504) or torchserve (TorchServe 0.12's
    # 'Worker disconnected', 'Retry worker', 'Auto recovery ...' lines; 500 "Worker died.")
    worker_lifecycle: str = "osprey"
    max_abandoned_threads: int = 4  # hung threads one model version may leave behind before it is unhealthy
    # drift, feedback and live quality (per model: model-config.yaml ``monitoring:``); off here turns it off for all
    monitoring: bool = True
    # where the monitor runs: "process" (a child process of its own, osprey-monitord: the
    # analysis, the prediction log and the inputs held for retraining leave the serving
    # interpreter, and process instances send their observations straight to it) or "thread"
    # (a background thread of this process: no second process, its analysis takes the serving
    # interpreter's GIL; benchmarks/DRIFT.md, session 28)
    monitor_isolation: str = "process"
    # Redis for state shared between replicas (drift windows and episodes, predictions kept for
    # feedback joins, quality windows); empty: this process keeps it (nothing to install)
    redis_url: str = ""
    # with redis_url, the replicas also share each model's routing (versions and their archives,
    # default, canary weights, shadow): a change made through any replica is published at once and
    # every replica checks the shared revision this often (seconds), so a missed message or a
    # restarted replica converges (server/shared_routing.py)
    routing_sync_interval: float = 1.0
    # retraining jobs (server/retraining): with redis_url on a saq queue run by `osprey worker`,
    # without it by this server in child processes, records under <model_store>/.osprey/jobs
    retraining_concurrency: int = 1  # jobs one process runs at once (embedded; `osprey worker --concurrency`)
    # seconds a running job (Redis) may go without a heartbeat before it is taken for lost and run
    # again elsewhere (its worker beats every third of it); a live job is never run twice
    retraining_heartbeat: float = 30.0
    retraining_sweep_interval: float = 10.0  # seconds between a worker's checks for lost jobs
    retraining_cancel_grace: float = 5.0  # seconds a stopped job's process has after SIGTERM, then SIGKILL
    retraining_job_ttl: float = 30 * 86400.0  # seconds a finished job's record stays in Redis (0: forever)
    # added to a job process's niceness (0..19): on a machine that also serves, the scheduler
    # gives serving the CPU first (benchmarks/CHANGES.md: MLP at c=32 kept 0.61 of its
    # throughput under a digits_cnn job at nice 0)
    retraining_nice: int = 10
    # where a job's process runs: "local" (a child process of the worker or server that took the
    # job) or "ray" (submitted to a Ray cluster through its Jobs API, server/retraining/ray_runner.py;
    # the cluster's nodes need Osprey installed and the model store mounted at the same path)
    retraining_executor: str = "local"
    ray_address: str = ""  # the Ray dashboard's HTTP address (its Jobs API), e.g. http://127.0.0.1:8265
    # Ray's runtime_env for each job, as JSON (env_vars, a container image, pip, ...); "" for none
    ray_runtime_env: str = ""
    ray_python: str = "python3"  # the command that runs a Python with Osprey on the Ray cluster's nodes
    ray_poll_interval: float = 1.0  # seconds between reads of a running Ray job's status and log
    # --- deployment on several hosts (Kubernetes, KServe) ---
    # token keys the operator supplies (e.g. from a Kubernetes Secret) instead of random ones
    # made at each start: all three or none. Every replica then accepts the same keys, and with
    # redis_url a /token rotation through any replica reaches every replica (server/protocols/auth.py)
    inference_key: str = field(default="", repr=False)
    management_key: str = field(default="", repr=False)
    api_key: str = field(default="", repr=False)
    # the host (name or IP) retraining jobs call this server back at, on its management and
    # inference ports: in Kubernetes the pod IP (downward API status.podIP). Empty: the listen
    # address's host, 0.0.0.0 and :: as 127.0.0.1 (a worker on this machine only)
    advertised_host: str = ""
    # Osprey's own files: retraining job records and work folders (embedded queue), labelled rows.
    # Empty: <model_store>/.osprey, or <workdir>/.osprey when the model store is read-only
    state_dir: str = ""
    # TorchServe's key: a model archive's requirements.txt (torch-model-archiver --requirements-file)
    # is pip-installed for that model when it is registered, into <state_dir>/deps/<model>/<version>/
    # <hash>/ (reused while requirements.txt and the files it names are unchanged); off: ignored,
    # with one log line. Such a model's instances run as processes unless its model-config.yaml
    # says isolation: thread (server/core/model_deps.py, README "Per-model Python packages")
    install_py_dep_per_model: bool = False
    py_dep_install_timeout: float = 600.0  # seconds pip may take for one model's requirements

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def grpc_inference_bind(self) -> str:
        return f"{self.grpc_inference_address}:{self.grpc_inference_port}"

    @property
    def grpc_management_bind(self) -> str:
        return f"{self.grpc_inference_address}:{self.grpc_management_port}"


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

def parse_properties(text: str) -> dict[str, str]:
    """Parse a Java .properties file (the subset TorchServe users write)."""
    out: dict[str, str] = {}
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#!"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        for i, ch in enumerate(line):
            if ch in "=:":
                key, value = line[:i].strip(), line[i + 1 :].strip()
                break
        else:
            key, value = line, ""
        out[key] = value
    return out


def parse_address(address: str) -> tuple[str, int]:
    """``http://127.0.0.1:8080`` -> ("127.0.0.1", 8080); ``https://HOST`` alone is port 443."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"address {address!r} must be http://HOST:PORT or https://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None and scheme == "https" and parts.hostname and not parts.netloc.endswith(":"):
        port = 443  # TorchServe's default for https
    if parts.hostname is None or port is None:
        raise ValueError(f"address {address!r} must look like http://HOST:PORT")
    return parts.hostname, port


def _coerce(name: str, value: Any) -> Any:
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if isinstance(value, str):
        v = value.strip()
        if kind == "bool":
            if v.lower() in ("1", "true", "yes", "on"):
                return True
            if v.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"setting {name}: {value!r} is not a boolean")
        if kind == "int":
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"setting {name}: {value!r} is not an integer") from None
        if kind == "float":
            try:
                number = float(v)
            except ValueError:
                raise ValueError(f"setting {name}: {value!r} is not a number") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(f"setting {name}: {value!r} is not a finite number")
            return number
        if kind.startswith("tuple"):
            parts = tuple(p.strip() for p in v.split(",") if p.strip())
            if "float" in kind:
                try:
                    return tuple(float(p) for p in parts)
                except ValueError:
                    raise ValueError(f"setting {name}: {value!r} is not a comma-separated list of numbers") from None
            return parts
        return v
    if kind.startswith("tuple") and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _from_properties(props: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key in _FIELDS:
            out[key] = _coerce(key, value)
    if "load_models" in out and out["load_models"] in (("standalone",), ()):
        out.pop("load_models")
    return out


def _from_env(env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = prefix + name.upper()
        if key in env:
            out[name] = _coerce(name, env[key])
    return out


def load_settings(
    config_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    properties: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from a config.properties file, the environment and overrides; ``defaults``
    replace Settings' own defaults (what none of the others sets). ``properties``: a config's
    keys already read (a config snapshot restored, server/snapshots.py), in place of a file."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    props: dict[str, str] = dict(properties or {})
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        props = parse_properties(path.read_text())
    values.update(_from_properties(props))
    ts_env = props.get("enable_envvars_config", "false").lower() == "true"
    values.update(_from_env(env, "OSPREY_"))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    if ts_env:  # after the command line, as in TorchServe (see the module's docstring)
        values.update(_from_env(env, "TS_"))
    for key, var in (("log_location", "LOG_LOCATION"), ("metrics_location", "METRICS_LOCATION")):
        if not values.get(key) and env.get(var):  # TorchServe's log4j2 reads these whatever the config says
            values[key] = env[var]
    for key, value in (defaults or {}).items():
        values.setdefault(key, _coerce(key, value))
    settings = Settings(**values)
    from server.instances import canonical_envelope

    envelope = canonical_envelope(settings.service_envelope)
    if envelope != settings.service_envelope:
        settings = settings.replace(service_envelope=envelope)
    for addr in (settings.inference_address, settings.management_address, settings.metrics_address):
        parse_address(addr)
    from monitoring.access_log import parse_access_log

    parse_access_log(settings.access_log)
    if settings.max_response_size < 1:
        raise ValueError(f"setting max_response_size: {settings.max_response_size!r} must be a positive number of bytes")
    if settings.max_header_size < 1024:
        raise ValueError(f"setting max_header_size: {settings.max_header_size!r} must be at least 1024 bytes")
    if settings.unregister_timeout < 0:
        raise ValueError(f"setting unregister_timeout: {settings.unregister_timeout!r} must be 0 (no limit) "
                         "or a positive number of seconds")
    if settings.max_connections < 0:
        raise ValueError(f"setting max_connections: {settings.max_connections!r} must be 0 (from the open-files "
                         "limit) or a positive number")
    if settings.frontend_timeout <= 0:
        raise ValueError(f"setting frontend_timeout: {settings.frontend_timeout!r} must be a positive number of seconds")
    if not 1 <= settings.frontends <= 64:
        raise ValueError(f"setting frontends: {settings.frontends!r} must be from 1 (this process alone) to 64")
    if settings.instance_isolation not in ("thread", "process"):
        raise ValueError(f"setting instance_isolation: {settings.instance_isolation!r} must be thread or process")
    if settings.monitor_isolation not in ("thread", "process"):
        raise ValueError(f"setting monitor_isolation: {settings.monitor_isolation!r} must be thread or process")
    if settings.retraining_concurrency < 1:
        raise ValueError(f"setting retraining_concurrency: {settings.retraining_concurrency!r} must be at least 1")
    for name in ("retraining_heartbeat", "retraining_sweep_interval", "routing_sync_interval"):
        if getattr(settings, name) <= 0:
            raise ValueError(f"setting {name}: {getattr(settings, name)!r} must be a positive number of seconds")
    if not 0 <= settings.retraining_nice <= 19:
        raise ValueError(f"setting retraining_nice: {settings.retraining_nice!r} must be from 0 to 19")
    if settings.retraining_executor not in ("local", "ray"):
        raise ValueError(f"setting retraining_executor: {settings.retraining_executor!r} must be local or ray")
    if settings.retraining_executor == "ray":
        if not settings.ray_address:
            raise ValueError("setting retraining_executor=ray needs ray_address, the Ray dashboard's address "
                             "(e.g. http://127.0.0.1:8265)")
        parse_address(settings.ray_address)
        if not settings.ray_python.strip():
            raise ValueError("setting ray_python must name the Python command on the Ray cluster's nodes")
    if settings.ray_runtime_env:
        import json

        try:
            runtime_env = json.loads(settings.ray_runtime_env)
        except ValueError as exc:
            raise ValueError(f"setting ray_runtime_env is not JSON: {exc}") from None
        if not isinstance(runtime_env, dict):
            raise ValueError("setting ray_runtime_env must be a JSON object (Ray's runtime_env), "
                             f"got {settings.ray_runtime_env!r}")
    if settings.ray_poll_interval <= 0:
        raise ValueError(f"setting ray_poll_interval: {settings.ray_poll_interval!r} must be a positive number of seconds")
    if settings.retraining_cancel_grace < 0 or settings.retraining_job_ttl < 0:
        raise ValueError("settings retraining_cancel_grace and retraining_job_ttl must not be negative")
    if settings.metrics_config:  # a missing or broken file refuses the start, naming it
        from monitoring.ts_metrics_config import load_metrics_config

        load_metrics_config(settings.metrics_config)
    if settings.numpy_blas_threads < 0:
        raise ValueError(f"setting numpy_blas_threads: {settings.numpy_blas_threads} must be 0 (numpy's default) or more")
    from server.core.cpus import allowed_cpus, parse_setting as parse_interpreter_cpu

    cpu = parse_interpreter_cpu(settings.interpreter_cpu)  # auto, off or a CPU number
    if isinstance(cpu, int) and allowed_cpus() and cpu not in allowed_cpus():
        raise ValueError(f"setting interpreter_cpu: CPU {cpu} is not one this server may run on "
                         f"({', '.join(map(str, sorted(allowed_cpus())))})")
    if settings.omp_spin_count < 0:
        raise ValueError(f"setting omp_spin_count: {settings.omp_spin_count} must be 0 (sleep at once) or more")
    if settings.omp_wait_policy.lower() not in ("", "passive", "active"):
        raise ValueError(f"setting omp_wait_policy: {settings.omp_wait_policy!r} must be passive, active or empty "
                         "(torch's default)")
    if settings.worker_lifecycle not in ("osprey", "torchserve"):
        raise ValueError(f"setting worker_lifecycle: {settings.worker_lifecycle!r} must be osprey or torchserve")
    if settings.metrics_mode not in ("prometheus", "log"):
        raise ValueError(f"setting metrics_mode: {settings.metrics_mode!r} must be prometheus or log")
    if settings.model_metrics_auto_detect.lower() not in ("", "true", "false"):
        raise ValueError(f"setting model_metrics_auto_detect: {settings.model_metrics_auto_detect!r} must be true or false")
    if settings.log_max_bytes < 1024 or settings.log_backup_count < 0:
        raise ValueError("settings log_max_bytes (at least 1024) and log_backup_count (0 or more) are out of range")
    for name in ("metric_buckets", "latency_objectives"):
        if any(not 0 < float(v) < float("inf") for v in getattr(settings, name)):
            raise ValueError(f"setting {name}: every value must be a positive number of seconds")
    if settings.py_dep_install_timeout <= 0:
        raise ValueError(f"setting py_dep_install_timeout: {settings.py_dep_install_timeout!r} must be a positive "
                         "number of seconds")
    _check_deployment(settings)
    return settings


_KEY_SETTINGS = ("inference_key", "management_key", "api_key")
_PLACEHOLDER_PREFIX = "replace-me-"  # the published Secret's values (deploy/kubernetes/base/secret.yaml)
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")  # a name or an IPv4 address


def _host_ok(host: str) -> bool:
    if ":" in host:  # IPv6, bracketed or not
        try:
            ipaddress.IPv6Address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
        except ValueError:
            return False
        return True
    return bool(_HOST.fullmatch(host))


def _check_deployment(settings: Settings) -> None:
    """Supplied keys (all three, usable in a Bearer header), the advertised host, the models' JSON."""
    if settings.models:
        from server.model_overrides import parse_models

        parse_models(settings.models)  # ValueError naming what is wrong
    given = [n for n in _KEY_SETTINGS if getattr(settings, n)]
    if given and len(given) < 3:
        missing = [n for n in _KEY_SETTINGS if n not in given]
        raise ValueError(f"settings {', '.join(_KEY_SETTINGS)} go together (OSPREY_INFERENCE_KEY, "
                         f"OSPREY_MANAGEMENT_KEY, OSPREY_API_KEY): {', '.join(given)} set, {', '.join(missing)} missing")
    for name in given:
        value = getattr(settings, name)  # never quoted in a message: it is a secret
        if len(value) < 8 or not all(33 <= ord(ch) < 127 for ch in value):
            raise ValueError(f"setting {name}: a key must be at least 8 printable ASCII characters without "
                             f"spaces (it is sent as 'Authorization: Bearer KEY'); the one given has {len(value)} characters"
                             + ("" if value.isprintable() and " " not in value else ", spaces or control characters among them"))
    public = [n for n in given if getattr(settings, n).startswith(_PLACEHOLDER_PREFIX)]
    if public:
        raise ValueError(f"setting {', '.join(public)}: still the placeholder from deploy/kubernetes/base/secret.yaml "
                         "(published with Osprey, so anyone can use it); put your own keys in the Secret "
                         "(deploy/README.md shows a command that makes them)")
    if given and len({getattr(settings, n) for n in _KEY_SETTINGS}) < 3:
        raise ValueError(f"settings {', '.join(_KEY_SETTINGS)}: the three keys must differ (the inference key must "
                         "not open the management API, nor either one make new keys)")
    host = settings.advertised_host
    if host and (not _host_ok(host) or host.strip("[]") in ("0.0.0.0", "::")):
        raise ValueError(f"setting advertised_host: {host!r} must be a host name or IP address that other hosts "
                         "can reach this server at (no scheme, no port; not 0.0.0.0 or ::)")
