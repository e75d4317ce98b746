"""Labelled production data: inputs held for their labels, joined by request id, read by jobs."""

from types import SimpleNamespace

import numpy as np
import pytest

from monitoring.dataset import LabelledData, dataset_path, read_rows
from server.core.capture import FeedbackItem
from server.core.model_config import parse_model_config
from server.core.types import Field, Protocol, new_request
from tests.redis_server import redis_server  # noqa: F401 (fixture)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def version(name="m", v="1.0", retraining=True, **kw):
    raw = {"retraining": retraining}
    if kw:
        raw["retraining"] = kw
    raw["monitoring"] = {"feedback_ttl": 60}
    return SimpleNamespace(name=name, version=v, config=parse_model_config(raw))


def body(rid, data=b"png-bytes"):
    return new_request(Protocol.REST, "m", request_id=rid, fields={"body": Field(memoryview(data))}).request


def items(*pairs):
    return [FeedbackItem(rid, label, i) for i, (rid, label) in enumerate(pairs)]


def test_labels_join_held_inputs_into_rows_in_a_file_under_the_model_store(tmp_path):
    clock = Clock()
    data = LabelledData(tmp_path, clock=clock)
    mv = version()
    data.hold(mv, body("a", b"first"))
    oip = new_request(Protocol.REST_V2, "m", request_id="b",
                      tensors={"x": np.arange(4, dtype=np.float32)}).request
    data.hold(mv, oip)
    data.hold(version(retraining=False), body("c"))  # no retraining section: nothing held
    assert data.pending() == 2
    assert data.join("m", "1.0", items(("a", 3), ("b", 7), ("c", 1), ("zz", 0)), max_rows=100) == 2
    rows = read_rows("m", root=tmp_path)
    assert [(r["rid"], r["label"], r["version"]) for r in rows] == [("a", 3, "1.0"), ("b", 7, "1.0")]
    assert rows[0]["inputs"] == {"body": b"first"} and rows[0]["ts"] == 1000.0
    np.testing.assert_array_equal(rows[1]["inputs"]["x"], np.arange(4, dtype=np.float32))
    assert dataset_path(tmp_path, "m").exists()
    # a label joins once: a second one for the same id finds nothing held
    assert data.join("m", "1.0", items(("a", 4)), max_rows=100) == 0


def test_inputs_held_across_a_process_join_as_the_ones_held_here(tmp_path):
    """A monitor in its own process gets held inputs as pickled plain tuples (held_wire): they
    join into the same rows, tensors and bytes alike, as requests held in the process."""
    import pickle

    from server.core.capture import from_wire, held_wire

    oip = new_request(Protocol.REST_V2, "m", request_id="b", tensors={"x": np.arange(4, dtype=np.float32)}).request
    wired = pickle.loads(pickle.dumps([held_wire(body("a", b"first")), held_wire(oip)], protocol=5))
    assert all(type(item) is tuple for item in wired)
    data = LabelledData(tmp_path, clock=Clock())
    data.hold_inputs(version(), from_wire(wired), ts=5.0)
    assert data.join("m", "1.0", items(("a", 3), ("b", 7)), max_rows=100) == 2
    rows = read_rows("m", root=tmp_path)
    assert [(r["rid"], r["label"], r["ts"]) for r in rows] == [("a", 3, 5.0), ("b", 7, 5.0)]
    assert rows[0]["inputs"] == {"body": b"first"}
    np.testing.assert_array_equal(rows[1]["inputs"]["x"], np.arange(4, dtype=np.float32))


def test_rows_keep_json_and_text_bodies_as_the_handler_received_them(tmp_path):
    """A JSON request is kept as its object and a text one as str (TorchServe's decoding), so a
    training job or the gate replays them as the same kind of request: as raw bytes, a text
    model would read ``{"text": ...}`` as the text itself."""
    from server.instances.capture import reference_ticket
    from server.retraining.data import request_body

    data = LabelledData(tmp_path, clock=Clock())
    fields = {"j": Field(b'{"text": "rain again"}', "application/json"),
              "t": Field("lluvia".encode(), "text/plain; charset=utf-8")}
    for rid, f in fields.items():
        data.hold(version(), new_request(Protocol.REST, "m", request_id=rid, fields={"body": f}).request)
    assert data.join("m", "1.0", items(("j", "weather"), ("t", "weather")), max_rows=100) == 2
    rows = {r["rid"]: r for r in read_rows("m", root=tmp_path)}
    assert rows["j"]["inputs"] == {"body": {"text": "rain again"}} and rows["t"]["inputs"] == {"body": "lluvia"}
    for rid, f in fields.items():  # replayed: the same content type and bytes as the client's request
        replayed = reference_ticket(rid, request_body(rows[rid]), "m").request.fields["body"]
        assert replayed.content_type.split(";")[0] == f.content_type.split(";")[0]
        assert bytes(replayed.value).replace(b" ", b"") == bytes(f.value).replace(b" ", b"")


