"""Access log: one JSON line per request, off / on / sampled; and request metrics off."""

from __future__ import annotations

import io
import json
import random
import time
import urllib.request

import httpx
import pytest

from monitoring.access_log import AccessLog, parse_access_log
from server.core.errors import ErrorKind, OspreyError
from server.settings import load_settings
from server.core.types import InferenceRequest, InferenceResponse, Ticket

from tests.models import RECORDING_HANDLER, handler_archive


def test_setting_values():
    assert parse_access_log("off") == 0.0
    assert parse_access_log("on") == 1.0
    assert parse_access_log("sample:0.25") == 0.25
    for bad in ("sample:2", "sample:0", "sample:x", "sometimes"):
        with pytest.raises(ValueError, match="access_log"):
            parse_access_log(bad)
    with pytest.raises(ValueError, match="access_log"):
        load_settings(env={"OSPREY_ACCESS_LOG": "loud"})
    s = load_settings(env={"OSPREY_METRIC_BUCKETS": "0.01, 0.1,1", "OSPREY_LATENCY_OBJECTIVES": "0.2",
                           "OSPREY_REQUEST_METRICS": "false"})
    assert s.metric_buckets == (0.01, 0.1, 1.0) and s.latency_objectives == (0.2,) and s.request_metrics is False
    with pytest.raises(ValueError, match="metric_buckets"):
        load_settings(env={"OSPREY_METRIC_BUCKETS": "0.1,soon"})
    with pytest.raises(ValueError, match="latency_objectives"):
        load_settings(env={"OSPREY_LATENCY_OBJECTIVES": "-1"})


def _request(i: int) -> Ticket:
    r = Ticket(InferenceRequest("m", None, f"id-{i}", protocol="rest"))
    now = time.monotonic()
    r.timings.received, r.timings.dispatched, r.timings.started, r.timings.finished = now - 0.5, now - 0.4, now - 0.3, now - 0.1
    return r


class _MV:
    version = "2.0"


def test_line_fields_and_sampling():
    out = io.BytesIO()
    log = AccessLog(1.0, out)
    log(_MV(), _request(1), InferenceResponse(status=200))
    log(None, _request(2), OspreyError(ErrorKind.NOT_FOUND, "no such model"))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["request_id"] == "id-1" and lines[0]["model"] == "m" and lines[0]["version"] == "2.0"
    assert lines[0]["protocol"] == "rest" and lines[0]["status"] == 200 and "error" not in lines[0]
    assert lines[0]["queue_ms"] == pytest.approx(100, abs=1) and lines[0]["inference_ms"] == pytest.approx(200, abs=1)
    assert lines[0]["total_ms"] == pytest.approx(500, abs=20)
    assert lines[0]["ts"].endswith("Z")
    assert lines[1]["status"] == 404 and lines[1]["error"] == "not_found" and lines[1]["version"] == ""

    random.seed(5)
    sampled = io.BytesIO()
    log = AccessLog(0.1, sampled)
    for i in range(2000):
        log(_MV(), _request(i), InferenceResponse())
    n = len(sampled.getvalue().splitlines())
    assert 120 < n < 280  # about 200 of 2000


def test_server_writes_one_line_per_request_and_request_metrics_off(osprey, store, tmp_path):
    handler_archive(store, "rec", RECORDING_HANDLER)
    access = tmp_path / "access.log"
    server = osprey(models=["rec=rec.mar"], store=store, extra_args=["--no-grpc"],
                    config={"access_log": "on", "access_log_file": str(access), "request_metrics": "false"})
    ids = []
    for i in range(5):
        r = httpx.post(f"{server.inference}/predictions/rec", json={"id": i})
        assert r.status_code == 200
        ids.append(r.json()["request_id"])
    assert httpx.post(f"{server.inference}/predictions/rec/9.9", json={}).status_code == 404
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline and len(lines) < 6:
        time.sleep(0.2)  # flushed about once a second
        lines = [json.loads(x) for x in access.read_text().splitlines()] if access.exists() else []
    assert len(lines) == 6
    assert [x["request_id"] for x in lines[:5]] == ids
    assert all(x["model"] == "rec" and x["version"] == "1.0" and x["status"] == 200 for x in lines[:5])
    assert all(x["total_ms"] >= x["inference_ms"] >= 0 and x["queue_ms"] >= 0 for x in lines[:5])
    assert lines[5]["status"] == 404 and lines[5]["version"] == "9.9"
    # request_metrics=false: no per-request series, the scrape-time gauges stay
    with urllib.request.urlopen(f"{server.metrics}/metrics") as r:
        text = r.read().decode()
    assert "\nosprey_requests_total{" not in text and "\nosprey_batch_size_bucket{" not in text
    assert "\nts_inference_requests_total{" not in text
    assert 'osprey_instances_ready{model="rec",version="1.0"} 1.0' in text
