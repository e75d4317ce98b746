"""Client mistakes sent to the built-in handlers are a quick 400 naming the problem, never a 503.

Each case is a request a robustness probe of the real server answered with 503 ("Prediction
failed": a load balancer reads that as a server fault), with a 200 that said nothing (a blank
image, a null prediction), or only after a large allocation. Every bad request here must be
answered 400 with a message naming what was wrong, in well under a second, and the model
must keep answering good requests afterwards. The examples' real archives are served by the
real server; ``diabetes_mlp`` is a ``torch.export`` program that takes at most 4,096 records
per forward pass, so batches of requests holding more must run in chunks.

The other way round, a model that is broken (NaN weights after a diverged retrain) is the
server's fault: its non-finite outputs are a 503 naming them, never a 400 blamed on the
client. Small tabular archives built here (``tabular_archive``) hold such models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from server.core.archive import write_archive
from tests.builtin_models import concurrent_posts, example_store
from tests.gates import Gate, pending, wait_until

MODELS = ["cancer_mlp", "diabetes_mlp", "digits_vae", "digits_cnn", "text_transformer", "digits_autoencoder"]
JSON = {"content-type": "application/json"}
DEEP = b"[" * 10_000 + b"]" * 10_000  # deeper than any JSON parser's nesting limit


# The built-in tabular handler, except that a request {"gate": PATH} alone in its batch holds
# the instance until PATH exists (tests/gates.py): what queues meanwhile leaves as one batch.
GATED_TABULAR = """
from handlers.base import body_of
from handlers.builtin.common import parse_json
from handlers.builtin.tabular import TabularHandler


class GatedTabular(TabularHandler):
    def handle(self, data, context):
        if len(data) == 1:
            body = body_of(data[0])
            if isinstance(body, (bytes, bytearray)) and body.startswith(b'{"gate"'):
                body = parse_json(body)
            if isinstance(body, dict) and "gate" in body:
                from tests.gates import hold
                hold(body["gate"])
                return ["opened"]
        return super().handle(data, context)
"""

# The built-in tabular handler with one more output, log-probabilities, which may be -inf.
LOGPROB_TABULAR = """
import numpy as np

from handlers.builtin.tabular import TabularHandler


class LogProbTabular(TabularHandler):
    infinite_ok = frozenset({"log_probabilities"})

    def forward(self, batch):
        out = super().forward(batch)
        with np.errstate(divide="ignore"):
            out["log_probabilities"] = np.log(out["probabilities"])
        return out
