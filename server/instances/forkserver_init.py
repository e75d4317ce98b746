"""Imported only in multiprocessing's fork server (a preload, server/instances/process.py).

A SIGTERM to the server's whole process group (systemd's default ``KillMode=control-group``,
``kill -TERM -PGID``, ``tini -g``) reaches every process in it at once. The server drains on
it: answers what it accepted, then stops its instances. The fork server and the instances'
children must not die under it first, or every request they were running or about to run is
lost. They ignore SIGTERM; they end when the server closes their pipes (or kills them), and if
the server itself is killed, their pipes close with it.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
