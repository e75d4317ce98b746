"""``osprey monitor report`` against a real HTTP server answering a canned monitoring JSON
(the report is a client; the end-to-end test against a real Osprey lives with the Monitor's)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from monitoring import report
from server.cli import main

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKEN = "s3cret-1"


def _numeric(name, kind, score, threshold, drifted, ref, cur, edges=None):
    edges = edges or [None, *[i / 10 for i in range(1, len(ref))], None]  # JSON has no infinity: null open ends
    return {"name": name, "kind": kind, "method": "psi", "score": score, "threshold": threshold, "drifted": drifted,
            "reference": {"edges": edges, "proportions": ref}, "current": {"proportions": cur}}


def canned_status() -> dict:
    """The monitoring JSON of monitoring-plan.md: two drifted features, two clean, 30 windows."""
    flat = [0.1] * 10
    features = [
        _numeric("pixel_mean", "input", 0.83, 0.2, True, flat, [0.0, 0.0, 0.01, 0.01, 0.02, 0.06, 0.1, 0.2, 0.3, 0.3]),
        {"name": "predicted_class", "kind": "prediction", "method": "psi", "score": 0.41, "threshold": 0.2,
         "drifted": True, "reference": {"categories": [str(i) for i in range(10)], "proportions": flat},
         "current": {"proportions": [0.3, 0.3, 0.3, 0.0125, 0.0125, 0.0125, 0.0125, 0.0125, 0.0125, 0.0125]}},
        _numeric("confidence", "prediction", 0.05, 0.2, False, [0.25] * 4, [0.2, 0.3, 0.25, 0.25]),
        _numeric("embedding[0]", "input", 0.12, 0.2, False, [0.2] * 5, [0.15, 0.25, 0.2, 0.2, 0.2]),
    ]
    history = []
    for w in range(1, 31):
        shifted = w > 20
        history.append({"window": w, "ended": 1_790_000_000.0 + 60 * w, "score": 0.6 if shifted else 0.04,
                        "drifted": shifted,
                        "features": {"pixel_mean": 0.8 if shifted else 0.03,
                                     "predicted_class": 0.4 if shifted else 0.02,
                                     "confidence": 0.05, "embedding[0]": 0.1},
                        "quality": ({"accuracy": 0.97 if not shifted else 0.71, "f1": 0.96 if not shifted else 0.69}
                                    if w % 3 == 0 else None)})
    return {"model": "digits_cnn", "version": "1.0", "reference": "archive", "degraded": None,
            "requests": 15000, "windows": 30,
            "drift": {"detected": True, "score": 0.6, "method": "psi",
                      "episode": {"id": 1, "started": 1_790_001_260.0, "open": True, "ended": None}, "episodes": 1,
                      "features": features},
            "quality": {"labels": 900, "unmatched": 3, "invalid": 1,
                        "metrics": {"accuracy": 0.71, "f1": 0.69, "roc_auc": None},
                        "baseline": {"accuracy": 0.98, "f1": 0.97}, "baseline_source": "training.json",
                        "degraded": True, "degraded_metrics": ["accuracy", "f1"],
                        "window": {"labels": 400, "size": 500}, "windows": 1, "min_labels": 200, "tolerance": 0.05,
                        "task": "classification", "estimated": {"accuracy": 0.93, "rows": 500},
                        "history": []},
            "history": history}


class FakeServer:
    """``http.server`` on a free port: ``routes[path] = (status, body)``; every request is recorded."""

    def __init__(self):
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.token: str | None = None
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Authorization")))
                if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._send(401, json.dumps({"code": 401, "type": "Unauthorized",
                                                       "message": "Token Authorization failed"}).encode())
                path = urllib.parse.urlsplit(self.path).path
                status, body = outer.routes.get(path, (404, json.dumps(
                    {"code": 404, "type": "ModelNotFoundException",
                     "message": f"Model not found: {path.rsplit('/', 1)[-1]}"}).encode()))
                self._send(status, body)

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve_json(self, path: str, data, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(data).encode())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    s.token = TOKEN
    s.serve_json("/monitoring/digits_cnn/1.0", canned_status())
    s.serve_json("/monitoring/digits_cnn", canned_status())
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no key_file.json of a developer's server is picked up


def _report(server_or_url, out, *extra, token=TOKEN):
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    argv = ["monitor", "report", "digits_cnn", "--url", url, "--out", str(out), *extra]
    return main(argv + (["--token", token] if token else []))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("osprey monitor report: "), err
    return err


def _pngs_of(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path}: {len(data)} bytes"


def test_report_writes_the_page_and_its_plots(server, tmp_path, capsys):
    out = tmp_path / "report"
    assert _report(server, out, "--version", "1.0") == report.EXIT_OK
    index = out / "index.html"
    assert capsys.readouterr().out.strip() == str(index)
    assert server.requests == [("/monitoring/digits_cnn/1.0", f"Bearer {TOKEN}")]
    pngs = sorted(p.name for p in out.glob("*.png"))
    # each drifted feature, drift and quality over the windows; nothing else
    assert pngs == ["drift-windows.png", "feature-00-pixel_mean.png", "feature-01-predicted_class.png",
                    "quality-windows.png"]
    for name in pngs:
        _assert_png(out / name)
    assert sorted(_pngs_of(index)) == pngs
    page = index.read_text()
    assert "<script" not in page and "http" not in page.split("</style>")[0]  # self-contained
    for text in ("digits_cnn", "version 1.0", "archive", "drift detected", "quality degraded",
                 "pixel_mean", "predicted_class", "confidence", "embedding[0]", "accuracy", "0.98", "0.71",
                 "-0.27", "started 2026-09-21", "estimated (no labels)", "0.93"):
        assert text in page, text
    # the features table: drifted ones first, by score
    order = [page.index(f"<td>{n}</td>") for n in ("pixel_mean", "predicted_class", "embedding[0]", "confidence")]
    assert order == sorted(order)
    assert page.count('class="drifted"') == 2


def test_default_version_and_no_feature_drifted_plots_the_top_scores(server, tmp_path):
    status = canned_status()
    status["drift"]["detected"] = False
    status["drift"]["episode"] = None
    for f in status["drift"]["features"]:
        f["drifted"] = False
    server.serve_json("/monitoring/digits_cnn", status)
    out = tmp_path / "r"
    assert _report(server, out) == 0
    assert server.requests[-1][0] == "/monitoring/digits_cnn"
    features = sorted(p.name for p in out.glob("feature-*.png"))
    assert features == ["feature-00-pixel_mean.png", "feature-01-predicted_class.png", "feature-02-embedding_0.png"]
    page = (out / "index.html").read_text()
    assert "no drift" in page and "the highest scores" in page
    assert set(_pngs_of(out / "index.html")) == {p.name for p in out.glob("*.png")}


def test_a_baseline_still_being_collected(server, tmp_path):
    status = {"model": "digits_cnn", "version": "1.0", "reference": "baseline",
              "baseline_progress": {"rows": 120, "needed": 1000}, "degraded": None, "requests": 120, "windows": 0,
              "drift": {"detected": False, "score": None, "method": "psi", "episode": None, "episodes": 0,
                        "features": []},
              "quality": None, "history": []}
    server.serve_json("/monitoring/digits_cnn", status)
    out = tmp_path / "r"
    assert _report(server, out) == 0
    page = (out / "index.html").read_text()
    assert "120 of 1000 rows" in page and "No window closed yet" in page
    assert list(out.glob("*.png")) == [] and _pngs_of(out / "index.html") == []


def test_the_key_file_gives_the_token(server, tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": TOKEN}, "API": {"key": "a"}}))
    assert _report(server, tmp_path / "a", "--key-file", str(key_file), token=None) == 0
    assert server.requests[-1][1] == f"Bearer {TOKEN}"
    # ./key_file.json (where the server writes it by default) is used when nothing is named
    assert _report(server, tmp_path / "b", token=None) == 0
    assert server.requests[-1][1] == f"Bearer {TOKEN}"


def test_server_unreachable_names_the_url(tmp_path, capsys):
    s = FakeServer()
    url = s.url
    s.close()  # nothing listens there now
    assert _report(url, tmp_path / "r") == report.EXIT_UNREACHABLE
    err = _error_line(capsys)
    assert f"cannot reach the Osprey server at {url}" in err
    assert not (tmp_path / "r").exists()


def test_a_server_error_is_reported(server, tmp_path, capsys):
    server.routes["/monitoring/digits_cnn"] = (503, b'{"code": 503, "message": "Monitoring is starting"}')
    assert _report(server, tmp_path / "r") == report.EXIT_UNREACHABLE
    assert "answered 503: Monitoring is starting" in _error_line(capsys)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_401_asks_for_the_token(server, tmp_path, capsys, token):
    assert _report(server, tmp_path / "r", token=token) == report.EXIT_AUTH
    err = _error_line(capsys)
    assert err.startswith(f"osprey monitor report: 401 from {server.url}/monitoring/digits_cnn")
    assert "--token" in err and ("refused" in err if token else "requires a token" in err)


def test_torchserve_style_400_for_a_token_is_a_token_error(server, tmp_path, capsys):
    server.token = None
    server.routes["/monitoring/digits_cnn"] = (400, b'{"code": 400, "message": "Token Authorization failed"}')
    assert _report(server, tmp_path / "r", token=None) == report.EXIT_AUTH
    assert "400 from" in _error_line(capsys)


def test_what_the_monitor_answers_at_its_edges(server, tmp_path):
    """A feature without a reference (null), a quality part that failed, a version not monitored."""
    status = canned_status()
    status["drift"]["features"][0]["reference"] = None
    status["quality"] = {"degraded": True, "error": "StoreUnavailable: redis down"}
    server.serve_json("/monitoring/digits_cnn", status)
    out = tmp_path / "r"
    assert _report(server, out) == 0
    assert sorted(p.name for p in out.glob("feature-*.png")) == ["feature-00-predicted_class.png"]
    page = (out / "index.html").read_text()
    assert "<td>pixel_mean</td>" in page and "StoreUnavailable: redis down" in page
    off = {"model": "digits_cnn", "version": "1.0", "reference": None, "degraded": "monitoring is off",
           "requests": 0, "windows": 0, "drift": {"detected": False, "score": 0.0, "method": None, "episode": None,
                                                  "episodes": 0, "features": []}, "quality": None, "history": []}
    server.serve_json("/monitoring/digits_cnn", off)
    assert _report(server, out) == 0
    page = (out / "index.html").read_text()
    assert "not monitored" in page and "monitoring is off" in page


def test_window_quality_nested_under_metrics(server, tmp_path):
    status = canned_status()
    for entry in status["history"]:
        if entry["quality"]:
            entry["quality"] = {"labels": 500, "metrics": entry["quality"]}
    server.serve_json("/monitoring/digits_cnn", status)
    assert _report(server, tmp_path / "r") == 0
    _assert_png(tmp_path / "r" / "quality-windows.png")


def test_labelled_windows_are_plotted_when_the_drift_windows_closed_before_the_labels(server, tmp_path):
    # labels usually arrive after the drift windows closed: those windows saw no quality, the
    # quality part's own history (one entry per labelled window) has it
    status = canned_status()
    for entry in status["history"]:
        entry["quality"] = None
    status["quality"]["history"] = [
        {"window": w, "ended": 1_790_002_000.0 + w, "labels": 40, "metrics": {"accuracy": a, "f1": a - 0.01},
         "degraded": a < 0.9} for w, a in ((1, 1.0), (2, 0.7))]
    server.serve_json("/monitoring/digits_cnn", status)
    assert _report(server, tmp_path / "r") == 0
    _assert_png(tmp_path / "r" / "quality-windows.png")
    assert "quality-windows.png" in (tmp_path / "r" / "index.html").read_text()


def test_scores_and_losses_are_plotted_on_panels_of_their_own(server, tmp_path):
    """A log loss of 5 on the accuracy's axis flattened a drop from 0.98 to 0.67 into a line."""
    from monitoring.report import quality_panels

    assert quality_panels(["log_loss", "accuracy", "macro_f1", "roc_auc", "macro_precision"]) == [
        ["accuracy", "macro_f1", "macro_precision", "roc_auc"], ["log_loss"]]
    assert quality_panels(["mse", "r2", "mae"]) == [["mae", "mse", "r2"]]
    assert quality_panels(["accuracy", "estimated_accuracy"]) == [["accuracy", "estimated_accuracy"]]
    status = canned_status()
    status["quality"]["history"] = [
        {"window": w, "ended": 1_790_002_000.0 + w, "labels": 40,
         "metrics": {"accuracy": a, "log_loss": 5.4 * (1 - a) + 0.1}, "degraded": a < 0.9}
        for w, a in ((1, 0.98), (2, 0.67), (3, 0.7))]
    server.serve_json("/monitoring/digits_cnn", status)
    assert _report(server, tmp_path / "r") == 0
    _assert_png(tmp_path / "r" / "quality-windows.png")


