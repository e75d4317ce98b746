"""The benchmark's own tools: hey's output parsed right, the open-loop driver's timing and the
report's goal checks computed from the numbers (no server, no timing assertions)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading

import pytest

from benchmarks.load import parse_hey
from benchmarks.openloop import percentiles

HEY_OUTPUT = """
Summary:
  Total:\t10.0041 secs
  Slowest:\t0.0301 secs
  Fastest:\t0.0002 secs
  Average:\t0.0036 secs
  Requests/sec:\t8797.0123

Latency distribution:
  10% in 0.0011 secs
  50% in 0.0032 secs
  90% in 0.0055 secs
  99% in 0.0070 secs

Status code distribution:
  [200]\t87000 responses
  [503]\t12 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:1/predictions/mlp": dial tcp: connection refused
"""


def test_parse_hey_reads_rate_percentiles_and_errors():
    r = parse_hey(HEY_OUTPUT)
    assert r["rps"] == pytest.approx(8797.0123)
    assert r["p50_ms"] == pytest.approx(3.2)
    assert r["p99_ms"] == pytest.approx(7.0)
    assert r["status"] == {200: 87000, 503: 12}
    assert r["ok"] == 87000
    assert r["errors"] == 12 + 3  # non-200 answers plus transport errors
    assert "connection refused" in r["error_sample"]


def test_percentiles_nearest_rank():
    p = percentiles([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert p["p50_ms"] == pytest.approx(50.0)
    assert p["p99_ms"] == pytest.approx(99.0)
    assert p["max_ms"] == pytest.approx(100.0)


class _Server(threading.Thread):
    """A keep-alive HTTP/1.1 server answering every request with 200 and a small body."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def run(self):
        async def handle(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        async def main():
            server = await asyncio.start_server(handle, sock=self.sock)
            async with server:
                await server.serve_forever()

        asyncio.run(main())


def test_open_loop_driver_holds_a_low_rate_against_a_quick_server(tmp_path, capsys):
    from benchmarks.openloop import main

    server = _Server()
    server.start()
    body = tmp_path / "body.json"
    body.write_text("[1, 2, 3]")
    main(["--url", f"http://127.0.0.1:{server.port}/predictions/x", "--body", str(body),
          "--rate", "200", "--duration", "1", "--warmup", "0.2"])
    out = json.loads(capsys.readouterr().out)
    assert out["errors"] == 0 and out["unfinished"] == 0
    assert 100 < out["ok"] < 320  # Poisson at 200/s for 1 s
    assert out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    # latency counts from the scheduled send time, so it is never below the service time
    assert out["p50_ms"] >= out["service"]["p50_ms"]


def _data(osprey_c32: float, ts_c32: float, open_p50: float, open_p99: float, achieved: float) -> dict:
    row = lambda s, m, c, rps, p50: {"system": s, "model": m, "concurrency": c, "rps": rps, "p50_ms": p50, "p99_ms": p50 * 2}
    return {
        "closed": [row("osprey", "mlp", 32, osprey_c32, 3.0), row("torchserve", "mlp", 32, ts_c32, 12.0),
                   row("osprey", "mlp", 1, 2000, 0.4), row("torchserve", "mlp", 1, 130, 7.0)],
        "exact_c1": [row("osprey", "mlp", 1, 2400, 0.41), row("torchserve", "mlp", 1, 140, 7.1)],
        "open": [{"system": "osprey", "model": "mlp", "rate": 1000.0, "achieved_rps": achieved,
                  "p50_ms": open_p50, "p99_ms": open_p99, "errors": 0, "lateness": {"p99_ms": 0.3}}],
        "ceiling": {}, "startup": [], "memory": [],
    }


def test_goals_are_computed_from_the_numbers():
    from benchmarks.report import goals

    by_goal = {g["goal"]: g for g in goals(_data(9000, 2000, 1.0, 2.5, 1000))}
    assert by_goal["Tiny MLP REST, c=32, batching on"]["met"] is True      # 4.5x >= 3x
    assert by_goal["Tiny MLP REST, c=1, p50"]["met"] is True               # 0.41 ms < 1 ms
    assert by_goal["Tail: p99 at 70% of capacity"]["met"] is True          # 2.5x within 3x
    assert by_goal["CNN at saturation vs TorchServe"]["met"] is None       # not measured

    by_goal = {g["goal"]: g for g in goals(_data(5000, 2000, 1.0, 2.5, 600))}
    assert by_goal["Tiny MLP REST, c=32, batching on"]["met"] is False     # 2.5x < 3x
    tail = by_goal["Tail: p99 at 70% of capacity"]
    assert tail["met"] is False and "served 600 of 1000/s" in tail["detail"]  # did not hold its rate


def test_report_writes_markdown_from_a_run(tmp_path):
    from benchmarks.report import generate

    data = _data(9000, 2000, 1.0, 2.5, 1000)
    data.update(meta={"date": "2026-11-23 00:00 UTC", "mode": "quick", "duration_s": 60, "command": "python -m benchmarks.run --quick",
                      "plan": {"duration": 3, "cnn_duration": 3},
                      "machine": {"nproc": 2, "cpu_model": "test", "mem_mib": 1, "kernel": "k", "python": sys.version.split()[0],
                                  "torch": "2", "torch_threads": 2, "osprey_commit": "abc"}},
                models={}, notes=["a note"], variants=[], startup_single=[], loadavg=[])
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(data))
    md = tmp_path / "RESULTS.md"
    generate(src, md, tmp_path)
    text = md.read_text()
    assert "| Tiny MLP REST, c=32, batching on | >= 3x TorchServe | 4.50x | yes |" in text
    assert "python -m benchmarks.run --quick" in text and "a note" in text


