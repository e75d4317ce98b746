"""Client mistakes sent to the built-in handlers are a quick 400 naming the problem, never a 503.

Each case is a request a robustness probe of the real server answered with 503 ("Prediction
failed": a load balancer reads that as a server fault), with a 200 that said nothing (a blank
image, a null prediction), or only after a large allocation. Every bad request here must be
answered 400 with a message naming what was wrong, in well under a second, and the model
must keep answering good requests afterwards. The examples' real archives are served by the
real server; ``diabetes_mlp`` is a ``torch.export`` program that takes at most 4,096 records
per forward pass, so batches of requests holding more must run in chunks.
"""

from __future__ import annotations

import json
import time

import grpc
import httpx
import numpy as np
import pytest

from tests.builtin_models import concurrent_posts, example_store, mean_batch_size

MODELS = ["cancer_mlp", "diabetes_mlp", "digits_vae", "digits_cnn", "text_transformer", "digits_autoencoder"]
JSON = {"content-type": "application/json"}
DEEP = b"[" * 10_000 + b"]" * 10_000  # deeper than any JSON parser's nesting limit


@pytest.fixture(scope="module")
def srv(osprey_module):
    store = example_store(*MODELS)
    proc = osprey_module([f"{m}={m}.mar" for m in MODELS], store)
    proc.samples = store / "samples"
    return proc


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
    from server.grpc.generated import inference_pb2 as pb
    from server.grpc.generated import inference_pb2_grpc as pbg

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


def test_tabular_batches_holding_more_records_than_the_limit_are_served(srv):
    """Requests of 2,100 records each, sent at once: any two batched together exceed the
    exported program's 4,096; every one is answered, as it is alone."""
    bodies = [records(srv, 2100)[k:] + records(srv, 2100)[:k] for k in range(8)]
    single = httpx.post(f"{srv.inference}/predictions/diabetes_mlp", json=bodies[0], timeout=60).json()
    before = srv.log()
    for _ in range(5):  # until the server has batched some of them (the first runs alone)
        answers = concurrent_posts(f"{srv.inference}/predictions/diabetes_mlp", bodies, workers=8)
        assert [r.status_code for r in answers] == [200] * len(bodies), [r.text[:200] for r in answers]
        if mean_batch_size(srv.metrics, "diabetes_mlp") > 1.0:
            break
    assert mean_batch_size(srv.metrics, "diabetes_mlp") > 1.0, "the requests were never batched"
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


def test_image_classifier_pixels_out_of_range_are_400(srv):
    r = oip(srv, "digits_cnn", [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [1e38] * 64}])
    assert "not finite" in oip_error(r)
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
    record = records(srv, 1)[0]
    bodies = [record if i % 4 else {**record, "bmi": "tall"} for i in range(32)]
    answers = concurrent_posts(f"{srv.inference}/predictions/diabetes_mlp", bodies, workers=32)
    for i, r in enumerate(answers):
        if i % 4:
            assert r.status_code == 200, r.text
        else:
            assert_400(r, "feature 'bmi' must be a number")
