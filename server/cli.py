"""The ``osprey`` command: serve, stop, package, profile, examples, monitor report, rollback, worker, jobs."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_PID_FILE = os.path.join(tempfile.gettempdir(), ".osprey.pid")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve models over REST and gRPC")
    p.add_argument("--model-store", help="folder holding model archives")
    p.add_argument("--workflow-store", help="folder holding workflow archives (.war; default: the model store)")
    p.add_argument("--models", nargs="+", default=[], metavar="NAME=FILE",
                   help="models to load at startup: NAME=FILE, FILE or 'all'")
    p.add_argument("--ts-config", "--config", dest="ts_config", help="TorchServe config.properties")
    p.add_argument("--disable-token-auth", action="store_true", default=None, help="serve without token authorization")
    p.add_argument("--enable-model-api", action="store_true", default=None, help="allow register/unregister over HTTP")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground (default: start in the background)")
    p.add_argument("--inference-address", help="e.g. http://127.0.0.1:8080")
    p.add_argument("--management-address")
    p.add_argument("--metrics-address")
    p.add_argument("--grpc-inference-port", type=int)
    p.add_argument("--grpc-management-port", type=int)
    p.add_argument("--no-grpc", action="store_true", help="do not start the gRPC listeners")
    p.add_argument("--frontends", type=int, help="processes serving the inference port's connections "
                   "(default 1: this one; N adds N-1 sharing the port, each relaying its requests here)")
    p.add_argument("--certificate-file", help="PEM certificate (chain) for https:// addresses and gRPC over TLS")
    p.add_argument("--private-key-file", help="its PEM private key (unencrypted; keep it mode 0600)")
    p.add_argument("--keystore", help="a PKCS#12 keystore instead (password: keystore_pass / OSPREY_KEYSTORE_PASS)")
    p.add_argument("--enable-grpc-ssl", action="store_true", default=None, help="serve both gRPC ports over TLS")
    p.add_argument("--pid-file", default=None, help=f"where the server's pid is written (default {DEFAULT_PID_FILE})")
    p.add_argument("--log-file", help="log to this file (background mode default: logs/osprey.log)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--config-snapshots", action=argparse.BooleanOptionalAction, default=None,
                   help="write TorchServe's config snapshots to <log_location>/config and, started without "
                        "--ts-config, restore the last one's models (setting config_snapshots; default off)")
    p.add_argument("--ready-line", help=argparse.SUPPRESS)  # also printed when ready (osprey torchserve's)
    p.add_argument("--torchserve-defaults", action="store_true", help=argparse.SUPPRESS)  # osprey torchserve's


def _package_parser(sub) -> None:
    from server.instances.service import builtin_handler_names

    p = sub.add_parser("package", help="write a model archive (torch-model-archiver's flags)",
                       description="Write a model archive (.mar, .tar.gz or a folder) that Osprey and TorchServe "
                                   "load; the flags are torch-model-archiver's.")
    p.add_argument("--model-name", required=True,
                   help="the model's name: the archive is NAME.mar and the model is served as NAME")
    p.add_argument("--version", "-v", default="1.0", help="the model's version (default: %(default)s)")
    p.add_argument("--model-file", help="a Python file defining the model's architecture (eager-mode models)")
    p.add_argument("--serialized-file",
                   help="the model's weights or whole model (a state_dict or TorchScript .pt/.pth file)")
    p.add_argument("--handler", required=True,
                   help="a handler .py file (optionally FILE.py:function) or a built-in handler: "
                        + ", ".join(builtin_handler_names()))
    p.add_argument("--extra-files", default="", help="comma-separated files or folders to add to the archive")
    p.add_argument("--requirements-file", "-r", help="a requirements.txt naming the Python packages the model needs")
    p.add_argument("--config-file", "-c", help="a model-config YAML file (batchSize, maxBatchDelay, workers, ...)")
    p.add_argument("--export-path", default=".", help="the folder to write the archive to (default: current folder)")
    p.add_argument("--archive-format", default="default", choices=["default", "tgz", "no-archive", "zip-store", "zip"],
                   help="default/zip: NAME.mar (a zip); zip-store: NAME.mar uncompressed; tgz: NAME.tar.gz; "
                        "no-archive: a folder NAME/")
    p.add_argument("--runtime", default="python", choices=["python", "python3", "LSP"],
                   help="the manifest's runtime (default: %(default)s; LSP, TorchServe's C++ backend, is refused)")
    p.add_argument("--force", "-f", action="store_true", help="overwrite an archive that already exists")
    p.add_argument("--reference-data", metavar="PATH",
                   help="a sample of requests as clients send them (a folder of files, .jsonl of bodies, .csv of "
                        "records or .npz of tensors): run through the handler, their drift reference profile "
                        "goes into the archive")


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="add a drift reference profile to an archive (a TorchServe .mar included)",
                       description="Run reference requests through the archive's own handler and store their "
                                   "reference profile (feature bins, a projection basis, prediction histograms, "
                                   "held-out metrics) in the archive as osprey-profile.json.")
    p.add_argument("archive", help="a .mar, .tar.gz or folder archive (rewritten in place)")
    p.add_argument("--reference-data", metavar="PATH",
                   help="a folder of files, .jsonl of request bodies, .csv of records or .npz of tensors "
                        "(default: the archive's own reference.npz)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per handler call (default: %(default)s)")


def _profile(archive, reference, batch_size: int = 64) -> int:
    from server.profiling import ReferenceError, profile_archive

    try:
        profile = profile_archive(archive, reference, batch_size=batch_size)
    except ReferenceError as exc:
        print(f"osprey profile: {exc}", file=sys.stderr)
        return 1
    names = [f["name"] for f in profile["features"]]
    print(f"{archive}: profile of {profile['rows']} reference rows, {len(names)} features "
          f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    return 0


def cmd_profile(args) -> int:
    if args.batch_size < 1:
        print("osprey profile: --batch-size must be at least 1", file=sys.stderr)
        return 2
    return _profile(args.archive, args.reference_data, args.batch_size)


def _examples_parser(sub) -> None:
    p = sub.add_parser("examples", help="train and package the example models")
    p.add_argument("--out", default="model_store", help="folder to write archives to")
    p.add_argument("--list", action="store_true", help="list the examples and their families")
    p.add_argument("--only", nargs="*", help="build only these examples")


def _monitor_parser(sub) -> None:
    from monitoring.report import add_report_parser

    p = sub.add_parser("monitor", help="drift and live quality of served models")
    add_report_parser(p.add_subparsers(dest="monitor_command", required=True))


def _rollback_parser(sub) -> None:
    from server.management_client import add_client_arguments

    p = sub.add_parser("rollback", help="make a model's previous default version the default again",
                       description="POST /models/MODEL/rollback on the management port: the previous default "
                                   "version becomes the default again and canary weights are cleared.")
    p.add_argument("model", metavar="MODEL", help="the model's name")
    add_client_arguments(p)


def cmd_rollback(args) -> int:
    from server.management_client import ManagementError, call, management_key, quote

    try:
        answer = call("POST", args.management, f"/models/{quote(args.model)}/rollback",
                      token=management_key(args.token, args.key_file), timeout=args.timeout)
    except ManagementError as exc:
        print(f"osprey rollback: {exc}", file=sys.stderr)
        return 1
    print(answer.get("status") or answer)
    return 0


def _retrain_parser(sub) -> None:
    from server.management_client import add_client_arguments

    p = sub.add_parser("retrain", help="queue a retraining job for a model now",
                       description="POST /models/MODEL/retrain on the management port: one job (unless one is "
                                   "already queued or running for the model, which is shown instead). Follow it "
                                   "with `osprey jobs show ID`.")
    p.add_argument("model", metavar="MODEL", help="the model's name")
    p.add_argument("--version", help="the version to retrain (default: the default version)")
    p.add_argument("--reason", help="a note kept in the job record")
    add_client_arguments(p)


def cmd_retrain(args) -> int:
    import urllib.parse

    from server.management_client import ManagementError, call, management_key, quote

    query = {k: v for k, v in (("version", args.version), ("reason", args.reason)) if v}
    path = f"/models/{quote(args.model)}/retrain" + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        answer = call("POST", args.management, path, token=management_key(args.token, args.key_file),
                      timeout=args.timeout)
    except ManagementError as exc:
        print(f"osprey retrain: {exc}", file=sys.stderr)
        return 1
    job = answer.get("job", {})
    what = "queued" if answer.get("created") else f"already {job.get('state')}"
    print(f"job {job.get('id')} {what} for {job.get('model')} {job.get('version')} (trigger {job.get('trigger')})")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a story end to end (needs `osprey examples` first)")
    d = p.add_subparsers(dest="demo", required=True)
    r = d.add_parser("retrain", help="digits_cnn meets inverted digits: drift, a retraining job, a canary, "
                                     "a new default, accuracy before and after")
    r.add_argument("--store", default="model_store", help="where `osprey examples` wrote digits_cnn.mar")
    r.add_argument("--redis", action="store_true", help="a Redis queue and an `osprey worker` (redis-server needed)")
    r.add_argument("--keep", action="store_true", help="keep the demo's folder (logs, model store)")


def cmd_demo(args) -> int:
    from examples.retrain_demo import main as demo

    argv = ["--store", args.store] + (["--redis"] if args.redis else []) + (["--keep"] if args.keep else [])
    return demo(argv)


def _worker_parser(sub) -> None:
    p = sub.add_parser("worker", help="run retraining jobs from the Redis queue",
                       description="Take retraining jobs from the Redis queue the servers share and run them, "
                                   "each in a child process. Needs the servers' model store (shared storage "
                                   "when on another machine). SIGTERM requeues the jobs it runs.")
    p.add_argument("--redis", required=True, metavar="URL", help="the servers' Redis (their redis_url)")
    p.add_argument("--concurrency", type=int, help="jobs run at once (default: retraining_concurrency, 1)")
    p.add_argument("--model-store", help="the servers' model store folder (default: the model_store setting)")
    p.add_argument("--ts-config", "--config", dest="ts_config", help="a config.properties with retraining_* settings")
    p.add_argument("--log-level", default="INFO")


def cmd_worker(args) -> int:
    from server.settings import load_settings

    if args.concurrency is not None and args.concurrency < 1:
        print("osprey worker: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if not args.redis.startswith(("redis://", "rediss://", "unix://")):
        print(f"osprey worker: --redis {args.redis!r} must be a URL like redis://HOST:6379/0", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.ts_config, overrides={"model_store": args.model_store, "redis_url": args.redis,
                                                            "retraining_concurrency": args.concurrency})
    except ValueError as exc:
        print(f"osprey worker: {exc}", file=sys.stderr)
        return 2
    if not Path(settings.model_store).is_dir():
        print(f"osprey worker: model store {settings.model_store!r} is not a folder (--model-store)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import asyncio

    from server.retraining.worker import run_worker

    return asyncio.run(run_worker(settings, settings.redis_url, settings.model_store,
                                  settings.retraining_concurrency))


def _jobs_parser(sub) -> None:
    from server.management_client import add_client_arguments

    p = sub.add_parser("jobs", help="retraining jobs: list, show, cancel, k8s-manifest (through the management API)")
    jsub = p.add_subparsers(dest="jobs_command", required=True)
    for name, what in (("list", "list jobs, the newest first"), ("show", "one job: its record, steps and log tail"),
                       ("cancel", "cancel a queued or running job")):
        q = jsub.add_parser(name, help=what)
        if name == "list":
            q.add_argument("--model", help="only this model's jobs")
            q.add_argument("--limit", type=int, default=50, help="at most this many (default %(default)s)")
        else:
            q.add_argument("job_id", metavar="ID")
        add_client_arguments(q)
        q.add_argument("--json", action="store_true", help="print the JSON the server answered")
    q = jsub.add_parser("k8s-manifest", help="print a Kubernetes Job (and its ConfigMap) that runs one job",
                        description="Read the job from the management API and print "
                                    "deploy/kubernetes/retraining-job.yaml filled in for it: a Job named "
                                    "osprey-retrain-ID running the one-job entry point, for `kubectl create -f -`.")
    q.add_argument("job_id", metavar="ID")
    q.add_argument("--image", required=True, help="the Osprey container image (Osprey and the model's packages)")
    q.add_argument("--claim", required=True, help="the PersistentVolumeClaim of the servers' model store")
    q.add_argument("--template", help="another template (default: deploy/kubernetes/retraining-job.yaml)")
    add_client_arguments(q)


def cmd_jobs(args) -> int:
    from server.retraining.cli_client import jobs_command

    return jobs_command(args)


def _overrides(args) -> dict:
    """The settings the command line gives (None: not given)."""
    return {
        "model_store": args.model_store,
        "workflow_store": args.workflow_store,
        "disable_token_authorization": args.disable_token_auth,
        "enable_model_api": args.enable_model_api,
        "inference_address": args.inference_address,
        "management_address": args.management_address,
        "metrics_address": args.metrics_address,
        "grpc_inference_port": args.grpc_inference_port,
        "grpc_management_port": args.grpc_management_port,
        "enable_grpc": False if args.no_grpc else None,
        "frontends": getattr(args, "frontends", None),
        "certificate_file": args.certificate_file,
        "private_key_file": args.private_key_file,
        "keystore": args.keystore,
        "enable_grpc_ssl": args.enable_grpc_ssl,
        "pid_file": args.pid_file or DEFAULT_PID_FILE,
        "config_snapshots": getattr(args, "config_snapshots", None),
    }


def _settings_from(args, properties=None):
    """``properties``: a config snapshot's configuration, read in place of --ts-config."""
    from server.settings import load_settings
    from server.torchserve_cli import TORCHSERVE_DEFAULTS

    return load_settings(args.ts_config, overrides=_overrides(args), properties=properties,
                         defaults=TORCHSERVE_DEFAULTS if getattr(args, "torchserve_defaults", False) else None)


