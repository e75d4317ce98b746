"""Monitoring capture through real instances: a process-isolated instance computes the
Observation of its sampled batches in its child (one for several batches, flushed when the
instance goes idle) and the parent hands it to ``observe`` (from the
thread that reads the child); a thread instance calls ``observe`` from its own thread. The
answers are the same with and without monitoring.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from server.core.capture import Observation
from server.core.model_config import parse_model_config
from server.core.types import Field, InferenceRequest, Ticket
from tests.unit.test_capture import FEATURES, build

RECORDS = [{"age": 61, "bmi": 30.5, "bp": 101}, [{"age": 40, "bmi": 22.0, "bp": 80}, [35, 19.5, 120]],
           {"age": 70, "bmi": "x", "bp": 95}]


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    store = tmp_path_factory.mktemp("capture-process")
    return build(store, "tab_proc", "tabular", "TabularNet",
                 files={"features.json": json.dumps(FEATURES), "index_to_name.json": json.dumps(["benign", "malignant"])})


def _tickets(prefix: str) -> list[Ticket]:
    return [Ticket(InferenceRequest("tab_proc", "1.0", f"{prefix}{i}",
                                    fields={"body": Field(json.dumps(r).encode(), "application/json")}))
            for i, r in enumerate(RECORDS)]


class Collector:
    """``observe`` for a test: keeps observations and the thread that handed each over; ``wait``
    blocks until ``rows`` rows arrived (the instance flushes them when it goes idle)."""

    def __init__(self):
        self.observed: list[Observation] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, obs: Observation) -> None:
        with self._cond:
            self.threads.add(threading.current_thread().name)
            self.observed.append(obs)
            self._cond.notify_all()

    def wait(self, rows: int, timeout: float = 30) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(len(o) for o in self.observed) >= rows, timeout)


def _serve(instance, rounds: int = 2, collector: Collector | None = None) -> list:
    """Run ``rounds`` batches; with ``collector``, wait (bounded, on its condition) until the
    rows of every round were observed before stopping the instance."""
    async def main():
        instance.start()
        await instance.wait_loaded(120)
        loop = asyncio.get_running_loop()
        out = []
        for k in range(rounds):
            done = loop.create_future()
            instance.submit([_tickets(f"k{k}-")], loop, lambda _i, _b, outcomes: done.set_result(outcomes))
            out.append(await asyncio.wait_for(done, 120))
        if collector is not None:
            assert await asyncio.to_thread(collector.wait, 3 * rounds), "the idle instance flushed nothing"
        instance.stop()
        return out

    try:
        return asyncio.run(main())
    finally:
        instance.kill()


def _joined(observed: list[Observation]) -> Observation:
    """The observations' rows as one (however the instance grouped its batches)."""
    def cat(get):
        parts = [get(o) for o in observed]
        return None if any(p is None for p in parts) else np.concatenate(parts)
    first = observed[0]
    assert all(o.error is None and o.task == first.task and o.classes == first.classes for o in observed)
    return Observation(first.model, first.version, [i for o in observed for i in o.request_ids], observed[-1].time,
                       features={k: cat(lambda o: o.features[k]) for k in first.features},
                       predictions={k: cat(lambda o: o.predictions[k]) for k in first.predictions},
                       categorical=first.categorical, embedding=cat(lambda o: o.embedding), task=first.task,
                       outputs=cat(lambda o: o.outputs), classes=first.classes)


def _bodies(outcomes: list) -> list:
    return [getattr(o, "body", None) or o.message for o in outcomes[0]]


def _check(obs: Observation, prefixes: tuple[str, ...]) -> None:
    assert obs.model == "tab_proc" and obs.version == "1.0" and obs.error is None
    # the bad record is refused, not observed
    assert obs.request_ids == [f"{p}{i}" for p in prefixes for i in (0, 1, 1)]
    np.testing.assert_allclose(obs.features["age"], [61, 40, 35] * len(prefixes), rtol=1e-5)
    n = 3 * len(prefixes)
    assert obs.task == "classification" and obs.classes == ("benign", "malignant")
    assert obs.outputs.shape == (n, 2) and obs.embedding.shape == (n, 8) and obs.embedding.dtype == np.float32


def test_a_process_instance_delivers_observations_to_the_parents_observe(tabular):
    from server.instances.process import ProcessInstance

    got = Collector()
    config = parse_model_config({**tabular.config, "deviceType": "cpu", "isolation": "process"})
    monitored = _serve(ProcessInstance("tab_proc", "1.0", tabular, config, 0, None, None, 0, got), 2, got)
    assert 1 <= len(got.observed) <= 2  # the child built one per batch, or one for both
    _check(_joined(got.observed), ("k0-", "k1-"))
    assert got.threads == {"osprey-proc-tab_proc-1.0-0"}  # the parent's reader thread, not the event loop
    plain = _serve(ProcessInstance("tab_proc", "1.0", tabular, config, 0, None, None, 0, None))
    assert [_bodies(o) for o in monitored] == [_bodies(o) for o in plain]
    assert b"malignant" in monitored[0][0][0].body


def test_a_thread_instance_calls_observe_from_its_thread(tabular):
    from server.instances.thread import ModelInstance

    got = Collector()
    config = parse_model_config({**tabular.config, "deviceType": "cpu", "monitoring": {"sample_rate": 1.0}})
    _serve(ModelInstance("tab_proc", "1.0", tabular, config, 0, None, None, got), 2, got)
    assert 1 <= len(got.observed) <= 2
    _check(_joined(got.observed), ("k0-", "k1-"))
    assert got.threads == {"osprey-tab_proc-1.0-0"}


def test_several_batches_of_one_handoff_give_one_observation_flushed_when_the_instance_idles(tabular):
    """Three batches in one handoff: nothing is due (3 batches, 9 requests, well under 0.5 s),
    so the instance hands over nothing until it finds no more work, then ONE observation
    with every row of the three."""
    from server.instances.thread import ModelInstance

    got = Collector()
    config = parse_model_config({**tabular.config, "deviceType": "cpu"})
    instance = ModelInstance("tab_proc", "1.0", tabular, config, 0, None, None, got)

    async def main():
        instance.start()
        await instance.wait_loaded(120)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        instance.submit([_tickets(f"h{k}-") for k in range(3)], loop,
                        lambda _i, _b, outcomes: done.set_result(outcomes))
        await asyncio.wait_for(done, 120)
        assert await asyncio.to_thread(got.wait, 9), "the idle instance flushed nothing"
        instance.stop()

    try:
        asyncio.run(main())
    finally:
        instance.kill()
    assert len(got.observed) == 1
    _check(got.observed[0], ("h0-", "h1-", "h2-"))


def test_monitoring_off_for_the_model_sends_nothing(tabular):
    from server.instances.process import ProcessInstance

    observed: list[Observation] = []
    config = parse_model_config({**tabular.config, "deviceType": "cpu", "monitoring": {"enabled": False}})
    out = _serve(ProcessInstance("tab_proc", "1.0", tabular, config, 0, None, None, 0, observed.append), rounds=1)
    assert b"malignant" in out[0][0][0].body or b"benign" in out[0][0][0].body
    time.sleep(0.5)
    assert observed == []