def test_c_open_loop_driver_matches_the_python_one(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    exe = tmp_path / "openloop"
    src = Path(__file__).resolve().parents[2] / "benchmarks" / "openloop.c"
    subprocess.run([cc, "-O2", "-o", str(exe), str(src), "-lm"], check=True)
    server = _Server()
    server.start()
    body = tmp_path / "body.json"
    body.write_text("[1, 2, 3]")
    proc = subprocess.run([str(exe), "127.0.0.1", str(server.port), "/predictions/x", str(body), "application/json",
                           "200", "1", "0.2", "64", "1"], capture_output=True, text=True, timeout=60)
    out = json.loads(proc.stdout)
    assert out["errors"] == 0 and out["unfinished"] == 0 and out["status"] == {"200": out["ok"]}
    assert 100 < out["ok"] < 320
    assert out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    assert out["p50_ms"] >= out["service"]["p50_ms"]


def test_overload_capacities_parse_and_refuse_nonsense():
    from benchmarks.overload import parse_capacities

    assert parse_capacities("mlp=4000, digits_cnn=1500.5") == {"mlp": 4000.0, "digits_cnn": 1500.5}
    assert parse_capacities(None) == {} and parse_capacities("") == {}
    for bad in ("mlp", "=5", "mlp=0", "mlp=-3", "mlp=fast"):
        with pytest.raises(ValueError):
            parse_capacities(bad)


def test_overload_summary_counts_goodput_within_the_objective_and_refusals():
    from benchmarks.overload import summary

    # 60 s window at 2x of 1000/s: 1,500 answered 200s, of which 1,200 within the objective
    r = {"sent": 120_000, "ok": 90_000, "ok_within": 54_000, "objective_ms": 1000.0, "unfinished": 3,
         "status": {"200": 90_000, "503": 29_000, "504": 990, "0": 7}, "p50_ms": 80.0, "p99_ms": 2400.0,
         "refused": {"count": 29_000, "retry_after": 28_710, "latency": {"p50_ms": 1.5, "p99_ms": 9.0}},
         "wall_s": 92.0, "lateness": {"p99_ms": 0.2}}
    s = summary(r, 60.0, 2.0, 1000.0)
    assert s["offered_rps"] == 2000.0
    assert s["goodput_rps"] == 900.0 and s["goodput_ratio"] == 0.9  # within the objective, per window second
    assert s["ok_rps"] == 1000.0  # all 200s over the 90 s it took to answer them
    assert s["refused_rps"] == pytest.approx(483.3) and s["refused_retry_after"] == 0.99
    assert (s["refused_p50_ms"], s["refused_p99_ms"]) == (1.5, 9.0)
    assert s["other"] == 990 and s["unanswered"] == 10  # 504s apart; connection errors + never answered


def test_overload_summary_of_an_older_driver_output_counts_every_200():
    from benchmarks.overload import summary

    s = summary({"sent": 100, "ok": 90, "status": {"200": 90, "503": 10}}, 1.0, 0.0, 100.0)
    assert s["goodput_rps"] == 90.0 and s["refused_rps"] == 10.0 and s["refused_retry_after"] is None


def test_open_loop_drivers_count_goodput_and_retry_after(tmp_path):
    """Both drivers: ok_within against an objective, 503s with Retry-After counted apart."""
    import shutil
    import subprocess
    from pathlib import Path

    from benchmarks.openloop import summarize_answers

    recs = [(0.0, 0.0, 0.05, 200, False), (1.0, 1.0, 3.0, 200, False), (2.0, 2.0, 2.001, 503, True),
            (3.0, 3.0, 3.002, 503, False), (4.0, 4.0, 4.0, 0, False)]
    out = summarize_answers(recs, 1000.0)
    assert out["ok_within"] == 1 and out["objective_ms"] == 1000.0
    assert out["status"] == {"0": 1, "200": 2, "503": 2}
    assert out["refused"]["count"] == 2 and out["refused"]["retry_after"] == 1
    assert "ok_within" not in summarize_answers(recs)

    class Refusing(_Server):
        def run(self):
            async def handle(reader, writer):
                n = 0
                try:
                    while True:
                        head = await reader.readuntil(b"\r\n\r\n")
                        await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
                        n += 1
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" if n % 2 else
                                     b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n")
                        await writer.drain()
                except (asyncio.IncompleteReadError, ConnectionError):
                    writer.close()

            async def main():
                async with await asyncio.start_server(handle, sock=self.sock) as server:
                    await server.serve_forever()

            asyncio.run(main())

    server = Refusing()
    server.start()
    body = tmp_path / "body.json"
    body.write_text("[1]")
    outs = []
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        exe = tmp_path / "openloop"
        subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).resolve().parents[2] / "benchmarks" / "openloop.c"),
                        "-lm"], check=True)
        proc = subprocess.run([str(exe), "127.0.0.1", str(server.port), "/p", str(body), "application/json",
                               "200", "1", "0", "1", "1", "1000"], capture_output=True, text=True, timeout=60)
        outs.append(json.loads(proc.stdout))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.openloop", "--url", f"http://127.0.0.1:{server.port}/p",
                           "--body", str(body), "--rate", "200", "--duration", "1", "--warmup", "0",
                           "--max-conns", "1", "--preopen", "1", "--objective-ms", "1000"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    outs.append(json.loads(proc.stdout))
    for out in outs:  # one connection: answers alternate 200 and 503 (Retry-After)
        assert out["unfinished"] == 0 and out["objective_ms"] == 1000.0
        assert out["ok_within"] == out["ok"] > 50
        assert abs(out["refused"]["count"] - out["ok"]) <= 1 and out["refused"]["retry_after"] == out["refused"]["count"]
        assert out["status"]["503"] == out["refused"]["count"]


