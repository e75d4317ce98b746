"""The one request constructor: its request-id rule, its deadline rule, and that the work
part of a request crosses a process boundary."""

from __future__ import annotations

import pickle

import numpy as np

from server.core.types import Field, Protocol, new_request


def test_the_clients_own_id_is_kept_and_a_missing_one_is_made():
    assert new_request(Protocol.REST_V2, "m", request_id="client-7").request.request_id == "client-7"
    assert new_request(Protocol.REST_V2, "m", request_id=42).request.request_id == "42"
    made = {new_request(Protocol.GRPC, "m", request_id=rid).request.request_id for rid in (None, "", None)}
    assert len(made) == 3 and all(len(r) == 36 for r in made)  # UUID-shaped, unique


def test_the_deadline_is_the_shortest_timeout_from_arrival():
    t = new_request(Protocol.GRPC_V2, "m", received=100.0, timeouts=(None, 2.5, 0.5))
    assert t.request.deadline == 100.5 and t.timings.received == 100.0
    assert new_request(Protocol.GRPC_V2, "m", received=100.0, timeouts=(None,)).request.deadline is None
    assert new_request(Protocol.REST, "m").request.deadline is None


def test_an_empty_version_means_the_default_one():
    assert new_request(Protocol.GRPC, "m", "").request.version is None
    assert new_request(Protocol.GRPC, "m", "2.0").request.version == "2.0"


def test_the_work_pickles_without_the_loop_side():
    body = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = new_request(Protocol.REST_V2, "m", "1", request_id="r1", tensors={"x": body},
                    fields={"body": Field(b"abc", "text/plain")}, headers={"a": "b"}, client=object(),
                    stream=lambda data: None)
    work = pickle.loads(pickle.dumps(t.request))
    assert work.request_id == "r1" and work.protocol is Protocol.REST_V2 and work.headers == {"a": "b"}
    assert np.array_equal(work.tensors["x"], body) and bytes(work.fields["body"].value) == b"abc"
    assert str(Protocol.GRPC_V2) == "grpc-v2"
