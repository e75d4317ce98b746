"""One retraining job, from labelled data to a new default version: the task a worker runs.

``run(job)`` (the default ``task`` of every retraining job) in steps, each a line in the job
record:

1. **champion**: the version the trigger named, its archive from the model store (as the
   server registered it) and its ``retraining:`` settings;
2. **data**: the labelled production rows the monitor kept (``monitoring.dataset``); fewer
   than ``min_labels``: the job ends ``rejected`` saying how many there are; a share
   (``holdout``) is held back for the gate, never seen by training or the search;
3. **training**: the archive's entry point (``train(ctx)``), or the best of a bounded search;
4. **gate**: the challenger is packaged in the job's folder and scored against the champion on
   the held-back rows and the golden set, plus latency and size (``server.retraining.gate``);
   failing: ``rejected`` with the numbers, nothing changes in serving;
5. **publish**: the archive moves into the model store (``MODEL-vVERSION-JOB.mar``, one
   atomic rename) and is registered beside the champion through the management API;
6. **promotion**: canary, shadow or direct, then probation (``server.retraining.promotion``).

Reruns (a worker killed mid-job): a version this job registered before and that is not the
default is unregistered first, and the job's folder is fresh, so a dead run leaves no
half-registered version behind. Cancelled (SIGTERM to the job's process): a challenger in
canary or shadow is taken out of traffic before the process ends.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import zlib
from pathlib import Path
from typing import Any

from server.core.model_config import parse_model_config
from server.core.retraining_config import TOO_FEW_LABELS, RetrainingConfig
from server.retraining.client import ApiError, ServerClient
from server.retraining.promotion import promote
from server.state import store_writable

__all__ = ["run", "published_name"]


class Cancelled(BaseException):
    """SIGTERM: the job was cancelled (or its worker is stopping)."""


def published_name(model: str, version: str, job_id: str) -> str:
    return f"{model}-v{version}-{job_id[:12]}.mar"


def _archive_path(model_store: Path, url: str) -> Path:
    p = Path(url)
    return p if p.is_absolute() else model_store / url


def _quality_reader(client: ServerClient, model: str, metric: str | None, min_labels: int, log=lambda line: None):
    def quality(version: str) -> float | None:
        try:
            status = client.monitoring(model, version) or {}
        except ApiError as exc:  # loud: the job's log, then its error (the promotion stops)
            log(f"ERROR {exc}")
            raise
        q = status.get("quality") or {}
        if not q or int(q.get("window", {}).get("labels") or 0) < min_labels:
            return None
        metrics = q.get("metrics") or {}
        name = metric if metric in metrics else next(iter(metrics), None)
        value = metrics.get(name) if name else None
        return float(value) if isinstance(value, (int, float)) else None
    return quality


def run(job: Any) -> dict[str, Any]:
    def on_term(signum, frame):
        raise Cancelled()
    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (an in-process test runner): cancel then kills
        pass
    from monitoring.dataset import read_rows
    from server.retraining.data import split_rows, usable_rows
    from server.retraining.gate import evaluate
    from server.retraining.package import next_version, stage, write_version
    from server.retraining.serving import LoadedModel
    from server.retraining.training import run_training

    p, rec = job.params, job.record
    model, champion = rec.model, rec.version
    store = Path(p["model_store"])
    client = ServerClient(p["management_url"], p.get("inference_url"), *_tokens(p))

    # 1. champion ------------------------------------------------------------------------------
    described = client.versions(model)
    by_version = {str(d.get("modelVersion")): d for d in described}
    if champion not in by_version:
        return {"state": "failed", "message": f"version {champion} of {model} is no longer registered"}
    # a dead run of this job may have registered its challenger: take it out (unless it is serving)
    default = str(client.traffic(model).get("default") or champion)  # describe does not say which is the default
    mine = {v for v, d in by_version.items() if rec.id[:12] in str(d.get("modelUrl", ""))}
    if default in mine:  # an earlier run got as far as promoting (it died in probation): that stands
        job.step("done earlier", f"{model} {default}, registered by an earlier run of this job, is the default")
        return {"state": "succeeded", "challenger": default,
                "message": f"{model} {default} is the default (promoted by an earlier run of this job)"}
    for v, d in list(by_version.items()):
        url = str(d.get("modelUrl", ""))
        if v in mine:
            job.step("cleanup", f"unregistering {v} and removing {Path(url).name}, left by an earlier run of this job")
            client.set_traffic(model, None)
            client.unregister(model, v)
            _archive_path(store, url).unlink(missing_ok=True)
            del by_version[v]  # its version number is free again
    archive = _archive_path(store, str(by_version[champion]["modelUrl"]))
    cfg = _retraining_of(archive)
    job.step("champion", f"{model} {champion} from {archive.name}")
    read_only = store_writable(store)  # before any training: the new version could not be published
    if read_only is not None:
        return {"state": "failed", "message": _read_only_message(store, read_only)}
    job.progress(0.05, "champion found")

    # 2. data ----------------------------------------------------------------------------------
    redis = None
    if p.get("redis_url"):
        import redis as redis_lib

        redis = redis_lib.Redis.from_url(p["redis_url"])
    rows = read_rows(model, root=store, redis=redis, state_dir=p.get("state_dir") or None)
    if len(rows) >= cfg.min_labels:  # (too few already: refused below without loading the model)
        with LoadedModel(archive) as loaded:  # what labels the champion takes (task, classes, one per example)
            task, classes, counts = loaded.task, loaded.classes, loaded.example_counts(rows)
        rows, dropped = usable_rows(rows, task, classes, counts)
        if dropped:
            job.step("data", f"left out {len(dropped)} row(s) whose label {model} cannot take, e.g. {dropped[0]}")
    if len(rows) < cfg.min_labels:
        return {"state": "rejected", "reason": TOO_FEW_LABELS, "labels": len(rows), "min_labels": cfg.min_labels,
                "message": f"{len(rows)} labelled production rows for {model}; "
                           f"retraining needs min_labels {cfg.min_labels}"}
    seed = zlib.crc32(rec.id.encode())
    train_rows, holdout = split_rows(rows, cfg.holdout, seed=seed)
    job.step("data", f"{len(rows)} labelled rows: {len(train_rows)} for training, {len(holdout)} held out for the gate")
    job.progress(0.1, "data ready")

    # 3. training ------------------------------------------------------------------------------
    result = run_training(archive, train_rows, job.work_dir / "train", config=cfg, seed=seed,
                          progress=lambda f, m="": job.progress(0.1 + 0.6 * float(f), m or "training"),
                          log=job.log)
    job.step("training", f"{result.entry_point}: weights {Path(result.weights).name}"
             + (f", validation {result.metrics}" if result.metrics else ""))

    # 4. gate ----------------------------------------------------------------------------------
    job.progress(0.75, "gate")
    staged = stage(archive, result.weights, job.work_dir / "challenger", config_overrides=result.config,
                   reference=result.reference, files=result.files)
    verdict = evaluate(archive, staged, holdout, None, cfg.gate, log=job.log)
    numbers = verdict.numbers
    if not verdict.passed:
        job.step("gate failed", "; ".join(verdict.reasons))
        return {"state": "rejected", "gate": numbers, "message": "gate: " + "; ".join(verdict.reasons)}
    job.step("gate passed", _gate_line(numbers))
    new_version = next_version(champion, taken=by_version)
    candidate = write_version(archive, result.weights, new_version,
                              job.work_dir / published_name(model, new_version, rec.id), result.config,
                              metrics=(numbers.get("holdout") or {}).get("challenger"), reference=result.reference,
                              files=result.files, log=job.log)

    # 5. publish -------------------------------------------------------------------------------
    target = store / candidate.name
    try:
        _publish(candidate, target)
    except OSError as exc:
        return {"state": "failed", "gate": numbers, "message": _read_only_message(store, exc)}
    job.progress(0.85, "registering")
    try:
        client.register_challenger(rec.id, target.name)
    except ApiError as exc:
        return {"state": "failed", "gate": numbers, "message": f"the challenger did not register: {exc}"}
    job.step("registered", f"{model} {new_version} from {target.name}")

    # 6. promotion ----------------------------------------------------------------------------
    metric = numbers.get("metric")
    try:
        out = promote(client, model, champion, new_version, cfg.promotion, step=job.step,
                      quality=_quality_reader(client, model, metric, max(cfg.promotion.min_requests // 4, 20),
                                              log=job.log),
                      cancelled=job.cancelled)
    except Cancelled:
        _take_out(client, model, new_version)
        raise
    except ApiError:  # e.g. live quality unreadable: the job fails with that error; serving as it was
        if not _is_default(client, model, new_version):
            _take_out(client, model, new_version)
        raise
    numbers = {**numbers, "promotion": out.numbers}
    if out.result == "rejected":
        _take_out(client, model, new_version)
        return {"state": "rejected", "gate": numbers, "challenger": new_version,
                "message": f"{cfg.promotion.policy}: " + "; ".join(out.reasons)}
    if out.result == "rolled_back":
        return {"state": "rejected", "gate": numbers, "challenger": new_version,
                "message": "rolled back in probation: " + "; ".join(out.reasons)}
    job.progress(1.0, "promoted")
    return {"state": "succeeded", "gate": numbers, "challenger": new_version,
            "message": f"{model} {new_version} is the default"}


def _tokens(params: dict) -> tuple[str | None, str | None]:
    """(management, inference) keys: read now (keys can be rotated after the job was queued)
    from the server's key file (a job on the server's host), else from Redis where the servers
    share supplied keys (a worker elsewhere), else as given."""
    path = params.get("key_file")
    if path:
        import json

        try:
            keys = json.loads(Path(path).read_text())
            return keys["management"]["key"], keys["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if params.get("redis_url"):
        from server.core.shared_keys import RedisKeyStore

        store = RedisKeyStore(params["redis_url"], timeout=5.0)
        try:
            shared = store.read()
        except Exception:  # Redis unreachable: the calls below fail naming the server if a key was needed
            shared = None
        finally:
            store.close()
        if shared is not None:
            return shared["management"], shared["inference"]
    return params.get("token"), params.get("inference_token")


def _retraining_of(archive: Path) -> RetrainingConfig:
    """The archive's retraining settings (defaults when its model-config has no section)."""
    from server.core.archive import open_archive

    opened = open_archive(archive)
    try:
        return parse_model_config(opened.config).retraining or RetrainingConfig()
    finally:
        opened.cleanup()


