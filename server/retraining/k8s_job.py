"""A retraining job as a Kubernetes Job: deploy/kubernetes/retraining-job.yaml filled in for one job.

``osprey jobs k8s-manifest ID`` reads the job from the management API and prints the manifest:
a ConfigMap holding the job's spec and a Job running the one-job entry point
(``python -m server.retraining.child --spec``), both named ``osprey-retrain-{ID}``, so a second
``kubectl create`` of the same job is refused. The template's variables are envsubst's
``${NAME}`` (string.Template), so it can be filled in by hand as well.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from server.retraining.jobs import JobRecord
from server.retraining.queue import work_dir_for
from server.retraining.runner import remote_spec

__all__ = ["TEMPLATE", "render_job", "job_name"]

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "retraining-job.yaml"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


def job_name(job_id: str) -> str:
    name = f"osprey-retrain-{job_id}"
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ValueError(f"job id {job_id!r} does not make a Kubernetes name (lowercase letters, digits, '-')")
    return name


def render_job(record: JobRecord, image: str, claim: str, template: Path | str | None = None) -> str:
    """The manifest for this job (ValueError naming a bad id, image, claim or a record without a model store)."""
    job_name(record.id)
    if not _IMAGE.match(image or ""):
        raise ValueError(f"--image {image!r} is not a container image reference")
    if not _DNS_LABEL.match(claim or "") or len(claim) > 253:
        raise ValueError(f"--claim {claim!r} is not a PersistentVolumeClaim name")
    store = record.params.get("model_store")
    if not isinstance(store, str) or not store.startswith("/"):
        raise ValueError(f"job {record.id} names no absolute model_store in its params (got {store!r})")
    spec = remote_spec(record, work_dir_for(store, record.id), store)
    text = Path(template or TEMPLATE).read_text()
    return string.Template(text).substitute(JOB_ID=record.id, IMAGE=image, MODEL_STORE=store,
                                            MODEL_STORE_CLAIM=claim, SPEC=json.dumps(spec, separators=(",", ":")))
