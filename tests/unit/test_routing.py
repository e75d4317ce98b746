"""Traffic routing in the core: weights, the split, shadow comparison, version counters, and
the registry's traffic, shadow and rollback rules (on stand-in versions: no instances run)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import numpy as np
import pytest

from server.core.errors import ErrorKind, OspreyError
from server.core.registry import Registry, _Model
from server.core.routing import HISTORY, Routing, Split, check_weights, remember
from server.core.shadow import agree
from server.core.stats import VersionStats, count
from server.core.types import InferenceResponse, Protocol, new_request
from server.settings import Settings


# --- weights ------------------------------------------------------------------------------
def test_weights_are_checked_and_each_error_names_what_is_wrong():
    assert check_weights("m", {"1.0": 90, "2.0": 10.5}) == {"1.0": 90.0, "2.0": 10.5}
    assert check_weights("m", {"1.0": 1, "2.0": 0}) == {"1.0": 1.0, "2.0": 0.0}
    assert check_weights("m", None) == {} and check_weights("m", {}) == {}
    cases = [([90, 10], "must be an object"), ({"1.0": "90"}, "version 1.0 must be a number"),
             ({"1.0": True}, "version 1.0 must be a number"), ({"2.0": -1}, "version 2.0 must be a finite number >= 0"),
             ({"2.0": float("nan")}, "version 2.0"), ({"2.0": float("inf")}, "version 2.0"),
             ({"1.0": 0, "2.0": 0}, "all zero"), ({"": 1}, "non-empty string"),
             ({str(i): 1 for i in range(65)}, "at most 64")]
    for weights, words in cases:
        with pytest.raises(OspreyError) as e:
            check_weights("m", weights)
        assert e.value.kind is ErrorKind.BAD_INPUT and words in e.value.message, (weights, e.value.message)


def test_split_picks_by_cumulative_weight_and_never_a_zero_weight():
    s = Split({"a": 1, "zero": 0, "b": 3})
    assert [s.pick(d) for d in (0.0, 0.2499, 0.25, 0.5, 0.9999999)] == ["a", "a", "b", "b", "b"]
    assert s.shares() == {"a": 0.25, "zero": 0.0, "b": 0.75}
    assert s.without("b") is not None and s.without("b").pick(0.99) == "a"
    assert Split({"a": 1, "b": 0}).without("a") is None  # only a zero weight left: no split
    with pytest.raises(ValueError):
        Split({"a": 0})


def test_seeded_draws_route_about_the_weights_share():
    r = Routing(draw=random.Random(12).random)
    r.split = Split({"1.0": 90, "2.0": 10})
    picks = [r.pick() for _ in range(10_000)]
    assert 0.08 < picks.count("2.0") / len(picks) < 0.12
    assert Routing().pick() is None  # no weights: the default


def test_forget_takes_a_version_out_of_weights_and_shadow():
    r = Routing()
    r.split, r.shadow = Split({"1.0": 90, "2.0": 10}), "3.0"
    r.forget("2.0")
    assert r.split.weights == {"1.0": 90} and not r.empty
    r.forget("3.0")
    assert r.shadow is None and not r.empty
    r.forget("1.0")
    assert r.split is None and r.empty


def test_history_keeps_each_earlier_default_once_most_recent_last_and_is_bounded():
    h: list[str] = []
    remember(h, "1.0", "2.0")
    remember(h, "2.0", "3.0")
    assert h == ["1.0", "2.0"]
    remember(h, "3.0", "1.0")  # back to 1.0: it leaves the history, 3.0 joins it
    assert h == ["2.0", "3.0"]
    for i in range(40):
        remember(h, f"v{i}", f"v{i + 1}")
    assert len(h) == HISTORY and h[-1] == "v39"


# --- shadow comparison --------------------------------------------------------------------
def _r(body: bytes = b"", status: int = 200, tensors=None) -> InferenceResponse:
    return InferenceResponse(body=body, status=status, tensors=tensors)


@pytest.mark.parametrize("a, b, same", [
    (b'{"cat": 0.9, "dog": 0.1}', b'{"cat": 0.6, "dog": 0.4}', True),   # same top class
    (b'{"cat": 0.9, "dog": 0.1}', b'{"cat": 0.3, "dog": 0.7}', False),
    (b'[0.1, 0.7, 0.2]', b'[0.2, 0.5, 0.3]', True),                     # same argmax
    (b'[0.1, 0.7, 0.2]', b'[0.5, 0.2, 0.3]', False),
    (b'[1.0]', b'[1.005]', True), (b'[1.0]', b'[1.5]', False),          # close / not close
    (b'3.0', b'3.001', True), (b'{"class": 3}', b'{"class": 4}', False),
    (b'{"version": "1.0"}', b'{"version": "2.0"}', False), (b'"x"', b'"x"', True),
    (b'not json', b'not json', True), (b'not json', b'other', False), (b'[1, 2]', b'[1, 2, 3]', False),
])
def test_answers_agree_on_close_outputs_or_the_same_top_class(a, b, same):
    assert agree(_r(a), _r(b)) is same


def test_tensors_and_statuses_are_compared():
    p = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    assert agree(_r(tensors={"out": p}), _r(tensors={"out": p * 0.9}))
    assert not agree(_r(tensors={"out": p}), _r(tensors={"out": p[:, ::-1].copy()}))
    assert agree(_r(tensors={"y": np.array([1.0])}), _r(tensors={"y": np.array([1.0001])}))
    assert not agree(_r(tensors={"y": np.array([1.0])}), _r(tensors={"z": np.array([1.0])}))
    assert not agree(_r(b"1"), _r(b"1", status=500))


# --- per-version counters -----------------------------------------------------------------
def test_version_stats_count_requests_errors_and_answered_latency():
    mv = SimpleNamespace(stats=VersionStats())
    t = new_request(Protocol.REST, "m")
    t.timings.received = 0.0  # unknown arrival: latency 0
    count(mv, t, _r(status=200))
    count(mv, t, OspreyError(ErrorKind.QUEUE_FULL, "full"))
    count(mv, t, OspreyError(ErrorKind.BAD_INPUT, "bad"))
    count(None, t, _r())  # unknown model: nothing to count
    assert mv.stats.as_dict() == {"requests": 3, "errors": 1, "latency_sum_s": 0.0, "latency_count": 1}


# --- the registry's rules (stand-in versions) ---------------------------------------------
def _version(name: str, version: str, ready: bool = True):
    return SimpleNamespace(name=name, version=version, ready=ready, instances=[], shadow_results={},
                           stats=VersionStats())


@pytest.fixture
def registry(tmp_path):
    loop = asyncio.new_event_loop()
    reg = Registry(Settings(workdir=str(tmp_path)), loop, instance_factory=None)
    reg.models["m"] = _Model(versions={v: _version("m", v) for v in ("1.0", "2.0", "3.0")}, default="1.0")
    reg.models["m"].versions["9.0"] = _version("m", "9.0", ready=False)
    yield reg
    loop.close()


def _error(fn, *args) -> OspreyError:
    with pytest.raises(OspreyError) as e:
        fn(*args)
    return e.value


def test_no_weights_no_routes_and_requests_go_to_the_default(registry):
    assert registry.routes == {}
    assert registry.route("m").version == "1.0"
    t = registry.traffic("m")
    assert {k: v for k, v in t.items() if k != "stats"} == {
        "model": "m", "default": "1.0", "weights": {}, "shares": {"1.0": 1.0}, "shadow": None,
        "shadow_results": {}, "previous": []}
    assert t["stats"]["1.0"] == {"requests": 0, "errors": 0, "latency_sum_s": 0.0, "latency_count": 0}


def test_weights_route_and_clearing_them_removes_the_route(registry):
    t = registry.set_traffic("m", {"1.0": 0, "2.0": 1})
    assert t["shares"] == {"1.0": 0.0, "2.0": 1.0}
    assert {registry.route("m").version for _ in range(50)} == {"2.0"}
    registry.models["m"].versions["2.0"].ready = False  # a canary that cannot serve now gives way
    assert registry.route("m").version == "1.0"
    registry.set_traffic("m", {})
    assert registry.routes == {} and registry.route("m").version == "1.0"


def test_weights_on_unknown_or_unready_versions_are_refused_naming_them(registry):
    e = _error(registry.set_traffic, "m", {"1.0": 90, "7.0": 10})
    assert e.kind is ErrorKind.NOT_FOUND and "7.0" in e.message
    e = _error(registry.set_traffic, "m", {"1.0": 90, "9.0": 10})
    assert e.kind is ErrorKind.CONFLICT and "9.0 is not ready" in e.message
    assert _error(registry.set_traffic, "nope", {"1.0": 1}).kind is ErrorKind.NOT_FOUND
    assert registry.routes == {}


def test_shadow_rules(registry):
    assert _error(registry.set_shadow, "m", "1.0").kind is ErrorKind.CONFLICT  # the default
    assert _error(registry.set_shadow, "m", "9.0").kind is ErrorKind.CONFLICT  # not ready
    assert _error(registry.set_shadow, "m", "7.0").kind is ErrorKind.NOT_FOUND
    t = registry.set_shadow("m", "2.0")
    assert t["shadow"] == "2.0" and t["shadow_results"] == {"agree": 0, "disagree": 0, "error": 0, "dropped": 0}
    one, two = registry.models["m"].versions["1.0"], registry.models["m"].versions["2.0"]
    assert registry.shadow_for(one) is two and registry.shadow_for(two) is None
    registry.set_default("m", "2.0")  # the shadow became the default: no longer the shadow
    assert registry.traffic("m")["shadow"] is None and registry.routes == {}


def test_set_default_keeps_weights_and_rollback_clears_them(registry):
    registry.set_traffic("m", {"1.0": 90, "2.0": 10})
    registry.set_default("m", "2.0")
    assert registry.traffic("m")["weights"] == {"1.0": 90, "2.0": 10}  # promotion: then set_traffic(None)
    registry.set_default("m", "3.0")
    assert registry.default_history("m") == ["2.0", "1.0"]
    assert registry.rollback("m") == "2.0"
    t = registry.traffic("m")
    assert (t["default"], t["weights"], t["previous"]) == ("2.0", {}, ["1.0"])
    assert registry.rollback("m") == "1.0"
    e = _error(registry.rollback, "m")
    assert e.kind is ErrorKind.CONFLICT and "no earlier default" in e.message
    assert registry.rollbacks("m") == 2  # osprey_model_rollbacks_total; the refused one does not count


def test_rollback_to_a_version_that_is_not_ready_is_refused_and_changes_nothing(registry):
    registry.set_default("m", "2.0")
    registry.models["m"].versions["1.0"].ready = False
    e = _error(registry.rollback, "m")
    assert e.kind is ErrorKind.CONFLICT and "version 1.0" in e.message and "not ready" in e.message
    assert registry.traffic("m")["default"] == "2.0" and registry.default_history("m") == ["1.0"]


def test_unregister_drops_a_version_from_weights_shadow_and_history(registry):
    async def go():
        for v in ("1.0", "2.0", "3.0"):  # stand-ins: unregister needs their batcher and archive
            mv = registry.models["m"].versions[v]
            mv.batcher = SimpleNamespace(in_flight=0, queue=[], instances=0, fail_all=lambda e: None)
            mv.archive = SimpleNamespace(cleanup=lambda: None)
        registry._release_heap_after = lambda *a: None
        registry.set_default("m", "2.0")
        registry.set_traffic("m", {"2.0": 50, "3.0": 50})
        await registry.unregister("m", "3.0")
        assert registry.traffic("m")["weights"] == {"2.0": 50}
        registry.set_shadow("m", "1.0")
        await registry.unregister("m", "1.0")
        t = registry.traffic("m")
        assert (t["shadow"], t["previous"]) == (None, [])
        assert _error(registry.rollback, "m").kind is ErrorKind.CONFLICT
    registry.loop.run_until_complete(go())


# --- shadow copies (a stand-in batcher) ---------------------------------------------------
class _Batcher:
    def __init__(self, loop, answer=None, error=None, pending=0, queue_size=2, instances=1):
        self.loop, self.answer, self.error = loop, answer, error
        self.pending, self.queue_size, self.instances = pending, queue_size, instances
        self.submitted = []

    def submit(self, ticket):
        if self.error is not None:
            raise self.error
        self.submitted.append(ticket)
        fut = self.loop.create_future()
        fut.set_result(self.answer)
        return fut


def _shadow(batcher):
    return SimpleNamespace(name="m", version="2.0", batcher=batcher, shadow_results={}, stats=VersionStats(),
                           config=SimpleNamespace(response_timeout_s=5.0))


def test_a_copy_snapshots_the_inputs_and_is_counted_by_result():
    from server.core.shadow import copy_of, run_copy

    loop = asyncio.new_event_loop()
    try:
        ticket = new_request(Protocol.REST_V2, "m", None, request_id="rid-1", tensors={"x": np.zeros(3)},
                             headers={"h": "1"})
        copy = copy_of(ticket, "2.0")
        ticket.request.tensors["x"][0] = 7  # the champion's handler changes its input in place
        assert copy.request.tensors["x"][0] == 0 and copy.request.version == "2.0"
        assert copy.request.request_id == "rid-1" and copy.client is None
        champion = _r(b'{"cat": 0.9, "dog": 0.1}')
        cases = [(_Batcher(loop, answer=_r(b'{"cat": 0.8, "dog": 0.2}')), "agree"),
                 (_Batcher(loop, answer=_r(b'{"cat": 0.1, "dog": 0.9}')), "disagree"),
                 (_Batcher(loop, pending=2), "dropped"), (_Batcher(loop, instances=0), "dropped"),
                 (_Batcher(loop, error=OspreyError(ErrorKind.QUEUE_FULL, "full")), "dropped"),
                 (_Batcher(loop, error=OspreyError(ErrorKind.PREDICTION_FAILED, "boom")), "error")]
        for batcher, result in cases:
            mv = _shadow(batcher)
            assert loop.run_until_complete(run_copy(mv, copy_of(ticket, "2.0"), champion)) == result
            assert mv.shadow_results == {result: 1}
            assert mv.stats.requests == (0 if result == "dropped" else 1)
            assert mv.stats.errors == (1 if result == "error" else 0)
        assert cases[0][0].submitted[0].deadline is not None  # the shadow's own responseTimeout
    finally:
        loop.close()