def test_an_unreadable_key_file(server, tmp_path, capsys):
    bad = tmp_path / "keys.json"
    bad.write_text("{}")
    assert _report(server, tmp_path / "r", "--key-file", str(bad), token=None) == report.EXIT_AUTH
    assert f"key file {bad}" in _error_line(capsys)
    assert server.requests == []


def test_404_names_the_model(server, tmp_path, capsys):
    assert main(["monitor", "report", "nosuch", "--url", server.url, "--out", str(tmp_path / "r"),
                 "--token", TOKEN]) == report.EXIT_NOT_FOUND
    err = _error_line(capsys)
    assert "unknown model 'nosuch'" in err and "404" in err and "Model not found: nosuch" in err
    assert _report(server, tmp_path / "r", "--version", "9.9") == report.EXIT_NOT_FOUND
    assert "unknown model 'digits_cnn' version '9.9'" in _error_line(capsys)


def _without(path: str) -> dict:
    status = canned_status()
    *parents, last = re.findall(r"[^.\[\]]+", path)
    node = status
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    del node[int(last) if last.isdigit() else last]
    return status


@pytest.mark.parametrize("field", ["model", "version", "reference", "drift", "drift.detected", "drift.features",
                                   "drift.features[1].current", "drift.features[0].reference.proportions",
                                   "drift.features[2].threshold", "quality.degraded", "history",
                                   "history[4].window", "history[0].features"])
