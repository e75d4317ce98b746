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
                 "OspreyDriftDetected", "OspreyQualityDegraded", "OspreyRetrainingJobFailed",
                 "OspreyRetrainingJobStuck", "OspreyRetrainingJobNotStarted", "OspreyModelRolledBack",
                 "OspreyDefaultVersionChanged"):
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


def test_failed_job_rule_tests_catch_a_rule_that_misses_the_first_failure(tmp_path):
    """increase() of osprey_retraining_jobs_total sees nothing when a model's first job fails
    (the series appears already at 1): the rule tests say so."""
    r = _rule_tests_with(
        tmp_path,
        'time() - max by (model) (osprey_retraining_last_finished_timestamp_seconds{result="failed"}) < 3600',
        'max by (model) (increase(osprey_retraining_jobs_total{result="failed"}[1h])) > 0')
    assert r.returncode != 0 and "OspreyRetrainingJobFailed" in r.stdout + r.stderr


def test_default_version_rule_tests_catch_a_notice_for_new_models(tmp_path):
    """Without the `and on (model) ... offset 15m` a new model (or a fresh Prometheus) reads as a change."""
    r = _rule_tests_with(
        tmp_path,
        "\n          and on (model) max by (model) (osprey_model_default_version_info offset 15m)", "")
    assert r.returncode != 0 and "OspreyDefaultVersionChanged" in r.stdout + r.stderr


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
                  "memory", "gpu memory", "gpu utilization", "drift detected per version",
                  "top drift scores by feature", "drift episodes", "monitored requests", "feedback rate by result",
                  "live quality", "retraining jobs by result", "retraining jobs queued and running",
                  "retraining job duration", "default version", "canary traffic share", "shadow results"):
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


