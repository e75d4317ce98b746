"""The Kubernetes Job template (deploy/kubernetes/retraining-job.yaml) filled in for a job, the
one-job entry point it runs (``python -m server.retraining.child --spec``), and the settings
that send jobs to Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from server.retraining.child import EVENT_MARK
from server.retraining.jobs import JobRecord
from server.retraining.k8s_job import TEMPLATE, render_job
from server.retraining.queue import new_record, work_dir_for
from server.retraining.ray_runner import submission_id
from server.settings import load_settings

from ..conftest import ROOT


def _record(store: str = "/srv/osprey/model_store", **params) -> JobRecord:
    return new_record("digits", "1.0", "drift", "drift:1",
                      {"model_store": store, "management_url": "http://osprey:8081", **params})


def test_the_template_renders_a_configmap_and_a_job_named_by_the_job_id():
    record = _record()
    record.add_log("a log line the spec leaves out")
    docs = list(yaml.safe_load_all(render_job(record, "ghcr.io/acme/osprey:1.2", "osprey-models")))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    config, job = docs
    name = f"osprey-retrain-{record.id}"
    assert config["metadata"]["name"] == job["metadata"]["name"] == name
    assert job["metadata"]["labels"]["osprey.dev/job-id"] == record.id
    spec = json.loads(config["data"]["spec.json"])
    assert spec["record"]["id"] == record.id and spec["record"]["params"] == record.params
    assert spec["record"]["log_tail"] == [] and spec["model_store"] == "/srv/osprey/model_store"
    assert spec["work_dir"] == str(work_dir_for("/srv/osprey/model_store", record.id))
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/acme/osprey:1.2"
    assert container["command"] == ["python", "-m", "server.retraining.child", "--spec", "/etc/osprey-job/spec.json"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"spec": "/etc/osprey-job", "model-store": "/srv/osprey/model_store"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spec"]["configMap"]["name"] == name
    assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == "osprey-models"
    assert pod["restartPolicy"] == "Never"


@pytest.mark.parametrize("change, error", [
    ({"image": "not an image"}, "--image"),
    ({"claim": "Bad_Claim"}, "--claim"),
    ({"store": "relative/store"}, "model_store"),
    ({"job_id": "UPPER"}, "Kubernetes name"),
])
def test_bad_values_are_refused_naming_them(change, error):
    record = _record(change.get("store", "/srv/store"))
    if "job_id" in change:
        record.id = change["job_id"]
    with pytest.raises(ValueError, match=error):
        render_job(record, change.get("image", "osprey:1"), change.get("claim", "models"))


def test_the_entry_point_runs_the_spec_the_job_carries(tmp_path):
    """The Job's command on the spec from its ConfigMap: the task runs in its emptied work folder
    and its events are marked lines among its log on stdout."""
    store = tmp_path / "store"
    record = _record(str(store), task="tests.retraining_tasks:record", dir=str(tmp_path / "m"))
    docs = list(yaml.safe_load_all(render_job(record, "osprey:1", "models")))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(docs[0]["data"]["spec.json"])
    work = work_dir_for(store, record.id)
    work.mkdir(parents=True)
    (work / "left-by-a-dead-run").write_text("x")
    done = subprocess.run([sys.executable, "-m", "server.retraining.child", "--spec", str(spec_file)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line[len(EVENT_MARK):]) for line in done.stdout.splitlines() if line.startswith(EVENT_MARK)]
    assert {"progress": 0.5, "message": "half way"} in events
    assert events[-1]["result"]["state"] == "succeeded" and events[-1]["result"]["challenger"] == "2.0"
    assert "printed by the job" in done.stderr
    assert not (work / "left-by-a-dead-run").exists() and (work / "partial.txt").exists()
    [run] = [json.loads(line) for line in (tmp_path / "m" / "runs.jsonl").read_text().splitlines()]
    assert run["cwd"] == str(work)


def test_a_missing_spec_file_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "server.retraining.child", "--spec", str(tmp_path / "nope.json")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0 and "cannot read the job spec" in done.stderr and "nope.json" in done.stderr


def test_the_template_ships_and_has_only_the_documented_variables():
    import re

    names = set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text()))
    assert names == {"JOB_ID", "IMAGE", "MODEL_STORE", "MODEL_STORE_CLAIM", "SPEC"}


def test_ray_submission_ids_are_the_job_id_then_one_per_retry():
    record = _record()
    assert submission_id(record) == record.id
    record.add_step("worker lost", "rerun: follows the same Ray job")
    assert submission_id(record) == record.id
    record.add_step("retry", "attempt 1 failed")
    assert submission_id(record) == f"{record.id}-retry1"


@pytest.mark.parametrize("env, error", [
    ({"OSPREY_RETRAINING_EXECUTOR": "spark"}, "must be local or ray"),
    ({"OSPREY_RETRAINING_EXECUTOR": "ray"}, "needs ray_address"),
    ({"OSPREY_RETRAINING_EXECUTOR": "ray", "OSPREY_RAY_ADDRESS": "ftp://x"}, "ftp://x"),
    ({"OSPREY_RAY_RUNTIME_ENV": "{not json"}, "ray_runtime_env is not JSON"),
    ({"OSPREY_RAY_RUNTIME_ENV": "[1]"}, "must be a JSON object"),
    ({"OSPREY_RAY_POLL_INTERVAL": "0"}, "ray_poll_interval"),
])
def test_bad_ray_settings_are_refused_naming_them(env, error):
    with pytest.raises(ValueError, match=error):
        load_settings(env=env)


def test_ray_settings_load():
    s = load_settings(env={"OSPREY_RETRAINING_EXECUTOR": "ray", "OSPREY_RAY_ADDRESS": "http://127.0.0.1:8265",
                           "OSPREY_RAY_RUNTIME_ENV": '{"env_vars": {"A": "1"}}'})
    assert (s.retraining_executor, s.ray_address, s.ray_python) == ("ray", "http://127.0.0.1:8265", "python3")
