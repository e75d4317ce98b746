"""The shipped monitoring files: promtool accepts the config and rules, the rule unit tests
pass, and the Grafana dashboard has the panels and selectors operators need."""

from __future__ import annotations

import json
import subprocess

from tests.prometheus_helpers import DASHBOARD, PROM_DIR, dashboard_exprs, metric_names_in, require


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)


def test_promtool_check_config():
    r = _promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout


def test_promtool_check_rules():
    r = _promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("OspreyLatencyP99AboveObjective", "OspreyHighErrorRatio", "OspreyQueueSaturated",
                 "OspreyModelNotReady", "OspreyInstanceRestarted", "OspreyGarbageCollectorPausing",
                 "OspreyDriftDetected", "OspreyQualityDegraded"):
        assert f"alert: {name}" in (PROM_DIR / "alerts.yml").read_text()


def test_promtool_test_rules():
    r = _promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path):
    """The rule tests can fail: expect the rejection alert for the model that rejects nothing."""
    (tmp_path / "alerts.yml").write_text((PROM_DIR / "alerts.yml").read_text())
    wrong = (PROM_DIR / "alerts_test.yml").read_text().replace(
        'summary: "Model busy version 1: requests refused', 'summary: "Model calm version 1: requests refused')
    (tmp_path / "alerts_test.yml").write_text(wrong)
    r = subprocess.run([require("promtool"), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def _rule_tests_with(tmp_path, old: str, new: str) -> subprocess.CompletedProcess:
    rules = (PROM_DIR / "alerts.yml").read_text()
    assert old in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    (tmp_path / "alerts_test.yml").write_text((PROM_DIR / "alerts_test.yml").read_text())
    return subprocess.run([require("promtool"), "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_drift_and_quality_rule_tests_catch_a_rule_per_replica(tmp_path):
    """The drift test has two replicas exporting one version's status: a rule without
    ``max by (model, version)`` fires once per replica and the tests say so."""
    r = _rule_tests_with(tmp_path, "max by (model, version) (osprey_drift_detected) == 1", "osprey_drift_detected == 1")
    assert r.returncode != 0 and "OspreyDriftDetected" in r.stdout + r.stderr


def test_drift_rule_tests_catch_a_missing_for(tmp_path):
    """Without its ``for`` the drift alert fires on the one-minute blip and while pending: the tests fail."""
    rules = (PROM_DIR / "alerts.yml").read_text()
    start = rules.index("- alert: OspreyDriftDetected")
    end = rules.index("for: 2m", start)
    r = _rule_tests_with(tmp_path, rules[start:end + len("for: 2m")], rules[start:end].rstrip())
    assert r.returncode != 0 and "OspreyDriftDetected" in r.stdout + r.stderr


def test_quality_rule_tests_catch_a_rule_that_never_resolves(tmp_path):
    r = _rule_tests_with(tmp_path, "max by (model, version) (osprey_quality_degraded) == 1",
                         "max_over_time(osprey_quality_degraded[1h]) == 1")
    assert r.returncode != 0 and "OspreyQualityDegraded" in r.stdout + r.stderr


def _all_panels(panels):
    for p in panels:
        yield p
        yield from _all_panels(p.get("panels", []))


def test_dashboard_has_the_panels_and_selectors():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["model"]["type"] == "query" and "osprey_model_info" in variables["model"]["definition"]
    assert "$model" in variables["version"]["definition"]
    panels = list(_all_panels(dash["panels"]))
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "error rate", "end-to-end latency", "queue wait", "handler stages",
                  "batch size distribution", "queue depth", "rejections", "instances ready", "cpu",
                  "memory", "gpu memory", "gpu utilization"):
        assert topic in titles, f"no panel about {topic}"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # room for drift / accuracy / retraining: a collapsed row holding a placeholder
    rows = [p for p in dash["panels"] if p["type"] == "row" and p.get("collapsed")]
    assert any("drift" in r["title"].lower() and r["panels"] for r in rows)
    exprs = dashboard_exprs(dash)
    for title, expr in exprs:
        assert expr.strip(), f"panel {title!r} has an empty query"
        names = metric_names_in(expr)
        assert names and all(n.startswith(("osprey_", "ts_", "process_")) for n in names), (title, names)
        if any(n.startswith("osprey_") and "gpu" not in n and not n.startswith("osprey_gc_") for n in names):  # per-model metrics
            assert '$model' in expr, f"panel {title!r} ignores the model selector: {expr}"
    # p50 / p95 / p99 for each latency stage
    for metric in ("osprey_request_duration_seconds", "osprey_queue_wait_seconds", "osprey_stage_duration_seconds"):
        qs = {e.split(",", 1)[0] for _, e in exprs if metric + "_bucket" in e and e.startswith("histogram_quantile")}
        assert qs == {"histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99"}, metric


def test_metric_names_in_promql():
    assert metric_names_in('histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{model=~"$m"}[5m])))') == {"a_bucket"}
    assert metric_names_in('sum(rate(x_total{code=~"5.."}[1m])) / sum(rate(y_total[1m])) > 0.05') == {"x_total", "y_total"}
    assert metric_names_in('max by (model) (q) > on (model) group_left max by (model) (o) / 1e6') == {"q", "o"}
