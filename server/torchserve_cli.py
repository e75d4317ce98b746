"""``osprey torchserve``: TorchServe 0.12's ``torchserve`` command line, run by Osprey.

Scripts (and TorchServe's own test harness) that call ``torchserve --start ...`` and
``torchserve --stop`` keep working when ``torchserve`` runs ``osprey torchserve``. Every flag
of TorchServe 0.12's ``ts/arg_parser.py`` is accepted; what it does maps onto ``osprey serve``:

- ``--start`` (or neither ``--start`` nor ``--stop``): starts ``osprey serve --foreground`` as a
  child process that inherits this one's standard output and error, writes its pid to the pid
  file and returns at once (TorchServe's Python launcher does the same with its Java server),
  unless ``--foreground``, which waits for the server and passes it SIGTERM, SIGINT and SIGHUP
  (a supervisor that stops the command stops the server). The server prints ``Model server
  started.`` once it listens and its startup models are loaded, the line TorchServe's
  ``ts.launcher.start`` waits for.
- ``--stop``: SIGTERM to the pid in the pid file, ``./key_file.json`` removed, the pid file
  removed; with ``--foreground`` it waits (up to 60 s) for the server to exit.
- The messages scripts read are TorchServe's ("TorchServe is not currently running.", ...).
- The settings whose defaults differ take TorchServe's (TORCHSERVE_DEFAULTS below).
- ``--log-config``, ``--cpp-log-config`` (log4j2 / C++ backend logging) and ``--plugins-path``
  (Java plugin jars) mean nothing to Osprey: each is named on standard error as ignored.
- ``--workflow-store`` is where ``POST /workflows`` finds ``.war`` files, as in TorchServe (a
  missing folder is refused with its message).
- Config snapshots are on, as in TorchServe (server/snapshots.py): ``logs/config/`` (or
  ``$LOG_LOCATION/config``) gets ``*-startup.cfg``, ``*-snapshot.cfg`` after each management
  change and ``*-shutdown.cfg``, and a start without ``--ts-config`` / ``TS_CONFIG_FILE`` restores
  the last one's models; ``--ncs`` / ``--no-config-snapshots`` turns both off.
- A missing or wrong ``--ts-config`` / ``--model-store`` is refused with TorchServe's messages.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["add_parser", "run", "READY_LINE", "TS_VERSION", "TORCHSERVE_DEFAULTS"]

TS_VERSION = "0.12.0"
READY_LINE = "Model server started."  # what TorchServe's frontend prints when ready; ts.launcher waits for it
STOP_WAIT_S = 60.0  # torchserve --stop --foreground waits this long, as TorchServe does
# Settings whose defaults differ between TorchServe 0.12 and `osprey serve`: started as
# `torchserve`, Osprey takes TorchServe's (config.properties, TS_/OSPREY_ variables and flags
# still win): its log files in ./logs, its metrics log files, 400 for a bad or missing token,
# keys that expire after 60 minutes, no workers for a model registered without a number of them
# (TorchServe's default_workers_per_model is 0, "not configured": "registered with 0 initial workers"),
# TorchServe's worker lines and 500 "Worker died." for a request past responseTimeout, whose worker
# is replaced at once (no hang grace), handler output on the console as well as in model_log.log,
# and config snapshots written and restored (--ncs turns them off).
TORCHSERVE_DEFAULTS = {"log_location": "logs", "metrics_mode": "log", "token_auth_status": 400,
                       "token_expiration_min": 60.0, "default_workers_per_model": 0,
                       "worker_lifecycle": "torchserve", "hang_grace": 0.0, "model_log_console": True,
                       "config_snapshots": True}

_IGNORED = {
    "log_config": ("--log-config", "a log4j2 file: Osprey logs with Python logging (log_location and "
                                   "access_log settings); ignored"),
    "cpp_log_config": ("--cpp-log-config", "the C++ backend's logging: Osprey has no C++ backend; ignored"),
    "plugins_path": ("--plugins-path", "Java plugin jars: Osprey loads no Java plugins; ignored"),
}


def add_parser(sub, default_pid_file: str) -> None:
    """The flags of TorchServe 0.12's ``ArgParser.ts_parser``, same names and aliases."""
    p = sub.add_parser("torchserve", help="TorchServe 0.12's torchserve command line (--start/--stop ...)",
                       description="Start or stop Osprey with TorchServe 0.12's `torchserve` flags, so scripts "
                                   "written for TorchServe run unchanged (e.g. a `torchserve` script that runs "
                                   "`osprey torchserve \"$@\"`).")
    mode = p.add_mutually_exclusive_group(required=False)
    mode.add_argument("-v", "--version", action="store_true", help="print the version")
    mode.add_argument("--start", action="store_true", help="start the server (the default)")
    mode.add_argument("--stop", action="store_true", help="stop the server")
    p.add_argument("--ts-config", dest="ts_config", help="config.properties (also: environment TS_CONFIG_FILE)")
    p.add_argument("--model-store", dest="model_store", help="folder holding model archives")
    p.add_argument("--workflow-store", dest="workflow_store",
                   help="folder holding workflow archives (.war; default: the model store)")
    p.add_argument("--models", metavar="MODEL_PATH1 MODEL_NAME=MODEL_PATH2...", nargs="+",
                   help="models to load at startup: [name=]archive in the model store, or all")
    p.add_argument("--log-config", dest="log_config", help="accepted, ignored (log4j2 configuration)")
    p.add_argument("--cpp-log-config", dest="cpp_log_config", help="accepted, ignored (C++ backend logging)")
    p.add_argument("--foreground", action="store_true",
                   help="with --start: stay in the foreground; with --stop: wait until the server exited")
    p.add_argument("--no-config-snapshots", "--ncs", dest="no_config_snapshots", action="store_true",
                   help="write no config snapshots (logs/config/*.cfg) and do not start from the last one")
    p.add_argument("--plugins-path", "--ppath", dest="plugins_path", help="accepted, ignored (Java plugin jars)")
    p.add_argument("--disable-token-auth", "--dt", dest="token_auth", action="store_true",
                   help="serve without token authorization")
    p.add_argument("--enable-model-api", dest="model_mode", action="store_true",
                   help="allow register/unregister over the management API")
    p.set_defaults(pid_file=default_pid_file)


