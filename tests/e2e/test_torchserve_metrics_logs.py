"""TorchServe's metrics and log files, compared with what real TorchServe 0.12 wrote.

tests/fixtures/torchserve_metrics holds a recording of TorchServe serving the same archive
(tests/models.py METRICS_HANDLER) with the same metrics_config (custom.yaml) and the same four
requests: two good, one for an unknown model (404), one the handler fails (503). Osprey must
expose the same metric families (names, types, HELP texts, label names, the request counts) on
/metrics and write log lines of the same shapes (times, hosts, ids, ports and durations aside).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.models import METRICS_HANDLER, handler_archive

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "torchserve_metrics"
CUSTOM = FIXTURE / "custom.yaml"
_SAMPLE = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*?),?\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _families(text: str) -> dict[str, dict]:
    """name -> {"type", "help", "samples": [(sample name, {labels}, value)]} (label order kept)."""
    fams: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            current = fams.setdefault(name, {"samples": []})
            current["help"] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            fams.setdefault(name, {"samples": []})["type"] = kind
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            labels = dict(_LABEL.findall(m.group(2) or ""))
            base = re.sub(r"_(bucket|count|sum)$", "", m.group(1))
            fam = fams.get(m.group(1)) or fams.get(base)
            fam["samples"].append((m.group(1), labels, float(m.group(3))))
    return fams


def _requests(server) -> list[int]:
    codes = [httpx.post(f"{server.inference}/predictions/tsm", json={"x": 1}).status_code,
             httpx.post(f"{server.inference}/predictions/tsm", json={"x": 2}).status_code,
             httpx.post(f"{server.inference}/predictions/nosuchmodel", json={"x": 3}).status_code,
             httpx.post(f"{server.inference}/predictions/tsm", json={"fail": True}).status_code]
    assert codes == [200, 200, 404, 503]
    return codes


def _start(osprey, store, tmp_path, **config):
    handler_archive(store, "tsm", METRICS_HANDLER)
    return osprey(models=["tsm=tsm.mar"], store=store, extra_args=["--no-grpc"],
                  config={"metrics_config": str(CUSTOM), "log_location": str(tmp_path / "logs"),
                          "metrics_location": str(tmp_path / "logs"), **config})


# TorchServe counts the warm-up request its recording script polled with as one of the two good ones
_COUNTS = {"Requests2XX": 2.0, "Requests4XX": 1.0, "Requests5XX": 1.0, "ts_inference_requests_total": 3.0,
           "InferenceCount": 3.0, "PayloadSize": 0.25, "PreprocessTime": 1.5}


def test_metrics_port_serves_torchserve_families_as_recorded(osprey, store, tmp_path):
    server = _start(osprey, store, tmp_path)
    _requests(server)
    ours = _families(httpx.get(f"{server.metrics}/metrics").text)
    theirs = _families((FIXTURE / "prometheus" / "metrics.txt").read_text())
    for name, fam in theirs.items():
        assert name in ours, f"TorchServe exports {name}, Osprey does not"
        assert ours[name]["type"] == fam["type"], name
        assert ours[name]["help"] == fam["help"], name
        their_labels = {tuple(labels) for _, labels, _ in fam["samples"]}
        our_labels = {tuple(labels) for _, labels, _ in ours[name]["samples"]}
        assert their_labels <= our_labels, f"{name}: label names {their_labels} (TorchServe) vs {our_labels}"
        for sample, labels, value in fam["samples"]:
            if sample in _COUNTS or name == "Confidence" and sample.endswith("_count"):
                mine = [v for s, lab, v in ours[name]["samples"] if s == sample
                        and {k: v for k, v in lab.items() if k != "Hostname"} == {k: v for k, v in labels.items() if k != "Hostname"}]
                assert mine == [value], f"{sample}{labels}: TorchServe {value}, Osprey {mine}"
    # metrics_config leaves these out, and the handler's undeclared metric is not exported
    for absent in ("MemoryAvailable", "DiskAvailable", "Undeclared"):
        assert absent not in ours
    assert ours["Requests2XX"]["samples"][0][1]["Level"] == "Host"
    assert ours["WorkerLoadTime"]["samples"][0][1]["WorkerName"] == "W-9000-tsm_1.0"
    assert 0 <= ours["MemoryUtilization"]["samples"][0][2] <= 100
    # Osprey's own metrics are still there
    assert "osprey_requests_total" in ours
    # the scrape itself is an answer too (TorchServe counts every port's answers)
    again = _families(httpx.get(f"{server.metrics}/metrics").text)
    assert again["Requests2XX"]["samples"][0][2] == 3.0


def _shape(line: str) -> str:
    """A log line with what differs between runs taken out."""
    line = re.sub(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}", "T", line)
    line = re.sub(r"(\.\w+:)[-\d.E]+\|", r"\1V|", line)  # metric values
    line = re.sub(r"hostname:[^,|]+", "hostname:H", line)
    line = re.sub(r"requestID:[\w,-]*,timestamp:\d+", "requestID:R,timestamp:E", line)
    line = re.sub(r"timestamp:\d+", "timestamp:E", line)
    line = re.sub(r"W-\d+-", "W-N-", line)
    line = re.sub(r"/127\.0\.0\.1:\d+ ", "/127.0.0.1:P ", line)
    line = re.sub(r'(HTTP/1\.1" \d+) \d+$', r"\1 MS", line)
    return line.rstrip("\n")


def _wait_for(path: Path, needles: list[str], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if all(n in text for n in needles):
            return text
        time.sleep(0.1)  # the files are written about twice a second
    raise AssertionError(f"{path.name} lacks {[n for n in needles if n not in text]}:\n{text}")


def test_log_mode_and_log_files_write_torchserve_lines(osprey, store, tmp_path):
    server = _start(osprey, store, tmp_path, metrics_mode="log", metric_time_interval="1")
    _requests(server)
    logs = tmp_path / "logs"
    recorded = FIXTURE / "log"

    def compare(name: str, keep=lambda line: True, needles=()) -> str:
        theirs = {_shape(x) for x in (recorded / name).read_text().splitlines() if keep(x)}
        text = _wait_for(logs / name, list(needles))
        ours = {_shape(x) for x in text.splitlines()}
        missing = theirs - ours
        assert not missing, f"{name}: TorchServe wrote lines of these shapes, Osprey not:\n" + "\n".join(
            sorted(missing)) + "\nOsprey wrote:\n" + "\n".join(sorted(ours))
        return text

    ts_metrics = compare("ts_metrics.log", needles=["Requests5XX", "CPUUtilization", "WorkerLoadTime",
                                                     "WorkerThreadTime"])
    assert "MemoryAvailable" not in ts_metrics  # custom.yaml leaves it out
    model_metrics = compare("model_metrics.log", needles=["PredictionTime", "Confidence"])
    assert "Undeclared" not in model_metrics
    compare("access_log.log", keep=lambda x: "/metrics" not in x, needles=["503"])
    compare("model_log.log", keep=lambda x: "tsm handler" in x, needles=["tsm handler logged"])
    ts_log = _wait_for(logs / "ts_log.log", ["MODEL_LOG"])
    for line in ts_log.splitlines():
        if re.match(r"^\d{4}-", line):
            assert re.match(r"^\S+ \[(INFO |WARN |DEBUG|ERROR|FATAL)\] \S+ \S+ - ", line), line


# prints and logs when it loads and for each batch (tests of model_log.log for both instance kinds)
_TALKING_HANDLER = '''
import logging
import sys

log = logging.getLogger("talking_handler")


def handle(data, context):
    if data is None:
        print(context.model_name, "loaded")
        return None
    print(context.model_name, "printed", len(data))
    print(context.model_name, "to stderr", file=sys.stderr)
    log.warning("%s logged %d", context.model_name, len(data))
    return [1 for _ in data]
'''


def test_process_instances_print_and_log_into_model_log_as_thread_instances_do(osprey, store, tmp_path):
    handler_archive(store, "talkt", _TALKING_HANDLER, config={"isolation": "thread"})
    handler_archive(store, "talkp", _TALKING_HANDLER, config={"isolation": "process"})
    server = osprey(models=["talkt=talkt.mar", "talkp=talkp.mar"], store=store, extra_args=["--no-grpc"],
                    config={"log_location": str(tmp_path / "logs")})
    for model in ("talkt", "talkp"):
        assert httpx.post(f"{server.inference}/predictions/{model}", content=b"x").status_code == 200
    needles = [f"{m} {what}" for m in ("talkt", "talkp") for what in ("loaded", "printed 1", "to stderr", "logged 1")]
    text = _wait_for(tmp_path / "logs" / "model_log.log", needles)
    lines = {m: sorted(_shape(x).replace(m, "M") for x in text.splitlines() if f" {m} " in x or f"- {m} " in x)
             for m in ("talkt", "talkp")}
    assert lines["talkp"] == lines["talkt"]  # the same lines, in TorchServe's shape, from either kind
    assert lines["talkp"] == sorted([
        "T [INFO ] W-N-M_1.0-stdout MODEL_LOG - M loaded", "T [INFO ] W-N-M_1.0-stdout MODEL_LOG - M printed 1",
        "T [WARN ] W-N-M_1.0-stderr MODEL_LOG - M to stderr", "T [WARN ] W-N-M_1.0-stdout MODEL_LOG - M logged 1"])
    assert "talkp printed" not in server.log()  # not also on the server's own output


_RAISING_HANDLER = '''
def handle(data, context):
    if data is None:
        return None
    raise ValueError("boom from the handler")
'''


def test_a_handler_that_raises_leaves_its_traceback_in_model_log(osprey, store, tmp_path):
    """As TorchServe's backend does: "Invoking custom service failed." and the traceback, in
    model_log.log, for thread and process instances alike (it was one line, in the server log)."""
    handler_archive(store, "raiset", _RAISING_HANDLER, config={"isolation": "thread"})
    handler_archive(store, "raisep", _RAISING_HANDLER, config={"isolation": "process"})
    server = osprey(models=["raiset=raiset.mar", "raisep=raisep.mar"], store=store, extra_args=["--no-grpc"],
                    config={"log_location": str(tmp_path / "logs")})
    for model in ("raiset", "raisep"):
        r = httpx.post(f"{server.inference}/predictions/{model}", content=b"x")
        assert r.status_code == 503, r.text  # TorchServe's "Prediction failed"
    text = _wait_for(tmp_path / "logs" / "model_log.log",
                     [f"model {m}: ValueError: boom from the handler" for m in ("raiset", "raisep")])
    for m in ("raiset", "raisep"):
        block = text[text.index(f"model {m}: ValueError"):]
        assert "Invoking custom service failed." in text and "Traceback (most recent call last)" in block[:2000]
        assert 'raise ValueError("boom from the handler")' in block[:2000], block[:2000]


def _grpc_line(line: str) -> str:
    """A gRPC access log line with its time, port and duration taken out."""
    line = re.sub(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3} -|<time>) ", "T - ", line)
    line = re.sub(r"/127\.0\.0\.1:\d+ ", "/127.0.0.1:P ", line)
    return re.sub(r'(HTTP/2\.0" \d+) \d+$', r"\1 MS", line)


def test_grpc_calls_are_in_the_access_log_as_torchserve_writes_them(osprey, store, tmp_path):
    import json

    import grpc

    from server.protocols.grpc.generated import inference_pb2 as pb
    from server.protocols.grpc.generated import inference_pb2_grpc as pb_grpc
    from server.protocols.grpc.generated import management_pb2 as mpb
    from server.protocols.grpc.generated import management_pb2_grpc as mpb_grpc

    handler_archive(store, "echo", "def handle(data, context):\n    return None if data is None else [1 for _ in data]\n")
    server = osprey(models=["echo=echo.mar"], store=store, config={"log_location": str(tmp_path / "logs")})
    with grpc.insecure_channel(server.grpc) as ch:
        stub = pb_grpc.InferenceAPIsServiceStub(ch)
        stub.Predictions(pb.PredictionsRequest(model_name="echo", input={"data": b"x"}), timeout=30)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Predictions(pb.PredictionsRequest(model_name="zz", input={"data": b"x"}), timeout=30)
        list(stub.StreamPredictions(pb.PredictionsRequest(model_name="echo", input={"data": b"x"}), timeout=30))
    with grpc.insecure_channel(server.grpc_management) as ch:
        mpb_grpc.ManagementAPIsServiceStub(ch).ListModels(mpb.ListModelsRequest(), timeout=30)
    service = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
    text = _wait_for(tmp_path / "logs" / "access_log.log", [f"{service}/StreamPredictions", "ListModels"])
    ours = [_grpc_line(x) for x in text.splitlines() if '"gRPC ' in x]
    recorded = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "torchserve_model_deps"
                           / "recorded.json").read_text())["on"]["access_log grpc lines"]
    theirs = [_grpc_line(x) for x in recorded]
    # the good Predictions and StreamPredictions calls: the very lines TorchServe writes
    assert ours[0] == theirs[0] == f'T - /127.0.0.1:P "gRPC {service}/Predictions HTTP/2.0" 0 MS'
    assert ours[2] == theirs[2]
    # the failed call carries the code the client got (TorchServe answers an unknown model INTERNAL, 13)
    assert ours[1] == f'T - /127.0.0.1:P "gRPC {service}/Predictions HTTP/2.0" {missing.value.code().value[0]} MS'
    assert ours[3] == 'T - /127.0.0.1:P "gRPC org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels ' \
                      'HTTP/2.0" 0 MS'


def test_log_mode_request_lines_are_in_the_files_when_the_answer_arrives(osprey, store, tmp_path):
    """A request's ts_inference_* lines, its batch's QueueTime/WorkerThreadTime and the handler's
    model metrics are written before its answer leaves (TorchServe's appenders write each line as
    it is logged; its test_metrics_log_mode reads ts_metrics.log right after an answer): read at
    once, never polled."""
    server = _start(osprey, store, tmp_path, metrics_mode="log", metric_time_interval="60")
    logs = tmp_path / "logs"
    for n in (1, 2):
        assert httpx.post(f"{server.inference}/predictions/tsm", json={"x": n}).status_code == 200
        ts_metrics = (logs / "ts_metrics.log").read_text()
        for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                     "ts_queue_latency_microseconds", "QueueTime", "WorkerThreadTime"):
            assert ts_metrics.count(f"{name}.") == n, f"{name}: {ts_metrics}"
        assert (logs / "model_metrics.log").read_text().count("PredictionTime.ms:") == n
        # the system metrics were logged once, at start (TorchServe's collector has no initial
        # delay: its test_metrics reads them right after the first answer), not after a second
        assert ts_metrics.count("CPUUtilization.") == 1 and ts_metrics.count("MemoryUsed.") == 1, ts_metrics
