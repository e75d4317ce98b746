"""What a streaming gRPC call holds for its client (server/protocols/grpc/streams.py): in order,
and cut (the call's task cancelled, what waited dropped) once more than MAX_BACKLOG bytes wait
and the call takes nothing for ``stall_s``; never while it keeps taking."""

from __future__ import annotations

import asyncio

import pytest

from server.protocols.grpc import streams
from server.protocols.grpc.streams import Outbox, StreamSink


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(streams, "MAX_BACKLOG", 1000)
    monkeypatch.setattr(Outbox, "stall_s", 0.05)


def test_items_come_out_in_order_and_the_sink_ends_after_close():
    async def main():
        sink = StreamSink(asyncio.get_running_loop(), "test call")
        for part in (b"a", "b", {"c": 1}):
            sink(part)
        await asyncio.sleep(0)  # (the handler thread's items reach the loop)
        sink.close()
        return [item async for item in sink]

    assert asyncio.run(main()) == [b"a", b"b", b'{"c":1}']


def test_a_call_that_takes_nothing_while_too_much_waits_is_cancelled_and_what_waited_dropped(small, caplog):
    async def call(started: asyncio.Event, box: list):
        box.append(Outbox("StreamPredictions of model 'm', request r1"))
        started.set()
        await asyncio.Event().wait()  # blocked, as a write to a client that does not read is

    async def main():
        started, box = asyncio.Event(), []
        task = asyncio.ensure_future(call(started, box))
        await started.wait()
        out = box[0]
        for _ in range(3):
            out.put(b"x" * 500, 500)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        return out

    out = asyncio.run(main())
    assert out.cut and out.waiting == 0
    out.put(b"late", 4)  # what comes after the cut is dropped
    assert out.waiting == 0
    assert "StreamPredictions of model 'm', request r1: the client is not reading its stream (1500 bytes waiting" \
        in caplog.text


def test_a_call_that_keeps_taking_is_not_cut_however_far_behind(small):
    async def call(out_box: list, done: asyncio.Event):
        out = Outbox("ModelStreamInfer")
        out_box.append(out)
        for _ in range(40):  # one message taken every stall_s / 2: slow, but moving
            await asyncio.sleep(0.025)
            await out.get()
        done.set()

    async def main():
        box, done = [], asyncio.Event()
        task = asyncio.ensure_future(call(box, done))
        await asyncio.sleep(0)
        for _ in range(60):
            box[0].put(b"x" * 500, 500)
        await asyncio.wait_for(done.wait(), 10)
        await task
        return box[0]

    out = asyncio.run(main())
    assert not out.cut and out.taken == 40 and out.waiting == 20 * 500