def _config_snapshot(args, settings):
    """The models to start with, as TorchServe chooses them: a --ts-config file holding
    ``model_snapshot`` (what KServe's TorchServe runtime writes) is restored from, whether or not
    snapshots are on; with config snapshots on and no --ts-config, the last snapshot (its
    settings too). Returns (settings, the snapshot or None). ValueError: a snapshot that cannot
    be used (unreadable, or naming an archive the model store does not have)."""
    from server.snapshots import MODEL_SNAPSHOT, last_snapshot, missing_archives, read_snapshot, snapshot_dir

    if args.ts_config:
        from server.settings import parse_properties

        try:
            given = parse_properties(Path(args.ts_config).read_text(encoding="latin-1"))
        except OSError:
            return settings, None  # (a file that cannot be read was reported with the settings)
        if MODEL_SNAPSHOT not in given:
            return settings, None
        path = Path(args.ts_config)
    elif not settings.config_snapshots:
        return settings, None
    else:
        path = last_snapshot(snapshot_dir(settings))
        if path is None:
            return settings, None
    snapshot = read_snapshot(path)
    if not args.ts_config:
        settings = _settings_from(args, properties=snapshot.properties)
    missing = missing_archives(snapshot, settings.model_store)
    if missing:
        m = missing[0]
        what = f"{MODEL_SNAPSHOT} in {path}" if args.ts_config else f"config snapshot {path}"
        fix = ("put it back or take it out of the file's model_snapshot" if args.ts_config else
               "put it back, start with --ts-config, or turn snapshots off (--ncs, --no-config-snapshots)")
        raise ValueError(f"{what}: the archive {m.mar_name} of model {m.name} version {m.version} is not in the "
                         f"model store {settings.model_store} (as TorchServe, a start from a snapshot needs every "
                         f"archive it names); {fix}")
    return settings, snapshot