def test_retraining_cost_archive_keeps_the_example_but_triggers_and_gate(tmp_path):
    """benchmarks.retraining_cost serves digits_cnn with manual triggers only and a gate no
    challenger passes; every other file and setting is the example's."""
    import zipfile

    import yaml

    from benchmarks.retraining_cost import _digits_archive, _durations
    from server.core.model_config import parse_model_config

    src = tmp_path / "src.mar"
    cfg = {"batchSize": 16, "retraining": {"min_labels": 200, "promotion": {"policy": "canary"}}}
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("model-config.yaml", yaml.safe_dump(cfg))
        zf.writestr("MAR-INF/MANIFEST.json", "{}")
    store = tmp_path / "store"
    store.mkdir()
    out = _digits_archive(src, store)
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["MAR-INF/MANIFEST.json", "model-config.yaml"]
        got = yaml.safe_load(zf.read("model-config.yaml"))
    r = parse_model_config(got).retraining
    assert got["batchSize"] == 16 and r.min_labels == 200 and r.promotion.policy == "canary"
    assert r.triggers == ("manual",) and r.gate.min_improvement == 2.0
    rec = {"id": "j", "state": "rejected", "started": 10.0, "finished": 25.5,
           "steps": [{"step": "data", "ts": 11.0}, {"step": "training", "ts": 20.0}]}
    assert _durations(rec) == {"id": "j", "state": "rejected", "started": 10.0, "finished": 25.5, "job_s": 15.5,
                               "training_s": 9.0}