def test_a_json_without_a_needed_field_names_it(server, tmp_path, capsys, field):
    server.serve_json("/monitoring/digits_cnn", _without(field))
    assert _report(server, tmp_path / "r") == report.EXIT_BAD_JSON
    err = _error_line(capsys)
    assert f"lacks {field}" in err and f"{server.url}/monitoring/digits_cnn" in err
    assert not (tmp_path / "r").exists()


def test_a_json_with_wrong_shapes(server, tmp_path, capsys):
    status = canned_status()
    status["drift"]["features"][3]["current"]["proportions"] = [0.5, 0.5]
    server.serve_json("/monitoring/digits_cnn", status)
    assert _report(server, tmp_path / "r") == report.EXIT_BAD_JSON
    assert "drift.features[3] (embedding[0]) has 5 reference bins but 5 reference and 2 current" in _error_line(capsys)
    status = canned_status()
    status["drift"]["detected"] = "yes"
    server.serve_json("/monitoring/digits_cnn", status)
    assert _report(server, tmp_path / "r") == report.EXIT_BAD_JSON
    assert "drift.detected should be bool" in _error_line(capsys)
    server.routes["/monitoring/digits_cnn"] = (200, b"<html>a proxy's login page</html>")
    assert _report(server, tmp_path / "r") == report.EXIT_BAD_JSON
    assert "not JSON" in _error_line(capsys)


