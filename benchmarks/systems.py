"""The servers under test, each a real process tree on free loopback ports.

- :class:`Osprey`: ``osprey serve --foreground`` (token auth off).
- :class:`TorchServe`: ``torchserve --start --foreground`` from the benchmark's own venv
  (its pid file goes to a private TMPDIR so it never meets another TorchServe).
- :class:`FastAPIApp`: ``benchmarks/fastapi_app.py`` (the model called on the event loop).
- :class:`ConstantApp`: a bare uvicorn ASGI app returning a constant (Python HTTP ceiling).

Each records *start-up time* (process start to first successful answer, and to every
model answering) and offers the *resident memory* of its whole process tree.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from .models import BenchModel

__all__ = ["free_port", "Osprey", "TorchServe", "FastAPIApp", "ConstantApp", "tree_rss_mb", "tree_cpu_s", "post",
           "PEER_SERVERS"]

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port below the ephemeral range (the tests' helper: an outgoing connection, such
    as the benchmark's own posts to a server starting beside it, cannot take it before the server
    that was given it binds it; ``bind(0)`` could, and did)."""
    from tests.conftest import free_port as below_ephemeral

    return below_ephemeral()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def post(url: str, body: bytes, content_type: str, timeout: float = 5.0) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """A process tree started in its own session; stopped by its process group id."""

    name = "server"

    def __init__(self, work: Path, models: list[BenchModel]):
        self.work = work
        self.models = models
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0
        self.startup: dict[str, float] = {}
        self.log_path = work / f"{self.name}.log"
        self.inference = ""

    # subclasses set self.inference and return the command, env and cwd
    def command(self) -> tuple[list[str], dict, Path]:
        raise NotImplementedError

    def predict_url(self, model: str) -> str:
        return f"{self.inference}/predictions/{model}"

    def request_for(self, m: BenchModel) -> tuple[Path, str]:
        """(body file, Content-Type) of one request to ``m`` on this server: the benchmark's own body
        unless the server's protocol needs another encoding of the same input (the peers)."""
        return m.body, m.content_type

    @property
    def rss_pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return tree_rss_mb(self.rss_pid)

    def idle_cpu_pct(self, seconds: float = 2.0) -> float:
        """CPU the whole process tree uses while no request comes (background threads and daemons), in % of
        one core: what an idle server takes from the others while they are measured."""
        before, t0 = tree_cpu_s(self.proc.pid), time.monotonic()
        time.sleep(seconds)
        return 100.0 * (tree_cpu_s(self.proc.pid) - before) / (time.monotonic() - t0)

    paused: list | tuple = ()  # the processes pause() stopped, until resume()

    def _tree(self) -> list:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]  # a peer's daemons too (their own groups)
        except psutil.NoSuchProcess:
            return []

    def pause(self) -> None:
        """Stop the whole process tree (SIGSTOP) while other systems are measured: an idle server's
        background work (LitServe's polling workers took about 50% of a core here, Ray's daemons
        about 20%) would otherwise take CPU from the one measured. Connections and state stay."""
        if self.proc is None or self.paused:
            return
        tree = self._tree()
        for proc in tree:
            try:
                proc.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
        self.paused = tree

    def resume(self) -> None:
        """Continue what :meth:`pause` stopped (all processes at once, then a moment for the timers
        that came due to fire before anything is measured)."""
        tree, self.paused = self.paused, ()
        for proc in tree:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        if tree:
            time.sleep(0.5)

    def start(self, timeout: float = 240.0) -> "Server":
        self.work.mkdir(parents=True, exist_ok=True)
        cmd, env, cwd = self.command()
        self._log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_models(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def load_failed(self, model: str) -> str | None:
        """Why ``model`` failed to load, when the server's log says so (then it is skipped)."""
        return None

    def _wait_models(self, timeout: float) -> None:
        deadline = self.t0 + timeout
        self.failed: dict[str, str] = {}
        answered = []
        for m in self.models:
            body_path, content_type = self.request_for(m)
            body = body_path.read_bytes()
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                                       + self.log_path.read_text(errors="replace")[-3000:])
                try:
                    status, _ = post(self.predict_url(m.name), body, content_type, timeout=30)
                    if status == 200:
                        answered.append(m)
                        break
                except OSError:
                    pass
                why = self.load_failed(m.name)
                if why or time.monotonic() > deadline:
                    self.failed[m.name] = why or f"not answering after {timeout} s"
                    break
                time.sleep(0.02)
            if len(answered) == 1 and "first_answer_s" not in self.startup:
                self.startup["first_answer_s"] = time.monotonic() - self.t0
        if not answered:
            raise RuntimeError(f"{self.name}: no model answered: {self.failed}; log {self.log_path}")
        self.startup["all_models_s"] = time.monotonic() - self.t0
        self.startup["models"] = len(answered)
        self.models = answered

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()  # a stopped process would not act on SIGTERM
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:  # descendants that left the group (a peer's daemons) are ended by pid below
            family = psutil.Process(pgid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything of this group still alive (e.g. TorchServe workers)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.killpg(pgid, 0)
                time.sleep(0.2)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in family:
            try:
                if child.is_running() and os.getpgid(child.pid) != pgid:
                    child.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._log.close()
        self.proc = None


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSPREY_", "TS_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Osprey(Server):
    name = "osprey"

    def __init__(self, work: Path, models: list[BenchModel], *, config: dict | None = None,
                 extra_args: list[str] | None = None, tag: str = "osprey"):
        self.name = tag
        super().__init__(work, models)
        self.config = config or {}
        self.extra_args = extra_args or []
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"

    def command(self):
        store = self.models[0].archive.parent
        cmd = [sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", str(store),
               "--inference-address", self.inference, "--management-address", self.management,
               "--metrics-address", f"http://127.0.0.1:{self.ports['metrics']}",
               "--grpc-inference-port", str(self.ports["grpc"]),
               "--grpc-management-port", str(self.ports["grpc_mgmt"]),
               "--pid-file", str(self.work / "osprey.pid"), "--disable-token-auth", "--log-level", "WARNING",
               "--models", *(f"{m.name}={m.archive.name}" for m in self.models), *self.extra_args]
        if self.config:
            props = self.work / "config.properties"
            props.write_text("".join(f"{k}={v}\n" for k, v in self.config.items()))
            cmd += ["--ts-config", str(props)]
        return cmd, _env(), self.work


class TorchServe(Server):
    name = "torchserve"

    def __init__(self, work: Path, models: list[BenchModel], ts_bin: Path, properties: dict | None = None):
        super().__init__(work, models)
        self.ts_bin = ts_bin
        self.properties = properties or {}
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"

    def command(self):
        store = self.models[0].archive.parent
        cfg = self.work / "config.properties"
        cfg.write_text("\n".join([
            f"inference_address={self.inference}",
            f"management_address={self.management}",
            f"metrics_address=http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_address=127.0.0.1", "grpc_management_address=127.0.0.1",
            f"grpc_inference_port={self.ports['grpc']}", f"grpc_management_port={self.ports['grpc_mgmt']}",
            "default_workers_per_model=1", "disable_token_authorization=true",
            *(f"{k}={v}" for k, v in self.properties.items()), ""]))
        tmp = self.work / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.ts_bin / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(store),
               "--ts-config", str(cfg), "--disable-token-auth",
               "--models", *(f"{m.name}={m.archive.name}" for m in self.models)]
        env = _env(TMPDIR=str(tmp), PATH=f"{self.ts_bin}:{os.environ.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        return cmd, env, self.work

    @property
    def rss_pid(self) -> int:
        """The JVM (its workers are its children); the Python launcher above it is not counted."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if "java" in child.name():
                    return child.pid
        except psutil.NoSuchProcess:
            pass
        return self.proc.pid

    def load_failed(self, model: str) -> str | None:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        if f"Load model failed: {model}," in text:
            errs = [ln for ln in text.splitlines() if "Error" in ln and "MODEL_LOG" in ln and f"-{model}_" in ln]
            return "TorchServe could not load it: " + (errs[-1].split("MODEL_LOG - ")[-1] if errs else "worker died")
        return None

    def describe(self, model: str) -> dict:
        parts = urlsplit(self.management)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", f"/models/{model}")
            data = json.loads(conn.getresponse().read())
            return data[0] if isinstance(data, list) and data else data
        finally:
            conn.close()


class FastAPIApp(Server):
    name = "fastapi"

    def __init__(self, work: Path, models: list[BenchModel]):
        super().__init__(work, [m for m in models if m.weights is not None])
        self.port = free_port()
        self.inference = f"http://127.0.0.1:{self.port}"

    def command(self):
        spec = json.dumps({m.name: {"weights": str(m.weights), "kind": m.kind, "shape": list(m.input_shape)}
                           for m in self.models})
        return [sys.executable, "-m", "benchmarks.fastapi_app", "--port", str(self.port), "--models", spec], _env(), self.work


class ConstantApp(Server):
    name = "uvicorn_constant"

    def __init__(self, work: Path, models: list[BenchModel]):
        super().__init__(work, models[:1])
        self.port = free_port()
        self.inference = f"http://127.0.0.1:{self.port}"

    def command(self):
        return [sys.executable, "-m", "benchmarks.asgi_constant", "--port", str(self.port)], _env(), self.work


# --- the Python peers, each from its own venv (benchmarks/peerenv.py) ------------------------------
PEERS_DIR = ROOT / "benchmarks" / "peers"


class PeerServer(Server):
    """A peer's server file (``benchmarks/peers/NAME_peer.py``) run by the peer's venv python.

    The models it serves are unpacked from the same archives (:func:`benchmarks.peerspec.archive_spec`):
    same TorchScript file, same batchSize / maxBatchDelay, same preprocessing. ``differences`` lists
    what the peer cannot do the way Osprey and TorchServe do (the report prints it)."""

    label = "peer"
    differences: list[str] = []

    def __init__(self, work: Path, models: list[BenchModel], python: Path):
        super().__init__(work, [m for m in models if not m.extra.get("osprey_only")])
        self.python = python
        self.port = free_port()
        self.inference = f"http://127.0.0.1:{self.port}"
        self.bodies: dict[str, tuple[Path, str]] = {}

    def spec(self) -> dict:
        from .peerspec import archive_spec

        return {m.name: archive_spec(m, self.work / "models") for m in self.models}

    def write_spec(self) -> Path:
        path = self.work / "spec.json"
        self.work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.spec(), indent=1))
        return path

    def request_for(self, m: BenchModel) -> tuple[Path, str]:
        return self.bodies.get(m.name, (m.body, m.content_type))

    def body_file(self, m: BenchModel, suffix: str, data: bytes, content_type: str) -> None:
        path = self.work / "bodies" / f"{m.name}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.bodies[m.name] = (path, content_type)

    def env(self, **extra) -> dict:
        env = _env(PYTHONPATH=str(PEERS_DIR), **extra)
        return env

    def describe_peer(self) -> dict:
        spec = json.loads((self.work / "spec.json").read_text()) if (self.work / "spec.json").exists() else {}
        return {"label": self.label, "models": [m.name for m in self.models],
                "batching": {n: {"batch_size": s["batch_size"], "delay_ms": s["delay_ms"]} for n, s in spec.items()},
                "requests": {m.name: {"url_path": urlsplit(self.predict_url(m.name)).path,
                                      "content_type": self.request_for(m)[1],
                                      "body_bytes": self.request_for(m)[0].stat().st_size} for m in self.models},
                "differences": list(self.differences)}


class MLServerPeer(PeerServer):
    """``mlserver start`` with a custom runtime (``peers/mlserver_peer.py``); REST and gRPC Open Inference Protocol."""

    name = "mlserver"
    label = "MLServer 1.7"
    differences = [
        "Protocol: the Open Inference Protocol only (`POST /v2/models/NAME/infer`, JSON tensors), so its request "
        "bodies are that protocol's encoding of the same input: mlp an FP32 1x16 tensor, the CNN an FP32 1x3xSxS "
        "tensor written out as JSON numbers (MLServer's REST has no binary tensor extension: about 5x the bytes of "
        "the raw float32 body, 776 KB at 3x112x112, parsed as JSON), digits the PNG as one base64 BYTES element",
        "Batching: adaptive batching with max_batch_size = batchSize and max_batch_time = maxBatchDelay; batchSize 1 "
        "(mlp_nb) leaves it off, as MLServer does by default",
        "Workers: MLServer's default parallel_workers=1, so inference runs in one worker process behind the "
        "HTTP/gRPC process (like TorchServe's one worker), with MLServer's own metrics endpoint on",
    ]

    def __init__(self, work: Path, models: list[BenchModel], python: Path):
        super().__init__(work, models, python)
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.grpc = f"127.0.0.1:{self.grpc_port}"

    def predict_url(self, model: str) -> str:
        return f"{self.inference}/v2/models/{model}/infer"

    def command(self):
        from .peerspec import oip_json

        folder = self.work / "repo"
        folder.mkdir(parents=True, exist_ok=True)
        (self.work / "metrics").mkdir(exist_ok=True)
        (folder / "settings.json").write_text(json.dumps({
            "debug": False, "host": "127.0.0.1", "http_port": self.port, "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port, "metrics_dir": str(self.work / "metrics"), "parallel_workers": 1}))
        specs = self.spec()
        (self.work / "spec.json").write_text(json.dumps(specs, indent=1))
        for name, spec in specs.items():
            m = next(x for x in self.models if x.name == name)
            settings = {"name": name, "implementation": "mlserver_peer.TorchModel", "parameters": {"extra": spec}}
            if spec["batch_size"] > 1:
                settings.update(max_batch_size=spec["batch_size"], max_batch_time=spec["delay_ms"] / 1000)
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "model-settings.json").write_text(json.dumps(settings, indent=1))
            self.body_file(m, "oip.json", json.dumps(oip_json(m, m.body.read_bytes())).encode(), "application/json")
        return [str(self.python.parent / "mlserver"), "start", str(folder)], self.env(), self.work


class RayServePeer(PeerServer):
    """A local Ray node with Serve (``peers/rayserve_peer.py``): the same URLs and bodies as Osprey."""

    name = "rayserve"
    label = "Ray Serve 2.60"
    differences = [
        "Batching: `@serve.batch(max_batch_size=batchSize, batch_wait_timeout_s=maxBatchDelay)`; mlp_nb is a "
        "deployment without it. One replica per model, `max_ongoing_requests` 1000 (Ray's default, 5, would cap "
        "a batch at 5)",
        "Process tree: the driver, Ray's GCS server, raylet and its workers (Serve controller, HTTP proxy, one "
        "replica actor per model); no dashboard. All of it is counted in RSS",
    ]

    def command(self):
        import tempfile

        spec = self.write_spec()
        tmp = tempfile.mkdtemp(prefix="rayb-")  # short: Ray puts unix sockets under it
        self.tmp = tmp
        home = self.work / "home"  # Ray 2.60 writes its cluster auth token under ~/.ray: kept in the work folder
        home.mkdir(parents=True, exist_ok=True)
        return ([str(self.python), str(PEERS_DIR / "rayserve_peer.py"), "--port", str(self.port), "--spec", str(spec),
                 "--tmp", tmp], self.env(RAY_USAGE_STATS_ENABLED="0", HOME=str(home)), self.work)

    def stop(self) -> None:
        import shutil

        super().stop()
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)


class LitServePeer(PeerServer):
    """``LitServer`` with one ``LitAPI`` per model (``peers/litserve_peer.py``)."""

    name = "litserve"
    label = "LitServe 0.2"
    differences = [
        "Request bodies: LitServe reads a body as JSON or as a form only, so the CNN's raw float32 body and the "
        "digit PNG are sent as the one file of a multipart form (the same bytes, plus the form's framing and its "
        "parsing); mlp gets Osprey's JSON body",
        "Batching: `max_batch_size` = batchSize, `batch_timeout` = maxBatchDelay; batchSize 1 (mlp_nb) is its "
        "unbatched loop",
        "Processes: LitServe's defaults, one inference worker process per model and as many API server processes "
        "as inference workers (so 4 of each with the 4 models), requests crossing between them over queues",
    ]

    def command(self):
        from .peerspec import multipart

        spec = self.write_spec()
        for m in self.models:
            if m.kind != "mlp":
                body, ctype = multipart("file", m.body.name, m.body.read_bytes(), m.content_type)
                self.body_file(m, "multipart", body, ctype)
        return ([str(self.python), str(PEERS_DIR / "litserve_peer.py"), "--port", str(self.port), "--spec", str(spec)],
                self.env(), self.work)


class BentoMLPeer(PeerServer):
    """``bentoml serve`` of one service with an API per model (``peers/bentoml_peer.py``)."""

    name = "bentoml"
    label = "BentoML 1.4"
    differences = [
        "Batching: `@bentoml.api(batchable=True, max_batch_size=batchSize)`; BentoML has **no batch-delay "
        "setting**: its dispatcher decides how long to wait from the processing times it observes, and "
        "`max_latency_ms` is a deadline past which it refuses requests (503), not a delay; left at its 60 s so it "
        "never refuses. mlp_nb is an API without batching",
        "Request bodies: a batchable API batches along its input's first dimension, so mlp's body is the same 16 "
        "numbers as a one-row JSON batch (`[[...]]`) and the CNN's a JSON tensor 1x3xSxS (BentoML has no raw-body "
        "tensor input: about 5x the bytes of the raw float32 body, parsed as JSON); the digit PNG is the file of a "
        "multipart form, opened with Pillow by BentoML (the rest of the preprocessing is the handler's)",
        "Processes: `bentoml serve`'s supervisor and one service worker (`workers=1`, one thread for the model)",
    ]

    def command(self):
        from .peerspec import multipart

        spec = self.write_spec()
        for m in self.models:
            raw = m.body.read_bytes()
            if m.kind == "mlp":
                self.body_file(m, "json", b"[" + raw.strip() + b"]", "application/json")
            elif m.kind == "cnn":
                import numpy as np

                arr = np.frombuffer(raw, dtype=np.float32).reshape(1, *m.input_shape)
                self.body_file(m, "json", json.dumps(arr.tolist()).encode(), "application/json")
            else:
                body, ctype = multipart("images", m.body.name, raw, m.content_type)
                self.body_file(m, "multipart", body, ctype)
        home = self.work / "bentoml_home"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.python.parent / "bentoml"), "serve", "bentoml_peer:BenchPeer", "--working-dir", str(PEERS_DIR),
               "--host", "127.0.0.1", "--port", str(self.port)]
        return cmd, self.env(BENCH_PEER_SPEC=str(spec), BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True"), self.work


PEER_SERVERS: dict[str, type[PeerServer]] = {"mlserver": MLServerPeer, "litserve": LitServePeer,
                                             "rayserve": RayServePeer, "bentoml": BentoMLPeer}