"""


def tabular_archive(store: Path, name: str, weight: float, *, source: str | None = None,
                    config: dict | None = None) -> str:
    """A 3-feature, 2-class TorchScript ``Linear`` whose weights all equal ``weight`` (NaN: a
    broken model), served by the built-in ``tabular`` handler or by ``source`` (a subclass)."""
    import torch
    import yaml

    work = store.parent / f"build-{name}"
    work.mkdir(parents=True, exist_ok=True)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.weight[1].mul_(-1)
        model.bias.zero_()
    torch.jit.script(model).save(str(work / "model.pt"))
    (work / "features.json").write_text(json.dumps({"features": ["a", "b", "c"]}))
    (work / "index_to_name.json").write_text(json.dumps(["no", "yes"]))
    handler = "tabular"
    if source is not None:
        handler = str(work / "handler.py")
        Path(handler).write_text(textwrap.dedent(source))
    config_file = None
    if config:
        config_file = str(work / "model-config.yaml")
        Path(config_file).write_text(yaml.safe_dump(config))
    write_archive(model_name=name, handler=handler, serialized_file=str(work / "model.pt"),
                  extra_files=[str(work / "features.json"), str(work / "index_to_name.json")],
                  config_file=config_file, export_path=str(store), force=True)
    return f"{name}={name}.mar"


@pytest.fixture(scope="module")
def srv(osprey_module, tmp_path_factory):
    examples = example_store(*MODELS)
    store = tmp_path_factory.mktemp("handlers") / "store"
    store.mkdir()
    for m in MODELS:  # the store refuses links pointing out of it: a hard link, else a copy
        try:
            os.link(examples / f"{m}.mar", store / f"{m}.mar")
        except OSError:
            shutil.copyfile(examples / f"{m}.mar", store / f"{m}.mar")
    own = [tabular_archive(store, "nan_tabular", float("nan")),
           tabular_archive(store, "logprob_tabular", 100.0, source=LOGPROB_TABULAR),
           tabular_archive(store, "gated_tabular", 0.5, source=GATED_TABULAR,
                           config={"minWorkers": 1, "maxWorkers": 1, "batchSize": 64, "maxBatchDelay": 5})]
    proc = osprey_module([f"{m}={m}.mar" for m in MODELS] + own, store)
    proc.samples = examples / "samples"
    return proc


def batch_stats(srv, model: str) -> tuple[float, float]:
    """(batches, requests in them) the server has handed ``model``'s instances so far."""
    text = httpx.get(f"{srv.metrics}/metrics", timeout=10).text

    def value(suffix: str) -> float:
        m = re.search(rf'^osprey_batch_size_{suffix}\{{[^}}]*model="{model}"[^}}]*\}} ([0-9.e+]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0
    return value("count"), value("sum")


def post(srv, model: str, body, headers: dict | None = None, timeout: float = 30) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    if isinstance(body, (bytes, str)):
        r = httpx.post(f"{srv.inference}/predictions/{model}", content=body, headers=headers or JSON, timeout=timeout)
    else:
        r = httpx.post(f"{srv.inference}/predictions/{model}", json=body, timeout=timeout)
    return r, time.perf_counter() - t0


def assert_400(r: httpx.Response, *needles: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["message"]
    for needle in needles:
        assert needle in message, message
    return message


def oip(srv, model: str, inputs: list[dict]) -> httpx.Response:
    return httpx.post(f"{srv.inference}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=30)


def oip_error(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    return r.json()["error"]


# --- 1. generator: the sample limit is checked before anything is drawn -----------------------
@pytest.mark.parametrize("n", [50_000_000, 10**9])
def test_generator_too_many_samples_is_a_quick_400(srv, n):
    r, took = post(srv, "digits_vae", {"num_samples": n, "format": "json"})
    assert_400(r, "at most 64 samples", str(n))
    assert took < 1.5, f"{took:.2f} s: the latents were drawn before the check"
    good, _ = post(srv, "digits_vae", {"seed": 3, "class": 5})
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"


@pytest.mark.parametrize("value, needle", [
    ("NaN", "not finite"), ("Infinity", "not finite"), ("1e39", "not finite"),  # 1e39 is no float32
    ("1e30", "within +-1000"),
])
def test_generator_latent_not_finite_or_huge_is_400_naming_it(srv, value, needle):
    body = ('{"latent": [%s, 0, 0, 0, 0, 0, 0, 0], "class": 1}' % value).encode()
    r, _ = post(srv, "digits_vae", body)
    assert_400(r, "latent", needle)
    ok, _ = post(srv, "digits_vae", {"latent": [0.5] * 8, "class": 1})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_generator_oip_latent_checked_too(srv):
    r = oip(srv, "digits_vae", [{"name": "latent", "datatype": "FP32", "shape": [1, 8], "data": [1e30] * 8},
                                {"name": "class", "datatype": "INT64", "shape": [1], "data": [3]}])
    assert "latent" in oip_error(r) and "1000" in oip_error(r)
    r = oip(srv, "digits_vae", [{"name": "latent", "datatype": "BYTES", "shape": [1], "data": ["abc"]},
                                {"name": "class", "datatype": "INT64", "shape": [1], "data": [3]}])
    assert "FP32" in oip_error(r) and "BYTES" in oip_error(r)


# --- 2. JSON nested too deeply to parse ---------------------------------------------------------
@pytest.mark.parametrize("model", ["cancer_mlp", "diabetes_mlp", "digits_vae", "digits_autoencoder"])
def test_deeply_nested_json_is_400_over_rest(srv, model):
    r, took = post(srv, model, DEEP)
    assert_400(r, "not valid JSON", "nested too deeply")
    assert took < 2.0


def test_deeply_nested_json_is_400_over_torchserve_grpc(srv):
    from server.protocols.grpc.generated import inference_pb2 as pb
    from server.protocols.grpc.generated import inference_pb2_grpc as pbg

    with grpc.insecure_channel(srv.grpc) as channel:
        stub = pbg.InferenceAPIsServiceStub(channel)
        for model in ("cancer_mlp", "diabetes_mlp", "digits_vae"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predictions(pb.PredictionsRequest(model_name=model, input={"data": DEEP}), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (model, info.value.details())
            assert "nested too deeply" in info.value.details()
        record = (srv.samples / "cancer_record.json").read_bytes()
        ok = stub.Predictions(pb.PredictionsRequest(model_name="cancer_mlp", input={"data": record}), timeout=30)
        assert set(json.loads(ok.prediction)) == {"malignant", "benign"}


@pytest.mark.parametrize("model, path, body", [
    ("text_transformer", "/predictions/text_transformer", b'{"text": '),
    ("text_transformer", "/v1/models/text_transformer:predict", b'{"instances":'),
    ("digits_cnn", "/predictions/digits_cnn", b'{"data": "aGVsbG8='),
    ("cancer_mlp", "/predictions/cancer_mlp", b'{"mean radius": 1,}'),
    ("text_transformer", "/predictions/text_transformer", b'{"text": "\\ud800 hello"}'),  # a lone surrogate
])
def test_a_json_body_that_does_not_parse_is_400_not_read_as_text(srv, model, path, body):
    """Sent as application/json, a body cut short was classified as the text '{"text": ' (200)."""
    r = httpx.post(srv.inference + path, content=body, headers=JSON, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json().get("message") or r.json().get("error")
    assert "sent as application/json but is not valid JSON" in message, message


def test_nested_json_objects_are_400_for_text_and_image_handlers(srv):
    nested: dict = {"text": "hello"}
    for _ in range(900):  # within orjson's depth limit, so it reaches the handler as objects
        nested = {"text": nested}
    r, _ = post(srv, "text_transformer", json.dumps(nested))
    assert_400(r, "'text' must hold text")
    nested = {"data": "aGVsbG8="}
    for _ in range(900):
        nested = {"data": nested}
    r, _ = post(srv, "digits_cnn", json.dumps(nested))
    assert_400(r, "'data' must hold base64 text")


# --- 3. a model with a batch limit: per request a 400, per batch chunks ------------------------
def records(srv, n: int) -> list[dict]:
    pool = json.loads((srv.samples / "diabetes_records.json").read_text())
    return [pool[i % len(pool)] for i in range(n)]


def test_tabular_more_records_than_the_model_takes_is_400_naming_the_limit(srv):
    r, _ = post(srv, "diabetes_mlp", records(srv, 4097))
    assert_400(r, "at most 4096 records per request", "4097")
    full, _ = post(srv, "diabetes_mlp", records(srv, 4096))
    assert full.status_code == 200 and len(full.json()) == 4096
    r = oip(srv, "diabetes_mlp", [{"name": "input", "datatype": "FP32", "shape": [4097, 10],
                                   "data": [1.0] * 40970}])
    assert "at most 4096 records" in oip_error(r)


def test_tabular_error_in_a_request_of_many_records_names_the_record(srv):
    recs = records(srv, 3000)
    recs[1234] = {**recs[1234], "bmi": "x"}
    assert_400(post(srv, "diabetes_mlp", recs)[0], "record 1234: feature 'bmi' must be a number, got 'x'")
    recs = records(srv, 50)
    recs[7] = {k: v for k, v in recs[7].items() if k != "age"}
    assert_400(post(srv, "diabetes_mlp", recs)[0], "record 7: missing feature 'age'")
    data = [0.01] * 40
    data[3 * 10 + 2] = 1e39  # beyond float32: record 3
    assert "record 3: feature" in oip_error(oip(srv, "diabetes_mlp", [
        {"name": "input", "datatype": "FP64", "shape": [4, 10], "data": data}]))
    one = records(srv, 1)[0]
    assert_400(post(srv, "diabetes_mlp", {**one, "bmi": "x"})[0], "feature 'bmi' must be a number")  # alone: no index


@pytest.mark.parametrize("body, message", [
    ({}, "missing feature 'age' (and 9 more)"),
    (dict(age="old", sex=1, bmi=0, bp=0, s1=0, s2=0, s3=0, s4=0, s5=0, s6=0), "feature 'age' must be a number, got 'old'"),
])
def test_tabular_error_message_is_the_message_alone(srv, body, message):
    """Not TorchServe's PredictionException text ("... : 400"), which a re-wrap used to add."""
    r, _ = post(srv, "diabetes_mlp", body)
    assert r.status_code == 400 and r.json()["message"] == message, r.text


def test_tabular_batches_holding_more_records_than_the_limit_are_served(srv):
    """Requests of 2,100 records each, sent at once: any two batched together exceed the
    exported program's 4,096; every one is answered, as it is alone."""
    bodies = [records(srv, 2100)[k:] + records(srv, 2100)[:k] for k in range(8)]
    single = httpx.post(f"{srv.inference}/predictions/diabetes_mlp", json=bodies[0], timeout=60).json()
    before = srv.log()
    for _ in range(5):  # until the server has batched some of them (the first runs alone)
        count0, sum0 = batch_stats(srv, "diabetes_mlp")
        answers = concurrent_posts(f"{srv.inference}/predictions/diabetes_mlp", bodies, workers=8)
        assert [r.status_code for r in answers] == [200] * len(bodies), [r.text[:200] for r in answers]
        count1, sum1 = batch_stats(srv, "diabetes_mlp")
        assert sum1 - sum0 == len(bodies)
        if count1 - count0 < len(bodies):  # fewer batches than requests: some ran together
            break
    assert count1 - count0 < len(bodies), "the requests of this burst were never batched"
    for k, r in enumerate(answers):
        got = [p["progression"] for p in r.json()]
        want = [p["progression"] for p in single[k:] + single[:k]]
        np.testing.assert_allclose(got, want, atol=1e-3)
    # the batch ran in chunks: no batch failed the model's guard (and was retried one by one)
    assert "Guard failed" not in srv.log()[len(before):]


# --- 4. image classifier: pixel tensors of the wrong shape or out of range --------------------
@pytest.mark.parametrize("shape", [[1, 3, 5, 5], [64], [2, 1, 8, 9]])
def test_image_classifier_pixel_tensor_of_wrong_shape_is_400_naming_the_shape(srv, shape):
    r = oip(srv, "digits_cnn", [{"name": "input", "datatype": "FP32", "shape": shape,
                                 "data": [0.5] * int(np.prod(shape))}])
    message = oip_error(r)
    assert "[N, 1, 8, 8]" in message and str(shape) in message


@pytest.mark.parametrize("value", [1e38, -2e6])
def test_image_classifier_pixels_out_of_range_are_400(srv, value):
    """Preprocessed pixels lie within a few units of 0; far beyond (handler.pixel_limit, 1e6)
    the model would overflow, so they are refused before they reach it."""
    r = oip(srv, "digits_cnn", [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [value] * 64}])
    message = oip_error(r)
    assert "'input'" in message and "beyond +-1e+06" in message
    good = oip(srv, "digits_cnn", [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}])
    assert good.status_code == 200, good.text
    probs = good.json()["outputs"][0]["data"]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-4


def test_image_classifier_nan_pixels_over_grpc_are_invalid_argument(srv):
    from tests.oip_stubs import pb
    from tests.oip_stubs import pb_grpc as pbg

    pixels = np.full((1, 1, 8, 8), 0.5, np.float32)
    pixels[0, 0, 3, 3] = np.nan
    req = pb.ModelInferRequest(model_name="digits_cnn")
    req.inputs.append(pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8]))
    req.raw_input_contents.append(pixels.tobytes())
    with grpc.insecure_channel(srv.grpc) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pbg.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in info.value.details() and "not finite" in info.value.details()


# --- 5. tabular: a BYTES tensor ---------------------------------------------------------------
def test_tabular_bytes_tensor_is_400_naming_the_datatype(srv):
    r = oip(srv, "cancer_mlp", [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}])
    message = oip_error(r)
    assert "'input' must be FP32" in message and "BYTES" in message
    record = json.loads((srv.samples / "cancer_record.json").read_text())
    good = oip(srv, "cancer_mlp", [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": list(record.values())}])
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("model, inputs, needles", [
    ("text_transformer", [{"name": "foo", "datatype": "BYTES", "shape": [1], "data": ["rain"]}],
     ("unknown input(s) 'foo'", "this model takes 'text'")),
    ("diabetes_mlp", [{"name": "foo", "datatype": "FP32", "shape": [1, 10], "data": [0.01] * 10}],
     ("unknown input(s) 'foo'", "'input'")),
    ("digits_cnn", [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64},
                    {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
     ("inputs 'image' and 'input' are alternatives", "send one")),
    ("digits_vae", [{"name": "latent", "datatype": "FP32", "shape": [1, 8], "data": [0.1] * 8},
                    {"name": "class", "datatype": "INT64", "shape": [1], "data": [1]},
                    {"name": "noise", "datatype": "FP32", "shape": [1], "data": [1.0]}],
     ("unknown input(s) 'noise'", "'latent'", "'class'")),
], ids=["text-unknown-name", "tabular-unknown-name", "image-both-alternatives", "generator-extra"])
def test_an_input_the_model_does_not_take_is_400_naming_it(srv, model, inputs, needles):
    """Nothing a request sends is silently ignored: an input under a name the model's metadata
    does not give, or both of two alternatives, is refused by name (as Triton does)."""
    message = oip_error(oip(srv, model, inputs))
    for needle in needles:
        assert needle in message, message
    takes = [m["name"] for m in httpx.get(f"{srv.inference}/v2/models/{model}", timeout=10).json()["inputs"]]
    if model == "digits_cnn":  # one of the two alternatives
        good = inputs[:1]
    elif model == "digits_vae":  # latent and class, without the unknown one
        good = inputs[:2]
    else:  # the same tensor under the name the metadata gives
        good = [{**inputs[0], "name": takes[0]}]
    r = oip(srv, model, good)
    assert r.status_code == 200, r.text


# --- 6. values no float32 holds; empty text ---------------------------------------------------
def test_tabular_feature_beyond_float32_is_400_naming_it(srv):
    record = records(srv, 1)[0]
    r, _ = post(srv, "diabetes_mlp", json.dumps({**record, "bmi": 1e308}))
    assert_400(r, "feature 'bmi'", "float32")
    r = oip(srv, "diabetes_mlp", [{"name": "input", "datatype": "FP64", "shape": [1, 10],
                                   "data": [1e300] + list(record.values())[1:]}])
    assert "feature 'age'" in oip_error(r)
    ok, _ = post(srv, "diabetes_mlp", record)
    assert ok.status_code == 200 and isinstance(ok.json()["progression"], float)


@pytest.mark.parametrize("body", [b"", b"   ", b'""', b'{"text": ""}', b'["fine", " "]'])
def test_text_classifier_empty_text_is_400(srv, body):
    r, _ = post(srv, "text_transformer", body, headers=JSON if body.strip() else {"content-type": "text/plain"})
    assert_400(r, "empty")
    ok, _ = post(srv, "text_transformer", {"text": "the match ended with a late goal"})
    assert ok.status_code == 200 and len(ok.json()) == 4


def test_bad_request_in_a_batch_does_not_fail_its_batch_mates(srv):
    """32 requests, every fourth one bad, queue behind a gated request and then leave as ONE
    batch (one handler call, by the batch-size metric): the bad ones get their 400, the good
    ones their answers."""
    url = f"{srv.inference}/predictions/gated_tabular"
    gate = Gate(srv.workdir)
    bodies = [{"a": i, "b": 1, "c": 2} if i % 4 else {"a": i, "b": "tall", "c": 2} for i in range(32)]
    count0, sum0 = batch_stats(srv, "gated_tabular")
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(33) as pool:
        gated = pool.submit(client.post, url, json={"gate": gate.value})
        gate.wait_entered()
        futures = [pool.submit(client.post, url, json=body) for body in bodies]
        wait_until(lambda: pending(srv, "gated_tabular") == len(bodies), what="all 32 requests to queue")
        gate.open()
        assert gated.result().status_code == 200
        answers = [f.result() for f in futures]
    count1, sum1 = batch_stats(srv, "gated_tabular")
    assert (count1 - count0, sum1 - sum0) == (2, 33), "the 32 requests did not share one handler call"
    for i, r in enumerate(answers):
        if i % 4:
            assert r.status_code == 200, r.text
            assert set(r.json()) == {"no", "yes"} and abs(sum(r.json().values()) - 1) < 1e-5
        else:
            assert_400(r, "feature 'b' must be a number", "'tall'")


# --- 7. a broken model is the server's fault: 503 naming the non-finite output ------------------
def test_model_with_nan_weights_is_503_naming_non_finite_output(srv):
    for body in ({"a": 1, "b": 2, "c": 3}, [{"a": 1, "b": 2, "c": 3}] * 3):
        r, _ = post(srv, "nan_tabular", body)
        assert r.status_code == 503, (r.status_code, r.text)
        assert "model produced non-finite output for 'probabilities'" in r.json()["message"]
    r = oip(srv, "nan_tabular", [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": [1.0] * 6}])
    assert r.status_code == 503, (r.status_code, r.text)
    assert "non-finite output for 'probabilities'" in r.json()["error"]
    assert "produced non-finite output for 'probabilities'" in srv.log()  # the operator sees it too


def test_minus_infinity_is_a_legitimate_log_probability(srv):
    """An output the handler declares may be infinite (``infinite_ok``) answers -inf: a certain
    class has log-probability 0, the other -inf (softmax of +-600 underflows to 0)."""
    r = oip(srv, "logprob_tabular", [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}])
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert outputs["probabilities"] == [1.0, 0.0]
    assert outputs["log_probabilities"][0] == 0.0 and outputs["log_probabilities"][1] in (None, float("-inf"))