def test_an_output_folder_that_cannot_be_made(server, tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    assert _report(server, tmp_path / "file" / "r") == report.EXIT_ERROR
    assert f"cannot write the report into {tmp_path / 'file' / 'r'}" in _error_line(capsys)


def _range_result(label: str, series: dict[str, list[float]], start: float = 1_790_000_000.0) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {label: name}, "values": [[start + 60 * i, str(v)] for i, v in enumerate(values)]}
        for name, values in series.items()]}}).encode()


class PromRoutes(FakeServer):
    """A canned Prometheus: query_range answers by the metric its query names."""

    def __init__(self):
        super().__init__()
        self.queries: list[dict] = []
        routes = self.routes

        class Answers(dict):
            def get(self_, path, default=None):
                if path != "/api/v1/query_range":
                    return default
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.requests[-1][0]).query)
                self.queries.append(query)
                if "osprey_drift_score" in query["query"][0]:
                    return 200, _range_result("feature", {"pixel_mean": [0.02] * 20 + [0.8] * 20,
                                                          "confidence": [0.05] * 40})
                return 200, _range_result("metric", {"accuracy": [0.97] * 20 + [0.7] * 20})

        self.routes = Answers(routes)


def test_prometheus_history_is_plotted(server, tmp_path):
    prom = PromRoutes()
    try:
        out = tmp_path / "r"
        assert _report(server, out, "--prometheus", prom.url, "--since", "2h") == 0
    finally:
        prom.close()
    for name in ("drift-prometheus.png", "quality-prometheus.png"):
        _assert_png(out / name)
        assert name in _pngs_of(out / "index.html")
    queries = [q["query"][0] for q in prom.queries]
    assert queries == ['max by (feature) (osprey_drift_score{model="digits_cnn", version="1.0"})',
                       'max by (metric) (osprey_quality{model="digits_cnn", version="1.0"})']
    q = prom.queries[0]
    assert float(q["end"][0]) - float(q["start"][0]) == pytest.approx(7200)
    assert float(q["step"][0]) >= 15


