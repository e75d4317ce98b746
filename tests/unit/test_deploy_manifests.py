"""deploy/kubernetes and deploy/kserve, checked the way a cluster would take them.

* The Kustomize base and its overlays are rendered (a small renderer below; cross-checked
  against ``kubectl kustomize`` where kubectl is installed), and every object is validated:
  built-in kinds with kubernetes-validate (the Kubernetes OpenAPI schemas, strict: an unknown
  field is an error) for the oldest and the newest Kubernetes the manifests are meant for;
  PodMonitor and the KServe kinds against their CRD schemas, trimmed small under
  deploy_schemas/ (trim_crd.py says how).
* References resolve: Service, PodDisruptionBudget, PodMonitor and NetworkPolicy select the
  pods they mean; probes and Services name container ports; volumes name a ConfigMap or claim
  that exists; the HPA scales an existing Deployment on the metric the adapter rule serves.
* The pods' view of Osprey is Osprey's: config.properties and the environment go through the
  server's own settings loader, the container args through its own command-line parser, and the
  probe paths are asked of the server's real inference router (with token authorization on).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

from server import cli
from server.settings import Settings, load_settings, parse_address, parse_properties
from tests.prometheus_helpers import require

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
SCHEMAS = Path(__file__).resolve().parent / "deploy_schemas"
TARGETS = ("base", "overlays/cpu", "overlays/gpu")
# the oldest Kubernetes the manifests are written for (no field newer than it), and the newest
# that kubernetes-validate knows
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime-serving-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
}
POD_IP = "10.1.2.3"  # what status.podIP gives the server pod in these checks
SETTINGS = {f.upper() for f in Settings.__dataclass_fields__}


# --- a small Kustomize ------------------------------------------------------------------------
# kustomize itself is a Go program (standalone or inside kubectl) and not on PyPI or in Debian
# in a current version; the PyPI packages named after it are not maintained. The manifests use
# three of its features: resources, images and JSON 6902 patches with a kind/name target. This
# renders exactly those and refuses anything else, so an overlay that starts using another
# feature fails here instead of rendering wrong.

class KustomizeError(ValueError):
    pass


SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


def render(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}/kustomization.yaml: {sorted(unknown)} not supported by this renderer")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
        else:
            raise KustomizeError(f"{folder}/kustomization.yaml: resource {entry!r} does not exist")
    for image in kustomization.get("images", []):
        _set_image(objects, image, folder)
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, patch, folder)
    return objects


def _set_image(objects: list[dict], image: dict, folder: Path) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"{folder}: image entry {image} not supported by this renderer")
    hits = 0
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = c["image"].partition(":")
            if name == image["name"]:
                c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
                hits += 1
    if not hits:
        raise KustomizeError(f"{folder}: no container uses image {image['name']!r}")


def _apply_patch(objects: list[dict], patch: dict, folder: Path) -> None:
    target = patch.get("target") or {}
    if set(patch) - {"path", "patch", "target"} or set(target) - {"kind", "name"} or not target:
        raise KustomizeError(f"{folder}: patch {patch} not supported (JSON 6902 with a kind/name target only)")
    ops = yaml.safe_load((folder / patch["path"]).read_text() if "path" in patch else patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{folder}: patch {patch} is not a JSON 6902 patch (a list of operations)")
    matched = [i for i, o in enumerate(objects)
               if all(o.get("kind") == target["kind"] if k == "kind" else o["metadata"]["name"] == target["name"]
                      for k in target)]
    if not matched:
        raise KustomizeError(f"{folder}: patch target {target} matches no object")
    for i in matched:
        objects[i] = jsonpatch.apply_patch(objects[i], ops)


def _rendered(target: str) -> list[dict]:
    return render(K8S / target)


def _kserve() -> list[dict]:
    return [d for p in sorted(KSERVE.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _key(o: dict) -> tuple[str, str, str]:
    return o["apiVersion"], o["kind"], o["metadata"]["name"]


# --- rendering ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_rendering_matches_kubectl_kustomize(target):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is not cross-checked here")
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {_key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {_key(o): o for o in _rendered(target)}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == theirs[key], key


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [../x]\nnamePrefix: a-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{K8S / 'base'}]\npatches:\n  - path: p.yaml\n    target: {{kind: Deployment, name: nope}}\n")
    (tmp_path / "p.yaml").write_text("- {op: replace, path: /spec/replicas, value: 3}\n")
    with pytest.raises(KustomizeError, match="matches no object"):
        render(tmp_path)


def test_overlays_change_what_they_say():
    cpu, gpu = _rendered("overlays/cpu"), _rendered("overlays/gpu")
    for objects, tag in ((cpu, "0.1.0"), (gpu, "0.1.0-cuda")):
        for name in ("osprey", "osprey-worker"):
            assert _one(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["image"] \
                == f"osprey:{tag}"
    server = _one(gpu, "Deployment", "osprey")["spec"]["template"]["spec"]
    assert server["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in server["tolerations"])
    cpu_server = _one(cpu, "Deployment", "osprey")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_server["resources"]["limits"]
    # torch's threads leave the event loop a core of the container's CPUs
    for objects in (cpu, gpu):
        c = _one(objects, "Deployment", "osprey")["spec"]["template"]["spec"]["containers"][0]
        threads = int(next(e["value"] for e in c["env"] if e["name"] == "OSPREY_TORCH_THREADS"))
        assert threads == int(c["resources"]["limits"]["cpu"]) - 1


# --- schemas -----------------------------------------------------------------------------------

def _schema_errors(obj: dict, k8s_version: str) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        schema = yaml.safe_load((SCHEMAS / CRD_SCHEMAS[key]).read_text())
        validator = jsonschema.validators.validator_for(schema)(schema)
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        name = obj["metadata"].get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
            errors.append(f"metadata.name: {name!r} is not a DNS label")
        return errors
    return list(_k8s_errors(json.dumps(obj, sort_keys=True), k8s_version))


@functools.lru_cache(maxsize=None)
def _k8s_errors(obj: str, k8s_version: str) -> tuple[str, ...]:
    """kubernetes-validate reads its schema files on every call (about 0.1 s): an object that the
    base and both overlays render alike is validated once."""
    try:
        kubernetes_validate.validate(json.loads(obj), k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return (f"{'.'.join(map(str, e.path))}: {e.message}",)
    return ()


# resource.Quantity as the API server parses it (the OpenAPI schemas say only "string or integer")
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?(\d+(\.\d*)?|\.\d+))?")


def _quantity_errors(obj, path: str = "") -> list[str]:
    """Every resource request or limit, storage size and HPA target value that is no quantity."""
    errors = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else k
            if k in ("requests", "limits") and isinstance(v, dict):
                errors += [f"{where}.{r}: {q!r}" for r, q in v.items() if not QUANTITY.fullmatch(str(q))]
            elif k in ("averageValue", "value") and path.endswith("target") and not QUANTITY.fullmatch(str(v)):
                errors.append(f"{where}: {v!r}")
            else:
                errors += _quantity_errors(v, where)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            errors += _quantity_errors(v, f"{path}.{i}")
    return errors


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("target", [*TARGETS, "kserve"])
def test_every_object_validates(target, k8s_version):
    objects = _kserve() if target == "kserve" else _rendered(target)
    assert objects
    problems = {f"{o['kind']}/{o['metadata']['name']}": _schema_errors(o, k8s_version) + _quantity_errors(o)
                for o in objects}
    assert {k: v for k, v in problems.items() if v} == {}


def test_validation_refuses_a_misspelt_field():
    """The checks above can fail: a field the API server would drop, in each kind of schema."""
    base = _rendered("base")
    bad = copy.deepcopy(_one(base, "Deployment", "osprey"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    assert _schema_errors(bad, K8S_VERSIONS[0])
    bad = copy.deepcopy(_one(base, "HorizontalPodAutoscaler", "osprey"))
    bad["spec"]["metrics"][0]["pods"]["target"]["averagevalue"] = "8"
    assert _schema_errors(bad, K8S_VERSIONS[0])
    bad["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = "8 requests"
    assert _quantity_errors(bad)  # the schemas leave quantities to the API server: checked here
    bad = copy.deepcopy(_one(base, "PodMonitor", "osprey"))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert _schema_errors(bad, K8S_VERSIONS[0])
    kserve = _kserve()
    bad = copy.deepcopy(_one(kserve, "InferenceService", "digits-cnn"))
    bad["spec"]["predictor"]["model"]["storageURI"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    assert _schema_errors(bad, K8S_VERSIONS[0])
    bad = copy.deepcopy(_one(kserve, "ClusterServingRuntime", "osprey"))
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    assert _schema_errors(bad, K8S_VERSIONS[0])


# --- references --------------------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pods(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) of each Deployment and StatefulSet."""
    return [(o, o["spec"]["template"]) for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _port_names(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
            if "name" in p}


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(target):
    objects = _rendered(target)
    pods = _pods(objects)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for workload, template in pods:
        labels = template["metadata"]["labels"]
        assert _selects(workload["spec"]["selector"]["matchLabels"], labels), workload["metadata"]["name"]
        ports = _port_names(template)
        for c in template["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                if action:
                    assert action["port"] in ports or action["port"] in ports.values(), (c["name"], probe)
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= {v["name"] for v in template["spec"].get("volumes", [])} | claims, c["name"]
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    for svc in (o for o in objects if o["kind"] == "Service"):
        selected = [t for _, t in pods if _selects(svc["spec"]["selector"], t["metadata"]["labels"])]
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            for t in selected:
                assert port["targetPort"] in _port_names(t), (svc["metadata"]["name"], port)
    server = _one(objects, "Deployment", "osprey")["spec"]["template"]
    server_only = [t for _, t in pods if _selects(
        _one(objects, "PodDisruptionBudget", "osprey")["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])]
    assert server_only == [server]
    hpa = _one(objects, "HorizontalPodAutoscaler", "osprey")["spec"]
    assert ("Deployment", hpa["scaleTargetRef"]["name"]) in names and hpa["scaleTargetRef"]["name"] == "osprey"
    assert hpa["minReplicas"] >= 2  # with maxUnavailable 1 in the PDB, a drain leaves one serving
    monitor = _one(objects, "PodMonitor", "osprey")["spec"]
    assert [t for _, t in pods if _selects(monitor["selector"]["matchLabels"], t["metadata"]["labels"])] == [server]
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} <= set(_port_names(server))
    policy = _one(objects, "NetworkPolicy", "osprey-server")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], server["metadata"]["labels"])
    for rule in policy["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= set(_port_names(server))


# --- the pods' view of Osprey ------------------------------------------------------------------

def _parse(args: list[str], monkeypatch) -> object:
    """The container's args through Osprey's own parser (``osprey`` is args[0])."""
    seen = []

    def capture(parsed) -> int:  # in place of running the command
        seen.append(parsed)
        return 0

    for name in ("cmd_serve", "cmd_worker"):
        monkeypatch.setattr(cli, name, capture)
    assert args[0] == "osprey"
    assert cli.main(args[1:]) == 0
    return seen[0]


@functools.lru_cache(maxsize=None)
def _published_secrets() -> dict[str, dict[str, str]]:
    """Secret name -> its values, as the base renders them (the overlays keep them)."""
    import base64

    return {o["metadata"]["name"]: {**{k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()},
                                    **o.get("stringData", {})}
            for o in _rendered("base") if o["kind"] == "Secret"}


@functools.lru_cache(maxsize=None)
def _secrets() -> dict[str, dict[str, str]]:
    """The Secrets after the README's step that puts the operator's own keys in place of the
    published placeholders (which the server refuses: test_published_placeholder_keys_are_refused)."""
    return {name: {k: re.sub(r"^replace-me-(\w+)-key$", lambda m: f"{m.group(1)}-{'0123456789abcdef' * 2}", v)
                   for k, v in values.items()}
            for name, values in _published_secrets().items()}


def test_published_placeholder_keys_are_refused():
    """A cluster applied without replacing the Secret's public placeholder keys does not start
    with them: the server's settings name which keys are still the placeholders."""
    container = _one(_rendered("overlays/cpu"), "Deployment", "osprey")["spec"]["template"]["spec"]["containers"][0]
    env = _env(container)
    raw = _published_secrets()["osprey-keys"]
    env.update({"OSPREY_INFERENCE_KEY": raw["inference-key"], "OSPREY_MANAGEMENT_KEY": raw["management-key"],
                "OSPREY_API_KEY": raw["api-key"]})
    with pytest.raises(ValueError, match="inference_key, management_key, api_key: still the placeholder"):
        load_settings(env=env)


def _env(container: dict, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as Kubernetes sets it: $(VAR) of an earlier variable expanded,
    the pod IP from the downward API, a Secret's value (which must exist)."""
    env: dict[str, str] = dict(extra or {})
    for e in container.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"].get("secretKeyRef")
            if ref is not None:
                assert ref["key"] in _secrets().get(ref["name"], {}), f"{e['name']}: no Secret {ref['name']}/{ref['key']}"
                env[e["name"]] = _secrets()[ref["name"]][ref["key"]]
                continue
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", e
            env[e["name"]] = POD_IP
            continue
        for ref in re.findall(r"\$\((\w+)\)", e["value"]):
            assert ref in env, f"{e['name']} uses $({ref}) before it is set"
        env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    unknown = {k for k in env if k.startswith("OSPREY_") and k[len("OSPREY_"):] not in SETTINGS}
    assert not unknown, f"not Osprey settings: {unknown}"
    return env


def _mounted(container: dict, path: str, tmp_path: Path, files: dict[str, Path]) -> str:
    """``path`` inside the container as a local path: the mounted ConfigMap's files live in tmp_path."""
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"] + "/") and m["name"] in files:
            return str(files[m["name"]] / path[len(m["mountPath"]) + 1:])
    return path


def _settings(container: dict, objects: list[dict], tmp_path: Path, monkeypatch):
    """(parsed args, Settings) of a server or worker container, as the process in it builds them."""
    config = _one(objects, "ConfigMap", "osprey-config")
    folder = tmp_path / "config"
    folder.mkdir(exist_ok=True)
    for name, text in config["data"].items():
        (folder / name).write_text(text)
    args = _parse(container["args"], monkeypatch)
    args.ts_config = _mounted(container, args.ts_config, tmp_path, {"config": folder})
    for k in [k for k in list(os.environ) if k.startswith(("OSPREY_", "TS_"))]:
        monkeypatch.delenv(k)
    for k, v in _env(container).items():
        monkeypatch.setenv(k, v)
    if args.command == "serve":
        return args, cli._settings_from(args)
    # as cmd_worker builds them
    return args, load_settings(args.ts_config, overrides={"model_store": args.model_store, "redis_url": args.redis,
                                                          "retraining_concurrency": args.concurrency})


def _mount_of(container: dict, template: dict, path: str) -> dict:
    """The volume mounted at the folder holding ``path``."""
    mounts = sorted((m for m in container["volumeMounts"] if path == m["mountPath"]
                     or path.startswith(m["mountPath"].rstrip("/") + "/")), key=lambda m: -len(m["mountPath"]))
    assert mounts, f"{path} is on the container's root filesystem"
    return next(v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"])


@pytest.mark.parametrize("target", TARGETS)
def test_server_and_worker_see_one_configuration(target, tmp_path, monkeypatch):
    objects = _rendered(target)
    deployment = _one(objects, "Deployment", "osprey")
    template = deployment["spec"]["template"]
    server = template["spec"]["containers"][0]
    args, s = _settings(server, objects, tmp_path, monkeypatch)
    assert args.foreground  # in the background the container's main process would exit at once
    ports = _port_names(template)
    # listening on every address (kubectl port-forward dials the pod's localhost), called back by
    # retraining jobs in the worker's pod at the pod IP
    assert parse_address(s.inference_address) == ("0.0.0.0", ports["http"])
    assert parse_address(s.management_address) == ("0.0.0.0", ports["management"])
    assert s.advertised_host == POD_IP
    assert parse_address(s.metrics_address)[1] == ports["metrics"]
    assert (s.grpc_inference_port, s.grpc_management_port) == (ports["grpc"], ports["grpc-management"])
    assert s.enable_grpc and s.grpc_inference_address == "0.0.0.0"
    assert s.load_models == ("all",)
    # shutdown: the preStop sleep, then SIGTERM's drain, within the grace period
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and 5 <= int(sleep[1])
    grace = template["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(sleep[1]) + s.drain_timeout + 1
    # read-only root filesystem: everything Osprey writes is on a volume
    assert server["securityContext"]["readOnlyRootFilesystem"]
    store = _mount_of(server, template, s.model_store)
    assert store["persistentVolumeClaim"]["claimName"] == "osprey-model-store"
    assert "emptyDir" in _mount_of(server, template, s.workdir)
    pid_file = str(Path(_env(server).get("TMPDIR", "/tmp")) / Path(cli.DEFAULT_PID_FILE).name)  # in the pod
    assert "emptyDir" in _mount_of(server, template, pid_file)
    assert "emptyDir" in _mount_of(server, template, _env(server)["HOME"])
    # the shared Redis
    host, port = parse_address(s.redis_url.replace("redis://", "http://"))
    redis = _one(objects, "Service", host)
    assert port in [p["port"] for p in redis["spec"]["ports"]]
    # token authorization on, with the Secret's keys in every replica (shared through Redis);
    # the management ports are besides open only to the Osprey pods
    assert not s.disable_token_authorization
    secret = _secrets()["osprey-keys"]
    assert (s.inference_key, s.management_key, s.api_key) == (
        secret["inference-key"], secret["management-key"], secret["api-key"])
    from server.protocols.auth import Keys

    keys = Keys.from_settings(s.replace(workdir=str(tmp_path), redis_url=""))
    assert keys.keys == {"inference": s.inference_key, "management": s.management_key, "API": s.api_key}
    policy = _one(objects, "NetworkPolicy", "osprey-server")["spec"]
    for rule in policy["ingress"]:
        names = {p["port"] for p in rule["ports"]}
        if names & {"management", "grpc-management"}:
            assert [f["podSelector"]["matchLabels"] for f in rule["from"]] == [{"app.kubernetes.io/name": "osprey"}]
    service_ports = {p["targetPort"] for p in _one(objects, "Service", "osprey")["spec"]["ports"]}
    assert not service_ports & {"management", "grpc-management"}

    worker_template = _one(objects, "Deployment", "osprey-worker")["spec"]["template"]
    worker = worker_template["spec"]["containers"][0]
    wargs, w = _settings(worker, objects, tmp_path, monkeypatch)
    assert wargs.command == "worker" and wargs.concurrency >= 1
    assert w.redis_url == s.redis_url
    # a job's paths are the server's: the worker mounts the same claim at the same place
    assert w.model_store == s.model_store
    assert _mount_of(worker, worker_template, w.model_store) == store
    assert worker["image"] == server["image"]
    # the worker pod may reach the management port (its labels pass the NetworkPolicy rule)
    assert _selects({"app.kubernetes.io/name": "osprey"}, worker_template["metadata"]["labels"])


async def test_probe_paths_answer_as_the_manifests_expect(tmp_path):
    """Ask the real inference router, token authorization on and no token sent: readiness is
    503 until the models are loaded and from the moment a shutdown starts (SIGTERM), liveness
    is 200 throughout."""
    from server.serve import Server

    expected = {}  # path -> the probes that use it
    deployment = _one(_rendered("base"), "Deployment", "osprey")["spec"]["template"]["spec"]["containers"][0]
    runtime = _one(_kserve(), "ClusterServingRuntime", "osprey")["spec"]["containers"][0]
    for container in (deployment, runtime):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                expected.setdefault(container[probe]["httpGet"]["path"], set()).add(probe)
    assert expected == {"/v2/health/ready": {"startupProbe", "readinessProbe"}, "/v2/health/live": {"livenessProbe"}}

    server = Server(Settings(model_store=str(tmp_path), workdir=str(tmp_path), monitoring=False,
                             disable_token_authorization=False))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.inference_app), base_url="http://pod") as c:
        async def codes():
            return {p: (await c.get(p)).status_code for p in expected}

        # a server is not ready from the moment it exists: its listeners open before the startup
        # models load, and a balancer's check answered 200 then sent requests that found no model
        assert await codes() == {"/v2/health/ready": 503, "/v2/health/live": 200}
        server.dataplane.started = True
        assert await codes() == {"/v2/health/ready": 200, "/v2/health/live": 200}
        assert (await c.get("/ping")).status_code == 401  # why /ping is no probe: it wants the token
        await server.stop(drain_timeout=0)  # what SIGTERM runs
        assert await codes() == {"/v2/health/ready": 503, "/v2/health/live": 200}


def test_hpa_scales_on_the_metric_the_adapter_serves(tmp_path):
    from monitoring.metrics import ServingMetrics

    hpa = _one(_rendered("base"), "HorizontalPodAutoscaler", "osprey")["spec"]["metrics"]
    assert [m["type"] for m in hpa] == ["Pods"]
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    rule = served[hpa[0]["pods"]["metric"]["name"]]
    metric = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], metric)
    assert f"# TYPE {metric} gauge" in ServingMetrics().render().decode()  # a metric Osprey exports
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # the query the adapter runs for two pods, run by promtool on series as the PodMonitor labels
    # them: a pod's value is the sum over its models of each one's one-minute average
    query = (rule["metricsQuery"].replace("<<.Series>>", metric).replace("<<.GroupBy>>", "pod")
             .replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"osprey-a|osprey-b"'))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "adapter:queue_depth", "expr": query}]}]}))
    series = lambda pod, model, values: {"series": f'{metric}{{namespace="ml",pod="{pod}",model="{model}",'
                                                   f'version="1"}}', "values": values}
    (tmp_path / "test.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": [
            series("osprey-a", "m1", "0 0 0 8 8"), series("osprey-a", "m2", "4 4 4 4 4"),
            series("osprey-b", "m1", "2 2 2 2 2"), series("osprey-c", "m1", "50 50 50 50 50")],
            "promql_expr_test": [{"expr": "adapter:queue_depth", "eval_time": "1m", "exp_samples": [
                {"labels": 'adapter:queue_depth{pod="osprey-a"}', "value": 7.2},  # (0+0+0+8+8)/5 + 4
                {"labels": 'adapter:queue_depth{pod="osprey-b"}', "value": 2}]}]}]}))
    out = subprocess.run([require("promtool"), "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kserve_runtime_serves_the_inference_service(tmp_path, monkeypatch):
    objects = _kserve()
    runtime = _one(objects, "ClusterServingRuntime", "osprey")["spec"]
    isvc = _one(objects, "InferenceService", "digits-cnn")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "osprey"
    assert any(f["name"] == model["modelFormat"]["name"] for f in runtime["supportedModelFormats"])
    assert model["protocolVersion"] in runtime["protocolVersions"]
    # KServe mounts the downloaded storage read-only (its default, kept): Osprey serves from a
    # read-only store (tests/e2e/test_read_only_store.py) and keeps its files in the workdir
    assert "storage.kserve.io/readonly" not in isvc["metadata"].get("annotations", {})

    container = runtime["containers"][0]
    assert container["name"] == "kserve-container"  # the container KServe's storage initializer serves
    args = _parse(container["args"], monkeypatch)
    for k in [k for k in list(os.environ) if k.startswith(("OSPREY_", "TS_"))]:
        monkeypatch.delenv(k)
    for k, v in _env(container).items():
        monkeypatch.setenv(k, v)
    s = cli._settings_from(args)
    assert args.foreground and s.model_store == "/mnt/models" and args.models == ["all"]
    port = container["ports"][0]["containerPort"]
    assert parse_address(s.inference_address) == ("0.0.0.0", port)
    assert parse_address(s.management_address)[0] == "127.0.0.1"  # unauthenticated: inside the pod only
    assert not s.enable_grpc and set(runtime["protocolVersions"]) == {"v1", "v2"}
    assert str(parse_address(s.metrics_address)[1]) == runtime["annotations"]["prometheus.kserve.io/port"]
    assert not s.workdir.startswith("/mnt/models")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port


def test_readme_commands_match_the_manifests():
    """The commands the READMEs give act on these manifests: a sed that matches nothing would
    deploy the placeholder image without a word."""
    readme, deploy_readme = (ROOT / "README.md").read_text(), (ROOT / "deploy" / "README.md").read_text()
    runtime_text = (KSERVE / "cluster-serving-runtime.yaml").read_text()
    patterns = re.findall(r"sed 's#([^#]+)#[^#]*#' deploy/kserve/cluster-serving-runtime.yaml", readme)
    assert patterns
    for pattern in patterns:
        assert re.search(pattern, runtime_text), pattern
    isvc = _one(_kserve(), "InferenceService", "digits-cnn")
    assert f"storageUri: {isvc['spec']['predictor']['model']['storageUri']}" in readme
    assert re.search(r"aws s3 cp \S+ " + re.escape(isvc["spec"]["predictor"]["model"]["storageUri"]), readme)
    assert f"inferenceservice/{isvc['metadata']['name']}" in readme
    objects = _rendered("overlays/cpu")
    store = parse_properties(_one(objects, "ConfigMap", "osprey-config")["data"]["config.properties"])["model_store"]
    assert f":{store}/digits_cnn.mar" in deploy_readme
    server = _one(objects, "Deployment", "osprey")["spec"]["template"]
    assert "-l app.kubernetes.io/component=server" in deploy_readme
    assert server["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    container = server["spec"]["containers"][0]
    assert "POD_IP" in _env(container)
    # the key file the README's exec command reads is where the server writes it
    args, s = _settings_for_readme(container, objects)
    assert f"--key-file {Path(s.workdir) / s.key_file}" in deploy_readme
    # the README's sed replaces each placeholder key of the Secret
    secret_text = (K8S / "base" / "secret.yaml").read_text()
    loop = re.search(r'for k in ([\w ]+); do\n\s+sed -i "s#([^#]+)#[^#]*#" (\S+)', deploy_readme)
    assert loop and loop.group(3) == "deploy/kubernetes/base/secret.yaml"
    for k in loop.group(1).split():
        assert f": {loop.group(2).replace('$k', k)}\n" in secret_text, k
    assert set(_secrets()["osprey-keys"]) == {f"{k}-key" for k in loop.group(1).split()}


def _settings_for_readme(container: dict, objects: list[dict]):
    """(args, Settings) of a server container with the ConfigMap's config.properties, without pytest's fixtures."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        return _settings(container, objects, Path(folder), mp)
