"""gRPC errors are mapped in one place (status.ErrorStatus) for every servicer: an
OspreyError gets its own status, anything else INTERNAL with a short message and one logged
traceback, never UNKNOWN; streams that answer in band keep doing so."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from server.core.errors import ErrorKind, OspreyError
from server.protocols.grpc.generated import management_pb2 as mpb
from server.protocols.grpc.generated import management_pb2_grpc as mpb_grpc
from server.protocols.grpc.management import ManagementServicer
from server.protocols.grpc.status import ErrorStatus


class _BrokenRegistry:
    """list_page is a server bug; get raises the client's mistake."""

    def list_page(self, limit, token):
        raise KeyError("boom")

    def get(self, name, version=None):
        raise OspreyError(ErrorKind.NOT_FOUND, f"Model not found: {name}")


async def _call(method: str, request, caplog) -> grpc.aio.AioRpcError:
    server = grpc.aio.server(interceptors=[ErrorStatus()])
    mpb_grpc.add_ManagementAPIsServiceServicer_to_server(ManagementServicer(_BrokenRegistry(), enable_model_api=False),
                                                         server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = mpb_grpc.ManagementAPIsServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, method)(request, timeout=10)
            return info.value
    finally:
        await server.stop(None)


def test_management_bug_is_internal_with_one_logged_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="osprey.grpc")
    err = asyncio.run(_call("ListModels", mpb.ListModelsRequest(), caplog))
    assert err.code() == grpc.StatusCode.INTERNAL  # was UNKNOWN before the one mapping
    assert "KeyError" in err.details() and "ListModels" in err.details() and "boom" not in err.details()
    logged = [r for r in caplog.records if r.name == "osprey.grpc"]
    assert len(logged) == 1 and logged[0].exc_info and logged[0].exc_info[0] is KeyError


def test_management_osprey_errors_keep_their_status(caplog):
    err = asyncio.run(_call("DescribeModel", mpb.DescribeModelRequest(model_name="nope"), caplog))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.details()
    err = asyncio.run(_call("RegisterModel", mpb.RegisterModelRequest(url="x.mar"), caplog))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "Model API disabled" in err.details()  # TorchServe's
    # (Osprey's loggers only: grpc.aio's poller may log "Event loop is closed" through asyncio
    # when asyncio.run closes the loop under it, which is the test harness, not the server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("osprey")]


def test_a_response_stream_that_fails_midway_ends_internal_after_its_replies(caplog):
    async def replies(request, context):
        yield b"one"
        raise RuntimeError("midway")

    async def run():
        server = grpc.aio.server(interceptors=[ErrorStatus()])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "t.S", {"Stream": grpc.unary_stream_rpc_method_handler(replies)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        got = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream("/t.S/Stream")(b"", timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for reply in call:
                        got.append(reply)
                return got, info.value
        finally:
            await server.stop(None)

    caplog.set_level(logging.ERROR, logger="osprey.grpc")
    got, err = asyncio.run(run())
    assert got == [b"one"] and err.code() == grpc.StatusCode.INTERNAL and "(RuntimeError) in Stream;" in err.details()
    assert len([r for r in caplog.records if r.exc_info and r.name == "osprey.grpc"]) == 1  # (see above)