def _recorded_properties(args, snapshot) -> dict:
    """The configuration config snapshots record: the config file's (or restored snapshot's)
    keys and the settings the command line gave (TorchServe's own ``prop``)."""
    from server.settings import parse_properties
    from server.snapshots import given_properties

    if snapshot is not None:
        config, config_file = snapshot.properties, None
    elif args.ts_config:
        config, config_file = parse_properties(Path(args.ts_config).read_text()), args.ts_config
    else:
        config, config_file = {}, None
    given = {k: v for k, v in _overrides(args).items() if k not in ("pid_file", "config_snapshots")}
    if args.models:
        given["load_models"] = args.models
    return given_properties(config, given, config_file)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited server nobody has reaped yet (a container whose PID 1 does not reap) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def cmd_serve(args) -> int:
    from server.tls import load_material

    try:
        settings = _settings_from(args)
        settings, snapshot = _config_snapshot(args, settings)
        load_material(settings)  # TLS asked for without a usable key and certificate: refused here, fast
    except ValueError as exc:
        print(f"osprey serve: {exc}", file=sys.stderr)
        return 2
    old = _read_pid(settings.pid_file)
    if old and _pid_alive(old) and old != os.getpid():
        print(f"osprey serve: a server is already running (pid {old}, {settings.pid_file}); run `osprey stop` first",
              file=sys.stderr)
        return 1
    if not args.foreground:
        return _serve_background(args, settings)
    logging.basicConfig(level=args.log_level.upper(), filename=args.log_file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.serve import parse_model_specs, run

    if snapshot is not None:  # TorchServe: the snapshot's models, not --models / load_models
        specs = []
        if args.models:
            fix = ("take model_snapshot out of that file to load those" if args.ts_config else
                   "start with --ncs or --ts-config to load those")
            logging.getLogger("osprey.snapshots").warning(
                "starting from config snapshot %s: its models are loaded, not --models %s (as TorchServe does; "
                "%s)", snapshot.path, " ".join(args.models), fix)
    else:
        specs = list(args.models) or list(settings.load_models)
    models = parse_model_specs(specs, settings.model_store)
    config = _recorded_properties(args, snapshot) if settings.config_snapshots else None
    return run(settings, models, ready_line=args.ready_line, restore=snapshot, config_properties=config)


def _serve_background(args, settings) -> int:
    log_file = args.log_file or os.path.join("logs", "osprey.log")
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    start = Path(log_file).stat().st_size if Path(log_file).exists() else 0  # earlier runs' lines
    argv = [sys.executable, "-m", "server.cli", *sys.argv[1:], "--foreground", "--log-file", log_file]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"osprey serve: the server exited with code {proc.returncode}; see {log_file}", file=sys.stderr)
            print(_read_from(log_file, start)[-3000:].decode(errors="replace"), file=sys.stderr)
            return 1
        text = _read_from(log_file, start)
        if b"Osprey ready" in text and _read_pid(settings.pid_file) == proc.pid:
            print(f"Osprey started (pid {proc.pid}); inference at {settings.inference_address}; logs in {log_file}")
            ready = re.search(rb"Osprey ready: (\d+)/(\d+) models", text)
            if ready and int(ready.group(1)) < int(ready.group(2)):  # serving, but not everything asked for
                failed = [m.decode(errors="replace") for m in re.findall(rb"model (\S+) \(\S+\) not loaded", text)]
                print(f"osprey serve: {int(ready.group(2)) - int(ready.group(1))} of {int(ready.group(2))} models did "
                      f"not load{' (' + ', '.join(failed[:10]) + ')' if failed else ''}; the reasons are in {log_file}",
                      file=sys.stderr)
            return 0
        time.sleep(0.1)
    print(f"osprey serve: not ready after 300 s; see {log_file}", file=sys.stderr)
    return 1