def _gate_line(numbers: dict) -> str:
    held = numbers.get("holdout") or {}
    metric = numbers.get("metric", "metric")
    champ, chal = (held.get("champion") or {}).get(metric), (held.get("challenger") or {}).get(metric)
    return f"{metric} on fresh held-out rows {champ} -> {chal}" if champ is not None else "passed"


def _is_default(client: ServerClient, model: str, version: str) -> bool:
    try:
        return str(client.traffic(model).get("default")) == version
    except ApiError:
        return False


def _publish(candidate: Path, target: Path) -> None:
    """The archive into the model store under its final name, all at once: one rename when the
    job's folder is on the store's filesystem (the default state_dir), else a copy beside the
    target and a rename."""
    try:
        os.replace(candidate, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(candidate, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    candidate.unlink(missing_ok=True)


def _read_only_message(store: Path, exc: OSError) -> str:
    return (f"the model store {store} is not writable ({exc.strerror or exc}): retraining publishes the new "
            "version into the model store, so it needs the store writable (mount it read-write where the servers "
            "and the retraining worker run); serving from a read-only store works")


def _take_out(client: ServerClient, model: str, version: str) -> None:
    try:
        client.set_traffic(model, None)
        client.set_shadow(model, None)
        client.unregister(model, version)
    except ApiError:
        pass