def test_prometheus_unreachable_or_refusing(server, tmp_path, capsys):
    prom = FakeServer()
    url = prom.url
    prom.routes["/api/v1/query_range"] = (400, b'{"status": "error", "error": "parse error"}')
    assert _report(server, tmp_path / "r", "--prometheus", url) == report.EXIT_PROMETHEUS
    assert f"Prometheus at {url} answered 400" in _error_line(capsys)
    prom.close()
    assert _report(server, tmp_path / "r", "--prometheus", url) == report.EXIT_PROMETHEUS
    assert f"cannot reach Prometheus at {url}" in _error_line(capsys)


def test_bad_since_is_a_usage_error(server, tmp_path, capsys):
    assert _report(server, tmp_path / "r", "--prometheus", server.url, "--since", "soon") == report.EXIT_USAGE
    assert "--since" in _error_line(capsys)


def test_the_osprey_command_line(server, tmp_path):
    """The real entry point in a process of its own: exit status and one line on stderr."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "server.cli", "monitor", "report", "digits_cnn", "--url", server.url,
           "--out", str(out), "--token", TOKEN]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out / "index.html") and (out / "index.html").exists()
    bad = subprocess.run(cmd[:-1] + ["wrong"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == report.EXIT_AUTH
    assert bad.stderr.count("\n") == 1 and "401" in bad.stderr


def test_a_second_report_replaces_its_plots_and_nothing_else(server, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "mine.png").write_bytes(PNG_MAGIC)
    (out / "feature-07-gone.png").write_bytes(PNG_MAGIC)  # a plot of an earlier report
    assert _report(server, out) == 0
    names = {p.name for p in out.glob("*.png")}
    assert "mine.png" in names and "feature-07-gone.png" not in names
    assert set(_pngs_of(out / "index.html")) == names - {"mine.png"}