def _drift_row_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query in the drift / accuracy row."""
    dash = json.loads(DASHBOARD.read_text())
    row = next(p for p in dash["panels"] if p["type"] == "row" and "drift" in p["title"].lower())
    return [(p["title"], t["refId"], t["expr"]) for p in row["panels"] for t in p.get("targets", [])]


# Series shaped as the Monitor exports them (monitoring-plan.md): digits_cnn 1.0 drifts on two
# replicas sharing state (same gauges, same episode counter), digits_cnn 2.0 does not, "other" is
# not selected by $model.
DRIFT_ROW_SERIES = [
    ('osprey_drift_detected{model="digits_cnn", version="1.0", instance="a"}', "0 0 1 1 1 1 1 1 1 1 1"),
    ('osprey_drift_detected{model="digits_cnn", version="1.0", instance="b"}', "0 0 1 1 1 1 1 1 1 1 1"),
    ('osprey_drift_detected{model="digits_cnn", version="2.0", instance="a"}', "0x10"),
    ('osprey_drift_detected{model="other", version="1", instance="a"}', "1x10"),
    ('osprey_drift_episodes_total{model="digits_cnn", version="1.0", instance="a"}', "0+1x10"),
    ('osprey_drift_episodes_total{model="digits_cnn", version="1.0", instance="b"}', "0+1x10"),
    ('osprey_monitored_requests_total{model="digits_cnn", version="1.0", instance="a"}', "0+600x10"),
    ('osprey_monitored_requests_total{model="digits_cnn", version="1.0", instance="b"}', "0+300x10"),
    ('osprey_requests_total{model="digits_cnn", version="1.0", protocol="rest", code="200", instance="a"}',
     "0+1200x10"),
    ('osprey_requests_total{model="digits_cnn", version="1.0", protocol="rest", code="500", instance="a"}',
     "0+60x10"),
    ('osprey_feedback_total{model="digits_cnn", version="1.0", result="matched", instance="a"}', "0+120x10"),
    ('osprey_feedback_total{model="digits_cnn", version="1.0", result="matched", instance="b"}', "0+60x10"),
    ('osprey_feedback_total{model="digits_cnn", version="1.0", result="unmatched", instance="a"}', "0+6x10"),
    ('osprey_feedback_total{model="digits_cnn", version="1.0", result="invalid", instance="a"}', "0x10"),
    ('osprey_quality{model="digits_cnn", version="1.0", metric="accuracy", instance="a"}', "0.75x10"),
    ('osprey_quality{model="digits_cnn", version="1.0", metric="accuracy", instance="b"}', "0.75x10"),
    ('osprey_quality{model="digits_cnn", version="1.0", metric="f1", instance="a"}', "0.5x10"),
    ('osprey_quality_degraded{model="digits_cnn", version="1.0", instance="a"}', "1x10"),
    ('osprey_quality_degraded{model="digits_cnn", version="2.0", instance="a"}', "0x10"),
    *[(f'osprey_drift_score{{model="digits_cnn", version="1.0", feature="f{i}", instance="{inst}"}}', f"{i / 16}x10")
      for i in range(12) for inst in ("a", "b")],
    ('osprey_drift_score{model="other", version="1", feature="x", instance="a"}', "5x10"),
]

V1 = 'model="digits_cnn", version="1.0"'
V2 = 'model="digits_cnn", version="2.0"'
# (panel title, refId) -> [(labels, value)] at 10m: one series per version (max over replicas for
# shared state, sum for per-replica counts), the top 10 features, nothing of "other".
DRIFT_ROW_EXPECTED = {
    ("Drift detected per version", "A"): [(V1, 1), (V2, 0)],
    ("Drift episodes opened", "A"): [(V1, 2)],  # increase over [2m]: one episode a minute
    ("Top drift scores by feature", "A"): [(f'{V1}, feature="f{i}"', i / 16) for i in range(2, 12)],
    ("Monitored requests rate", "A"): [(V1, 15)],
    ("Monitored requests rate", "B"): [(V1, 20)],
    ("Feedback rate by result", "A"): [(f'{V1}, result="matched"', 3), (f'{V1}, result="unmatched"', 0.1),
                                       (f'{V1}, result="invalid"', 0)],
    ("Live quality vs degraded", "A"): [(f'{V1}, metric="accuracy"', 0.75), (f'{V1}, metric="f1"', 0.5)],
    ("Live quality vs degraded", "B"): [(V1, 1), (V2, 0)],
}


def _promtool_row(tmp_path, targets, expected, series) -> None:
    """promtool evaluates each query of a dashboard row (Grafana's variables filled in) on
    ``series`` and must find ``expected[(title, refId)]`` for every one."""
    tests = []
    for title, ref, expr in targets:
        concrete = (expr.replace('"$model"', '"digits_cnn"').replace('"$version"', '".*"')
                    .replace("$__rate_interval", "2m"))
        tests.append({"expr": concrete, "eval_time": "10m",
                      "exp_samples": [{"labels": "{" + labels + "}", "value": value}
                                      for labels, value in expected[(title, ref)]]})
    (tmp_path / "empty.yml").write_text("groups: []\n")
    (tmp_path / "row_test.yml").write_text(json.dumps({
        "rule_files": ["empty.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                   "promql_expr_test": tests}]}))
    r = subprocess.run([require("promtool"), "test", "rules", "row_test.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_drift_row_queries_give_one_series_per_version_on_monitor_shaped_series(tmp_path):
    """promtool evaluates each drift-row query (Grafana's variables filled in) on series shaped as
    the Monitor exports them; every query of the row has an expectation."""
    targets = _drift_row_targets()
    assert {(title, ref) for title, ref, _ in targets} == set(DRIFT_ROW_EXPECTED)
    _promtool_row(tmp_path, targets, DRIFT_ROW_EXPECTED, DRIFT_ROW_SERIES)


# Series shaped as the server exports them: two replicas reading the same job records (same
# job families), each with its own routing (digits_cnn: canary 2.0 at 20%, shadow 3.0 on
# replica a only); "other" is not selected by $model.
RETRAINING_ROW_SERIES = [
    *[(f'osprey_retraining_jobs_total{{model="digits_cnn", trigger="drift", result="{r}", instance="{i}"}}', v)
      for r, v in (("succeeded", "1x10"), ("rejected", "0 1 2 2 2 2 2 2 2 2 2")) for i in "ab"],
    *[(f'osprey_retraining_jobs{{model="digits_cnn", state="{s}", instance="{i}"}}', v)
      for s, v in (("queued", "0x10"), ("running", "1x10")) for i in "ab"],
    *[(f'osprey_retraining_job_duration_seconds_{k}{{model="digits_cnn", result="rejected", instance="{i}"}}', v)
      for k, v in (("sum", "50x10"), ("count", "2x10")) for i in "ab"],
    ('osprey_retraining_jobs_total{model="other", trigger="manual", result="failed", instance="a"}', "3x10"),
    ('osprey_model_default_version_info{model="digits_cnn", version="1.0", instance="a"}', "1x10"),
    ('osprey_model_default_version_info{model="digits_cnn", version="1.0", instance="b"}', "1x10"),
    ('osprey_model_default_version_info{model="other", version="1", instance="a"}', "1x10"),
    ('osprey_traffic_share{model="digits_cnn", version="1.0", instance="a"}', "0.8x10"),
    ('osprey_traffic_share{model="digits_cnn", version="2.0", instance="a"}', "0.2x10"),
    ('osprey_traffic_share{model="digits_cnn", version="1.0", instance="b"}', "0.8x10"),
    ('osprey_traffic_share{model="digits_cnn", version="2.0", instance="b"}', "0.2x10"),
    ('osprey_shadow_requests_total{model="digits_cnn", version="3.0", result="agree", instance="a"}', "0+120x10"),
    ('osprey_shadow_requests_total{model="digits_cnn", version="3.0", result="disagree", instance="a"}', "0+6x10"),
    ('osprey_shadow_requests_total{model="digits_cnn", version="3.0", result="agree", instance="b"}', "0+60x10"),
]
D = 'model="digits_cnn"'
RETRAINING_ROW_EXPECTED = {
    ("Retraining jobs by result", "A"): [(f'{D}, trigger="drift", result="succeeded"', 1),
                                         (f'{D}, trigger="drift", result="rejected"', 2)],
    ("Retraining jobs queued and running", "A"): [(f'{D}, state="queued"', 0), (f'{D}, state="running"', 1)],
    ("Retraining job duration (mean of the jobs kept), by result", "A"): [(f'{D}, result="rejected"', 25)],
    ("Default version", "A"): [(f'{D}, version="1.0"', 1)],
    ("Canary traffic share", "A"): [(f'{D}, version="1.0"', 0.8), (f'{D}, version="2.0"', 0.2)],
    ("Shadow results", "A"): [(f'{D}, version="3.0", result="agree"', 3), (f'{D}, version="3.0", result="disagree"', 0.1)],
}


def test_retraining_row_queries_give_one_series_per_model_on_server_shaped_series(tmp_path):
    """promtool evaluates each retraining-row query (Grafana's variables filled in): job
    families once per model however many replicas report them, routing per version."""
    dash = json.loads(DASHBOARD.read_text())
    row = next(p for p in dash["panels"] if p["type"] == "row" and p["title"].lower().startswith("retraining"))
    assert row.get("collapsed") and row["panels"]
    targets = [(p["title"], t["refId"], t["expr"]) for p in row["panels"] for t in p.get("targets", [])]
    assert {(title, ref) for title, ref, _ in targets} == set(RETRAINING_ROW_EXPECTED)
    _promtool_row(tmp_path, targets, RETRAINING_ROW_EXPECTED, RETRAINING_ROW_SERIES)
