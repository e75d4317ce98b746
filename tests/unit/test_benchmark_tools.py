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
