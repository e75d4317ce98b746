"""A small HTTP/1.1 load driver: open-loop Poisson arrivals, or closed loop with µs timing.

Open loop (``--rate R``): send times are drawn in advance from a Poisson process at R
requests/s; each request goes out at its scheduled time on an idle keep-alive connection
(a new one is opened when none is idle), and its latency is measured from its *scheduled*
send time, so a server that falls behind is charged for the queue it causes (no
coordinated omission). The driver's own lateness (actual minus scheduled send) is reported
too: the event loop's timers have about 1 ms resolution, so it is up to about 1 ms even on an
idle machine; when it is much larger, the driver, not the server, was short of CPU. The
service time (from the actual send) is reported beside it.

Closed loop (``--closed N``): N connections, each sending its next request as soon as the
previous answer arrived; like ``hey`` but timed with ``perf_counter``.

Prints one JSON object. Uses uvloop and a raw asyncio Protocol: about 20-40 µs of client
CPU per request.

    python -m benchmarks.openloop --url http://127.0.0.1:8080/predictions/mlp --body in.json \
        --content-type application/json --rate 2000 --duration 20 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import sys
import time
from urllib.parse import urlsplit

__all__ = ["percentiles", "summarize_answers", "main"]


def percentiles(values: list[float], pcts=(50, 90, 99, 99.9)) -> dict:
    if not values:
        return {}
    v = sorted(values)
    out = {}
    for p in pcts:
        k = min(len(v) - 1, max(0, math.ceil(p / 100 * len(v) - 1e-9) - 1))  # nearest rank
        out[f"p{str(p).replace('.', '_')}_ms"] = v[k] * 1000
    out["mean_ms"] = sum(v) / len(v) * 1000
    out["max_ms"] = v[-1] * 1000
    return out


def summarize_answers(records, objective_ms: float | None = None) -> dict:
    """From ``(scheduled, sent, done, status, retry_after)`` records (answered ones): the answers by
    status code, the 503 refusals (how many, how many with Retry-After, their latency from the
    scheduled send) and, with an objective, ``ok_within``: the 200s answered within it. The
    same keys as openloop.c prints."""
    status: dict[str, int] = {}
    refused = []
    retry = within = 0
    limit = None if objective_ms is None else objective_ms / 1000
    for sched, _sent, done, code, ra in records:
        status[str(code)] = status.get(str(code), 0) + 1
        if code == 503:
            refused.append(done - sched)
            retry += bool(ra)
        elif code == 200 and limit is not None and done - sched <= limit:
            within += 1
    out = {"status": dict(sorted(status.items(), key=lambda kv: int(kv[0]))),
           "refused": {"count": len(refused), "retry_after": retry, "latency": percentiles(refused)}}
    if limit is not None:
        out["objective_ms"] = objective_ms
        out["ok_within"] = within
    return out


class Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data):
        self.buf += data
        self._parse()

    def _parse(self):
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        status = int(buf[9:12])
        body_start = end + 4
        i = head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            length = int(head[i + 15:j if j >= 0 else None])
            if len(buf) < body_start + length:
                return
            del buf[:body_start + length]
        elif b"transfer-encoding: chunked" in head:
            stop = buf.find(b"\r\n0\r\n\r\n", body_start - 2)
            if stop < 0:
                return
            del buf[:stop + 7]
        else:
            del buf[:body_start]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, b"\r\nretry-after:" in head))

    def request(self, payload: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter


class Driver:
    def __init__(self, url: str, body: bytes, content_type: str, max_conns: int):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        head = (f"POST {parts.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.payload = head + body
        self.idle: list[Conn] = []
        self.waiters: collections.deque = collections.deque()
        self.max_conns = max_conns
        self.opened = 0
        self.loop = asyncio.get_running_loop()

    async def _conn(self) -> Conn:
        while True:
            while self.idle:
                c = self.idle.pop()
                if not c.closed:
                    return c
                self.opened -= 1
            if self.opened < self.max_conns:
                self.opened += 1
                try:
                    _, c = await self.loop.create_connection(Conn, self.host, self.port)
                except OSError:
                    self.opened -= 1
                    raise
                return c
            waiter = self.loop.create_future()  # every connection busy: wait for one
            self.waiters.append(waiter)
            await waiter

    def _release(self, c: Conn) -> None:
        self.idle.append(c)
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                break

    async def one(self) -> tuple[int, float, float, bool]:
        """(status, sent, done, whether the answer carried Retry-After); status 0: no answer."""
        try:
            c = await self._conn()
        except OSError:
            now = time.perf_counter()
            return 0, now, now, False
        sent = time.perf_counter()
        try:
            status, retry = await c.request(self.payload)
        except ConnectionError:
            self.opened -= 1
            return 0, sent, time.perf_counter(), False
        done = time.perf_counter()
        self._release(c)
        return status, sent, done, retry


async def open_loop(args, body: bytes) -> dict:
    d = Driver(args.url, body, args.content_type, args.max_conns)
    for c in [await d._conn() for _ in range(min(args.preopen, args.max_conns))]:
        d._release(c)
    rng = random.Random(args.seed)
    records: list[tuple[float, float, float, int, bool]] = []
    tasks = set()
    start = time.perf_counter() + 0.05
    t = start
    end = start + args.warmup + args.duration
    measure_from = start + args.warmup

    async def fire(sched: float):
        status, sent, done, retry = await d.one()
        if sched >= measure_from:
            records.append((sched, sent, done, status, retry))

    while t < end:
        wait = t - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)  # timer resolution ~1 ms: the lateness it adds is reported
        now = time.perf_counter()
        while t <= now and t < end:  # send everything that is due
            task = d.loop.create_task(fire(t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            t += rng.expovariate(args.rate)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    ok = [r for r in records if r[3] == 200]
    lat = [r[2] - r[0] for r in ok]
    service = [r[2] - r[1] for r in ok]
    lateness = [r[1] - r[0] for r in records]
    out = {"mode": "open", "rate": args.rate, "duration_s": args.duration, "sent": len(records), "ok": len(ok),
           "errors": len(records) - len(ok), "connections": d.opened, "unfinished": len(tasks),
           "achieved_rps": len(ok) / args.duration if args.duration else 0.0}
    out.update(percentiles(lat))
    out.update(summarize_answers(records, args.objective_ms))
    out["service"] = percentiles(service)
    out["lateness"] = percentiles(lateness)
    return out


async def closed_loop(args, body: bytes) -> dict:
    d = Driver(args.url, body, args.content_type, args.closed)
    lat: list[float] = []
    errors = 0
    t_end_warm = time.perf_counter() + args.warmup
    t_end = t_end_warm + args.duration

    async def worker():
        nonlocal errors
        d._release(await d._conn())
        while True:
            status, sent, done, _ = await d.one()
            if done >= t_end:
                return
            if sent >= t_end_warm:
                if status == 200:
                    lat.append(done - sent)
                else:
                    errors += 1

    await asyncio.gather(*(worker() for _ in range(args.closed)))
    out = {"mode": "closed", "concurrency": args.closed, "duration_s": args.duration, "ok": len(lat),
           "errors": errors, "rps": len(lat) / args.duration}
    out.update(percentiles(lat))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--body", required=True, help="file holding the request body")
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--closed", type=int, help="closed loop: this many connections")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-conns", type=int, default=512)
    p.add_argument("--preopen", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--objective-ms", type=float, default=None,
                   help="open loop: also count the 200 answers within this latency (ok_within: the goodput)")
    args = p.parse_args(argv)
    if (args.rate is None) == (args.closed is None):
        p.error("give exactly one of --rate and --closed")
    with open(args.body, "rb") as fh:
        body = fh.read()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(open_loop(args, body) if args.rate else closed_loop(args, body))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
