"""The API description (``OPTIONS /`` on each port, ``GET /api-description`` on the inference
port) and schemathesis fuzzing the REST APIs from it: no 5xx, the server alive afterwards.

One module-scoped server with one tiny model; the fuzzing is bounded (a few examples per
operation, no shrinking) so the whole file stays within seconds.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import orjson
import pytest

from tests.models import mlp_archive

pytest.importorskip("openapi_spec_validator")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from openapi_spec_validator import validate  # noqa: E402

PORTS = ("inference", "management", "metrics")


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    mlp_archive(store, "tiny")
    # scaling by fuzzing never starts more than one instance
    return osprey_module(["tiny=tiny.mar"], store, env={"OSPREY_MAX_WORKERS_PER_MODEL": "1"})


def _doc(url: str) -> dict:
    r = httpx.request("OPTIONS", url + "/")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


@pytest.mark.parametrize("port", PORTS)
def test_options_answers_a_valid_openapi_document(srv, port):
    doc = _doc(getattr(srv, port))
    validate(doc)  # raises on anything that is not OpenAPI 3.0
    assert doc["openapi"].startswith("3.0") and doc["info"]["title"].startswith("Osprey")
    assert "options" in doc["paths"]["/"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["summary"], (method, path)
            assert "default" in op["responses"], (method, path)  # the error shape


@pytest.mark.parametrize("port", PORTS)
def test_api_description_path_and_other_methods_on_root(srv, port):
    base = getattr(srv, port)
    assert httpx.get(f"{base}/api-description").json() == _doc(base)
    r = httpx.get(f"{base}/")  # as in TorchServe: / answers OPTIONS only
    assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowedException"


def test_the_description_lists_what_each_port_serves(srv):
    inference, management, metrics = (_doc(getattr(srv, p))["paths"] for p in PORTS)
    assert {"/ping", "/predictions/{model}", "/predictions/{model}/{version}/{rest}", "/v1/models/{target}",
            "/v2/models/{model}/infer", "/feedback/{model}", "/monitoring/{model}", "/api-description"} <= set(inference)
    assert set(inference["/predictions/{model}"]) == {"get", "put", "post"}
    assert {"/models", "/models/{model}", "/models/{model}/{version}/set-default", "/token", "/models/{model}/traffic",
            "/retraining/jobs", "/models/{model}/retrain", "/alerts"} <= set(management)
    assert set(management["/models"]) == {"get", "post"}
    assert set(metrics) == {"/", "/api-description", "/metrics"}
    assert not set(inference) & {"/models", "/metrics"} and "/ping" not in management
    register = {p["name"]: p["schema"]["type"] for p in management["/models"]["post"]["parameters"]}
    assert register["url"] == "string" and register["batch_size"] == "integer"
    assert register["synchronous"] == "boolean" and register["max_batch_delay"] == "number"


def test_every_registered_route_is_described():
    """In process: every (method, pattern) a router holds is in its document, with a Doc."""
    from server.protocols.rest.asgi import Router
    from server.protocols.rest.inference import add_inference_routes
    from server.protocols.rest.management import add_management_routes
    from server.protocols.rest.monitoring import add_monitoring_routes
    from server.protocols.rest.openapi import add_api_description, describe
    from server.protocols.rest.retraining import add_retraining_routes
    from server.protocols.rest.triggers import add_trigger_routes
    from server.protocols.rest.v2 import add_v2_routes

    class Plane:
        registry = None

        def refusing(self) -> bool:
            return False

    inference, management = Router(max_body=1), Router(max_body=1)
    add_inference_routes(inference, Plane())
    add_v2_routes(inference, Plane(), model_store=".", enable_model_api=True, envelope="kservev2")  # + explain
    add_monitoring_routes(inference, Plane())
    add_api_description(inference, "i", "i")
    add_management_routes(management, None, enable_model_api=True, rotate_key=lambda kind, key: False)
    add_retraining_routes(management, None)
    add_trigger_routes(management, None)
    add_api_description(management, "m", "m")
    for router in (inference, management):
        router.token = "secret"  # token authorization on: the routes that check it say so
        doc = describe(router, "t", "d", "1")
        validate(doc)
        assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
        for pattern, methods, info, route in router.described:
            assert info is not None, f"{methods} {pattern} has no Doc"
            op_path = re.sub(r"\{(\w+):path\}", r"{\1}", pattern)
            for method in methods:
                op = doc["paths"][op_path][method.lower()]
                assert ("security" in op) == route.auth, (method, pattern)
                names = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
                assert names == set(re.findall(r"\{(\w+)", pattern))
    assert "security" not in describe(inference, "t", "d", "1")["paths"]["/"]["options"]
    # with token authorization on, the description still needs no token (TorchServe's order)
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    for method, path in (("OPTIONS", "/"), ("GET", "/api-description"), ("GET", "/models")):
        sent.clear()
        scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
        asyncio.run(management(scope, receive, send))
        assert sent[0]["status"] == (401 if path == "/models" else 200), (method, path)
    assert orjson.loads(sent[1]["body"])["code"] == 401


# --- fuzzing ---------------------------------------------------------------------------

# (schemathesis's own pytest integration, schema.parametrize, reads a private pytest attribute
# that pytest 9 removed: each operation is driven here with hypothesis directly)
FUZZ = settings(max_examples=10, deadline=None, phases=[Phase.explicit, Phase.generate], database=None,
                derandomize=True, suppress_health_check=list(HealthCheck))


def _with_examples(doc: dict) -> dict:
    """The description with the served model as the example of {model} and {version} (the
    explicit phase then reaches the model itself, not only 404s), except where the example
    would take the model away (unregister, unload)."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "delete" or path.endswith("/unload"):
                continue
            for param in op.get("parameters", ()):
                if param["in"] == "path" and param["name"] in ("model", "version"):
                    param["example"] = "tiny" if param["name"] == "model" else "1.0"
    return doc


@pytest.mark.parametrize("port", ["inference", "management"])
def test_fuzz_no_server_errors(srv, port):
    base = getattr(srv, port)
    api = schemathesis.openapi.from_dict(_with_examples(_doc(base)))
    api.config.update(base_url=base)
    failures, operations = [], 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1

        documented = set(operation.definition.raw.get("responses", {}))

        @given(case=operation.as_strategy())
        @FUZZ
        def fuzz(case):
            # a 5xx only where the description says this operation gives it (TorchServe's 500s
            # for a negative min_worker and the like, 503 for a failed prediction)
            response = case.call(timeout=10)
            if response.status_code >= 500 and str(response.status_code) not in documented:
                raise AssertionError(f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}")

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001  (collect every operation's failure, then report)
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert operations > 10
    assert not failures, "\n\n".join(failures)


def test_negative_min_worker_of_an_unknown_model_is_404(srv):
    """Found by the fuzzing: TorchServe looks the model up before its worker manager fails on a
    negative min_worker (500), so an unknown model or version is 404 first."""
    m = srv.management
    assert httpx.put(f"{m}/models/nosuch", params={"min_worker": -1}).status_code == 404
    assert httpx.put(f"{m}/models/tiny/9.9", params={"min_worker": -1}).status_code == 404
    assert httpx.put(f"{m}/models/tiny", params={"min_worker": -1}).status_code == 500


def test_alive_after_fuzzing(srv):
    assert srv.proc.poll() is None
    assert httpx.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}
    assert httpx.post(f"{srv.inference}/predictions/tiny", json=[float(i) for i in range(16)]).status_code == 200
