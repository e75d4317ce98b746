"""Several front-end processes on the inference port (setting ``frontends``).

One event loop holds the GIL for everything the inference port does: accepting, parsing HTTP,
routing, the adapters, the data plane, writing answers. With ``frontends: N`` (N > 1) the
server starts N - 1 front-end processes beside itself. Each listens on the inference address
with ``SO_REUSEPORT`` (the kernel spreads new connections over the N listeners, the server's
own included) and does the connection work in its own interpreter: accepting, reading and
parsing requests, timeouts, keep-alive, writing answers. It relays each request, whole, to the
server over a Unix socket pair, many per write, and the server runs it through the same
router it serves its own connections with. So batching (one queue per model, whichever
process received the request), deadlines, auth, metrics, the access log, monitoring and every
route behave as with one process; only the connection work leaves the server's loop.

- :mod:`~server.frontends.frames`: the framing both sides use;
- :mod:`~server.frontends.relay`: the server's side, one link per front end;
- :mod:`~server.frontends.supervisor`: starts, restarts and drains the front-end processes;
- :mod:`~server.frontends.child`: the front-end process.
"""