def test_held_inputs_expire_after_the_feedback_ttl_and_are_bounded(tmp_path):
    clock = Clock()
    data = LabelledData(tmp_path, clock=clock)
    data.hold(version(), body("old"))
    data.process()
    clock.t += 61  # past feedback_ttl
    assert data.join("m", None, items(("old", 1)), max_rows=100) == 0
    small = version(max_held=3)
    for i in range(5):
        data.hold(small, body(f"r{i}"))
    data.process()
    assert data.dropped == 2
    assert data.join("m", None, items(*[(f"r{i}", i) for i in range(5)]), max_rows=100) == 3


def test_rows_are_capped_at_max_rows_keeping_the_newest(tmp_path):
    data = LabelledData(tmp_path, clock=Clock())
    mv = version()
    for i in range(30):
        data.hold(mv, body(f"r{i}"))
        data.join("m", None, items((f"r{i}", i)), max_rows=10)
    rows = read_rows("m", root=tmp_path)
    assert len(rows) <= 13 and rows[-1]["label"] == 29
    assert [r["label"] for r in read_rows("m", root=tmp_path, limit=10)] == list(range(20, 30))


def test_a_torn_last_record_is_ignored(tmp_path):
    data = LabelledData(tmp_path, clock=Clock())
    data.hold(version(), body("a"))
    data.join("m", None, items(("a", 1)), max_rows=100)
    with open(dataset_path(tmp_path, "m"), "ab") as f:
        f.write(b"\x80\x05\x95garbage")  # a write cut short by SIGKILL
    assert [r["rid"] for r in read_rows("m", root=tmp_path)] == ["a"]


def test_with_redis_a_label_sent_to_another_replica_joins_and_every_reader_sees_the_rows(tmp_path, redis_server):  # noqa: F811
    import redis

    one = LabelledData(tmp_path / "a", redis=redis.Redis.from_url(redis_server.url))
    two = LabelledData(tmp_path / "b", redis=redis.Redis.from_url(redis_server.url))
    one.hold(version(), body("x", b"img"))
    one.process()
    assert two.join("m", "1.0", items(("x", 5), ("y", 1)), max_rows=100) == 1
    rows = read_rows("m", redis=redis.Redis.from_url(redis_server.url))
    assert [(r["rid"], r["label"], r["inputs"]) for r in rows] == [("x", 5, {"body": b"img"})]


def test_with_redis_json_is_decoded_when_joined_and_entries_held_by_an_earlier_osprey_still_join(tmp_path, redis_server):  # noqa: F811
    """Held inputs go to Redis as they arrived (bytes and content type) and are decoded when the
    label comes; an entry an earlier Osprey held already decoded (a rolling upgrade) joins too."""
    import pickle

    import redis

    client = redis.Redis.from_url(redis_server.url)
    data = LabelledData(tmp_path, redis=client)
    data.hold(version(), new_request(Protocol.REST, "m", request_id="j", fields={
        "body": Field(b'{"text": "rain"}', "application/json")}).request)
    data.process()
    client.set("osprey:dataset:held:m:old", b"1.0\0" + pickle.dumps({"ts": 5.0, "inputs": {"body": {"text": "snow"}}}))
    assert data.join("m", "1.0", items(("j", "weather"), ("old", "weather")), max_rows=100) == 2
    rows = {r["rid"]: r for r in read_rows("m", redis=client)}
    assert rows["j"]["inputs"] == {"body": {"text": "rain"}}
    assert rows["old"]["inputs"] == {"body": {"text": "snow"}} and rows["old"]["ts"] == 5.0


def test_with_redis_down_holds_are_dropped_and_counted_never_raised(tmp_path, redis_server):  # noqa: F811
    import redis

    data = LabelledData(tmp_path, redis=redis.Redis.from_url(redis_server.url, socket_timeout=0.5))
    redis_server.stop()
    data.hold(version(), body("x"))
    data.process()
    assert data.dropped == 1
    assert data.join("m", None, items(("x", 1)), max_rows=10) == 0