def _read_from(path: str, offset: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def cmd_stop(args) -> int:
    pid = _read_pid(args.pid_file)
    if pid is None or not _pid_alive(pid):
        print("Osprey is not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        if not _pid_alive(pid):
            print(f"Osprey stopped (pid {pid})")
            return 0
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    print(f"Osprey killed (pid {pid}) after 30 s")
    return 0


def _unknown_handler(handler: str, extra_files: list[str]) -> str | None:
    """Why ``--handler`` names nothing this machine knows (None when it does): not a file, not
    a built-in handler, not a module among the extra files or importable here. Such an archive
    still loads where the module is installed, as in TorchServe, so it is a warning."""
    import difflib
    import importlib.util

    from server.instances.service import builtin_handler_names

    module, _, _ = handler.partition(":")
    if Path(module).is_file():
        return None
    names = builtin_handler_names()
    top = module.split(".")[0]
    extras = {Path(f).name for f in extra_files}  # files and folders the archive holds beside the handler
    if module in names or f"{top}.py" in extras or top in extras:
        return None
    for candidate in (module, f"ts.torch_handler.{module}"):  # TorchServe's built-ins, where it is installed
        try:
            if importlib.util.find_spec(candidate) is not None:
                return None
        except Exception:  # importing a parent package failed: that says nothing about the archive
            pass
    close = difflib.get_close_matches(module, names, n=1)
    return (f"handler {handler!r} is not a file, not a built-in handler ({', '.join(names)}), not a module in "
            f"--extra-files and not importable here; the archive loads only where that module can be imported"
            + (f" (did you mean {close[0]!r}?)" if close else ""))


def cmd_package(args) -> int:
    from server.core.archive import write_archive

    try:
        path = write_archive(model_name=args.model_name, version=args.version, handler=args.handler,
                             serialized_file=args.serialized_file, model_file=args.model_file,
                             extra_files=[f for f in args.extra_files.split(",") if f],
                             requirements_file=args.requirements_file, config_file=args.config_file,
                             export_path=args.export_path, archive_format=args.archive_format, force=args.force,
                             runtime=args.runtime)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"osprey package: {exc}", file=sys.stderr)
        return 1
    unknown = _unknown_handler(args.handler, [f for f in args.extra_files.split(",") if f])
    if unknown:
        print(f"osprey package: warning: {unknown}", file=sys.stderr)
    if args.reference_data:
        code = _profile(path, args.reference_data)
        if code:
            path.unlink() if path.is_file() else None  # no archive half-made: the reference data failed
            return code
    print(path)
    return 0


def cmd_examples(args) -> int:
    from examples.build import build_examples, list_examples

    if args.list:
        for name, family in list_examples():
            print(f"{name:20s} {family}")
        return 0
    return build_examples(args.out, only=args.only)


def cmd_torchserve(args) -> int:
    from server.torchserve_cli import run

    return run(args)


def cmd_monitor(args) -> int:
    from monitoring.report import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    from server import __version__

    parser = argparse.ArgumentParser(prog="osprey", description="Osprey model server")
    parser.add_argument("--version", action="version", version=f"osprey {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    args_given = sys.argv[1:] if argv is None else argv
    if args_given[:1] == ["torchserve"]:  # scripts call it often (stop, start): skip the other
        from server.torchserve_cli import add_parser  # commands' parsers and their imports (~1 s)

        add_parser(sub, DEFAULT_PID_FILE)
        return cmd_torchserve(parser.parse_args(argv))
    _serve_parser(sub)
    stop = sub.add_parser("stop", help="stop a server started in the background")
    stop.add_argument("--pid-file", default=DEFAULT_PID_FILE)
    _package_parser(sub)
    _profile_parser(sub)
    _examples_parser(sub)
    _monitor_parser(sub)
    _rollback_parser(sub)
    _retrain_parser(sub)
    _demo_parser(sub)
    _worker_parser(sub)
    _jobs_parser(sub)
    from server.torchserve_cli import add_parser as _torchserve_parser

    _torchserve_parser(sub, DEFAULT_PID_FILE)
    args = parser.parse_args(argv)
    return {"serve": cmd_serve, "stop": cmd_stop, "package": cmd_package, "examples": cmd_examples,
            "profile": cmd_profile, "monitor": cmd_monitor, "rollback": cmd_rollback,
            "worker": cmd_worker, "jobs": cmd_jobs, "retrain": cmd_retrain, "demo": cmd_demo, "torchserve": cmd_torchserve}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