# --- the Python peers (issue 15): what they are given and how the report sets them beside Osprey ---
def test_peer_spec_comes_from_the_archive_every_server_loads(tmp_path):
    """A peer serves the archive's own TorchScript file with the archive's batching and, for an image
    model, its labels and `handler:` preprocessing (read from model-config.yaml, not restated)."""
    import zipfile

    from benchmarks.models import BenchModel
    from benchmarks.peerspec import archive_spec

    mar = tmp_path / "digits.mar"
    with zipfile.ZipFile(mar, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "digits", "serializedFile": "d.pt",
                                                                   "handler": "h.py", "configFile": "model-config.yaml"}}))
        zf.writestr("d.pt", b"weights")
        zf.writestr("index_to_name.json", json.dumps({"0": "zero"}))
        zf.writestr("model-config.yaml", "batchSize: 16\nmaxBatchDelay: 7\nhandler:\n  resize: [8, 8]\n  topk: 3\n")
    m = BenchModel("digits", mar, tmp_path / "x.png", "image/png", "digits")
    spec = archive_spec(m, tmp_path / "out")
    assert (spec["batch_size"], spec["delay_ms"]) == (16, 7.0)
    assert spec["labels"] == {"0": "zero"} and spec["preprocess"] == {"resize": [8, 8], "topk": 3}
    assert open(spec["weights"], "rb").read() == b"weights"


