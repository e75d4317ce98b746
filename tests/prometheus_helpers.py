"""A real Prometheus server for tests, and the PromQL helpers the tests share."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port

__all__ = ["PrometheusProcess", "require", "metric_names_in", "scraped_sample_names", "dashboard_exprs", "samples", "sample_value",
           "DASHBOARD", "PROM_DIR"]

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "grafana" / "osprey-dashboard.json"
PROM_DIR = ROOT / "monitoring" / "prometheus"


def require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package prometheus)")
    return path


class PrometheusProcess:
    """``prometheus`` on a free loopback port scraping ``targets`` every ``interval``."""

    def __init__(self, workdir: Path, targets: list[str], interval: str = "1s"):
        binary = require("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: osprey\n"
            f"    scrape_interval: {interval}\n"
            f"    scrape_timeout: {interval}\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready:\n{self.log_path.read_text()}")

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400 carries the PromQL error
            return json.loads(exc.read())

    def query(self, expr: str) -> list:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, predicate, timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(expr)
            if value is not None and predicate(value):
                return value
            time.sleep(0.25)
        raise AssertionError(f"{expr} never satisfied the condition; last value {value}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                 "bool", "offset", "inf", "nan", "le"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, keywords removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+(e\d+)?", word) or e[max(m.start() - 1, 0)].isdigit():
            continue
        names.add(word)
    return names


def scraped_sample_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p.get("title", ""), t.get("expr", "")))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


def samples(metrics_base: str, name: str) -> list[tuple[dict, float]]:
    """Every sample ``name`` on a server's metrics port as (labels, value), read with
    prometheus_client's own parser of the text format."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{metrics_base}/metrics", timeout=30).text
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def sample_value(metrics_base: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name{labels}`` on a server's metrics port (None when absent)."""
    return next((value for got, value in samples(metrics_base, name) if got == labels), None)