def _alive_server(pid_file: str) -> int | None:
    """The pid in ``pid_file`` when it is a live Osprey server, else None (TorchServe checks its
    process's command line names its Java main class; a reused pid is not taken for the server)."""
    from server.cli import _pid_alive, _read_pid

    pid = _read_pid(pid_file)
    if pid is None or not _pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid  # no /proc (macOS): trust a live pid
    return pid if b"server.cli" in cmdline or any(arg.endswith(b"osprey") for arg in cmdline) else None


def _stop(args) -> int:
    pid = _alive_server(args.pid_file)
    if pid is None:
        print("TorchServe is not currently running.")
        Path(args.pid_file).unlink(missing_ok=True)
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("TorchServe already stopped.")
        Path(args.pid_file).unlink(missing_ok=True)
        return 0
    Path("key_file.json").unlink(missing_ok=True)  # TorchServe removes the key file of the working folder
    if args.foreground:
        from server.cli import _pid_alive

        deadline = time.monotonic() + STOP_WAIT_S
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            print("Stopping TorchServe took too long.")
    else:
        print("TorchServe has stopped.")
    Path(args.pid_file).unlink(missing_ok=True)
    return 0


def _fail(message: str) -> int:
    print(message)  # TorchServe prints these on standard output and exits 1
    return 1


def _start(args) -> int:
    from server.settings import parse_properties

    if _alive_server(args.pid_file) is not None:
        return _fail("TorchServe is already running, please use torchserve --stop to stop TorchServe.")
    for key, (flag, why) in _IGNORED.items():
        if getattr(args, key):
            print(f"osprey torchserve: {flag} {why}", file=sys.stderr)
    ts_config = os.environ.get("TS_CONFIG_FILE") or args.ts_config
    model_store = args.model_store
    if ts_config:
        if not os.path.isfile(ts_config):
            return _fail(f"--ts-config file not found: {ts_config}")
        props = parse_properties(Path(ts_config).read_text())
        if props.get("vmargs"):
            print(f"osprey torchserve: vmargs={props['vmargs']} are Java options; ignored", file=sys.stderr)
        model_store = model_store or props.get("model_store")
    if not model_store:
        return _fail("Missing mandatory parameter --model-store")
    if not os.path.isdir(model_store):
        return _fail(f"--model-store directory not found: {model_store}")
    if args.workflow_store and not os.path.isdir(args.workflow_store):
        return _fail(f"--workflow-store directory not found: {args.workflow_store}")
    argv = [sys.executable, "-m", "server.cli", "serve", "--foreground", "--model-store", model_store,
            "--pid-file", args.pid_file, "--ready-line", READY_LINE,
            "--torchserve-defaults"]
    if ts_config:
        argv += ["--ts-config", ts_config]
    if args.workflow_store:
        argv += ["--workflow-store", args.workflow_store]
    if args.models:
        argv += ["--models", *args.models]
    if args.token_auth:
        argv.append("--disable-token-auth")
    if args.model_mode:
        argv.append("--enable-model-api")
    if args.no_config_snapshots:
        argv.append("--no-config-snapshots")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # this Osprey, wherever the command runs from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=not args.foreground)
    except OSError as exc:
        return _fail(f"start of the Osprey server failed: {exc}")
    Path(args.pid_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.pid_file).write_text(str(proc.pid))
    if args.foreground:
        return _wait_forwarding(proc)
    return 0


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _wait_forwarding(proc: subprocess.Popen) -> int:
    """Wait for the foreground server, passing it the signals that end this process: a
    supervisor (systemd with ``KillMode=process``, supervisord, ``kill`` of the pid it started)
    that stops ``torchserve --foreground`` stops the server, instead of leaving it running with
    its ports. The server's exit status is this command's."""
    def forward(signum: int, _frame) -> None:
        proc.send_signal(signum)  # Popen's: a no-op once the server has ended

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args) -> int:
    if args.version:
        from server import __version__

        print(f"TorchServe Version is {TS_VERSION} (Osprey {__version__})")
        return 0
    if args.stop:
        return _stop(args)
    return _start(args)