def test_oip_and_multipart_bodies_carry_the_same_input(tmp_path):
    import base64

    import numpy as np

    from benchmarks.models import BenchModel
    from benchmarks.peerspec import multipart, oip_json

    mlp = BenchModel("mlp", tmp_path / "a.mar", tmp_path / "b", "application/json", "mlp", input_shape=(16,))
    row = [0.1 * i for i in range(16)]
    assert oip_json(mlp, json.dumps(row).encode()) == {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": row}]}
    cnn = BenchModel("cnn", tmp_path / "a.mar", tmp_path / "b", "application/octet-stream", "cnn", input_shape=(3, 2, 2))
    raw = np.arange(12, dtype=np.float32)
    inp = oip_json(cnn, raw.tobytes())["inputs"][0]
    assert inp["shape"] == [1, 3, 2, 2] and inp["data"] == raw.tolist()
    digits = BenchModel("d", tmp_path / "a.mar", tmp_path / "b", "image/png", "digits")
    inp = oip_json(digits, b"\x89PNG..")["inputs"][0]
    assert inp["datatype"] == "BYTES" and base64.b64decode(inp["data"][0]) == b"\x89PNG.."

    body, ctype = multipart("request", "x.png", b"\x89PNG\r\n", "image/png")
    assert ctype == "multipart/form-data; boundary=osprey-bench-boundary"
    # the file's bytes are framed by the boundary exactly once, untouched
    assert body.count(b"--osprey-bench-boundary") == 2 and b"\r\n\r\n\x89PNG\r\n\r\n--osprey-bench-boundary--" in body


def test_peer_envs_pin_torch_before_the_peer():
    from benchmarks.peerenv import PEERS, install_steps
    from benchmarks.tsenv import TORCH_PIN

    for peer in PEERS.values():
        first, second = install_steps(peer)
        assert first == [TORCH_PIN]                      # torch alone, before anything can pull another
        assert TORCH_PIN in second and set(peer.packages) <= set(second)
        assert all("==" in p or "<" in p for p in peer.packages)  # every peer release pinned


def test_every_peer_is_in_the_default_run():
    from benchmarks.run import ALL_SYSTEMS, peers_wanted
    from benchmarks.systems import PEER_SERVERS

    assert set(peers_wanted(set(ALL_SYSTEMS))) == set(PEER_SERVERS) == {"mlserver", "litserve", "rayserve", "bentoml"}
    assert peers_wanted({"osprey", "mlserver_grpc"}) == ["mlserver"]  # its gRPC needs the server started


def test_report_sets_each_peer_beside_osprey(tmp_path):
    from benchmarks.report import generate, peer_summary

    data = _data(9000, 2000, 1.0, 2.5, 1000)
    row = lambda s, m, c, rps: {"system": s, "model": m, "concurrency": c, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0}
    data["closed"] += [row("mlserver", "mlp", 32, 600), row("mlserver", "mlp", 1, 400), row("rayserve", "mlp", 32, 450),
                       row("osprey_grpc", "mlp", 32, 8000), row("mlserver_grpc", "mlp", 32, 1000)]
    data["startup"] = [{"system": "osprey", "models": 2, "first_answer_s": 1.0, "all_models_s": 1.5},
                       {"system": "mlserver", "models": 2, "first_answer_s": 6.0, "all_models_s": 6.0}]
    data["memory"] = [{"system": "osprey", "when": "idle, models loaded", "rss_mib": 300.0},
                      {"system": "mlserver", "when": "idle, models loaded", "rss_mib": 600.0, "idle_cpu_pct": 3.25}]
    data["peers"] = {"mlserver": {"label": "MLServer 1.7", "version": "1.7.1", "models": ["mlp"],
                                  "batching": {"mlp": {"batch_size": 32, "delay_ms": 5.0}},
                                  "requests": {"mlp": {"url_path": "/v2/models/mlp/infer", "content_type": "application/json",
                                                       "body_bytes": 160}},
                                  "differences": ["Protocol: the Open Inference Protocol only"]},
                     "bentoml": {"label": "BentoML 1.4", "error": "could not be installed: no network"}}
    by = {p["system"]: p for p in peer_summary(data)}
    assert by["mlserver"]["ratios"]["mlp"]["c32"] == pytest.approx(15.0)   # 9000 / 600
    assert by["mlserver_grpc"]["ratios"]["mlp"]["c32"] == pytest.approx(8.0)  # Osprey's gRPC / MLServer's gRPC
    assert by["mlserver"]["startup_s"] == 6.0 and by["rayserve"]["ratios"]["mlp"]["c32"] == pytest.approx(20.0)

    data.update(meta={"date": "2026-11-29 00:00 UTC", "mode": "quick", "duration_s": 60, "command": "x",
                      "plan": {"duration": 3, "cnn_duration": 3},
                      "machine": {"nproc": 2, "cpu_model": "test", "mem_mib": 1, "kernel": "k", "python": "3",
                                  "torch": "2", "torch_threads": 2, "osprey_commit": "abc"}},
                models={}, notes=[], variants=[], startup_single=[], loadavg=[])
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(data))
    generate(src, tmp_path / "RESULTS.md", tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Osprey/MLServer" in text and "Osprey gRPC/MLServer gRPC" in text and "15.00x" in text
    assert "| MLServer 1.7 REST | 6.00 | 1.50 | 4.00x | 600 | 300 | 2.00x |" in text   # start-up and memory
    assert "| MLServer 1.7 REST | 2 | 6.00 | 6.00 | 600 | – | 3.2 |" in text           # and its CPU while idle
    assert "Protocol: the Open Inference Protocol only" in text                       # what it does differently
    assert "Not measured: could not be installed: no network" in text                 # a peer that could not run


def test_ab_refuses_an_environment_entry_without_a_value(capsys):
    from benchmarks import ab

    with pytest.raises(SystemExit):
        ab.main(["HEAD", "HEAD", "--new-env", "OSPREY_MONITORING"])
    assert "--old-env/--new-env takes KEY=VALUE, got 'OSPREY_MONITORING'" in capsys.readouterr().err


def test_profile_files_are_named_relative_to_the_repository_or_as_given_outside_it(tmp_path):
    """`benchmarks.run --out DIR` outside the repository: the profile's files are named as they
    are (the run used to fail its profile step on a path the repository does not contain)."""
    from benchmarks.run import ROOT, _shown

    assert _shown(ROOT / "benchmarks" / "results" / "p.svg") == "benchmarks/results/p.svg"
    assert _shown(tmp_path / "p.svg") == str(tmp_path / "p.svg")
