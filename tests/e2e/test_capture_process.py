"""Monitoring capture through real instances: a process-isolated instance computes each
sampled batch's Observation in its child and the parent hands it to ``observe`` (from the
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


def _serve(instance, rounds: int = 2, observed: list | None = None) -> list:
    """Run ``rounds`` batches; with ``observed``, wait (bounded) for one observation per round
    before stopping the instance (the child sends them after its answers)."""
    async def main():
        instance.start()
        await instance.wait_loaded(120)
        loop = asyncio.get_running_loop()
        out = []
        for k in range(rounds):
            done = loop.create_future()
            instance.submit([_tickets(f"k{k}-")], loop, lambda _i, _b, outcomes: done.set_result(outcomes))
            out.append(await asyncio.wait_for(done, 120))
        end = time.monotonic() + 30
        while observed is not None and len(observed) < rounds and time.monotonic() < end:
            await asyncio.sleep(0.02)
        instance.stop()
        return out

    try:
        return asyncio.run(main())
    finally:
        instance.kill()


def _bodies(outcomes: list) -> list:
    return [getattr(o, "body", None) or o.message for o in outcomes[0]]


def _check(obs: Observation, prefix: str) -> None:
    assert obs.model == "tab_proc" and obs.version == "1.0" and obs.error is None
    assert obs.request_ids == [f"{prefix}0", f"{prefix}1", f"{prefix}1"]  # the bad record is refused, not observed
    np.testing.assert_allclose(obs.features["age"], [61, 40, 35], rtol=1e-5)
    assert obs.task == "classification" and obs.classes == ("benign", "malignant")
    assert obs.outputs.shape == (3, 2) and obs.embedding.shape == (3, 8) and obs.embedding.dtype == np.float32


def test_a_process_instance_delivers_observations_to_the_parents_observe(tabular):
    from server.instances.process import ProcessInstance

    observed: list[Observation] = []
    threads: set[str] = set()

    def observe(obs):
        threads.add(threading.current_thread().name)
        observed.append(obs)

    config = parse_model_config({**tabular.config, "deviceType": "cpu", "isolation": "process"})
    monitored = _serve(ProcessInstance("tab_proc", "1.0", tabular, config, 0, None, None, 0, observe), 2, observed)
    assert len(observed) == 2
    _check(observed[0], "k0-")
    _check(observed[1], "k1-")
    assert threads == {"osprey-proc-tab_proc-1.0-0"}  # the parent's reader thread, not the event loop
    plain = _serve(ProcessInstance("tab_proc", "1.0", tabular, config, 0, None, None, 0, None))
    assert [_bodies(o) for o in monitored] == [_bodies(o) for o in plain]
    assert b"malignant" in monitored[0][0][0].body


def test_a_thread_instance_calls_observe_from_its_thread(tabular):
    from server.instances.thread import ModelInstance

    observed: list[Observation] = []
    threads: set[str] = set()

    def observe(obs):
        threads.add(threading.current_thread().name)
        observed.append(obs)

    config = parse_model_config({**tabular.config, "deviceType": "cpu", "monitoring": {"sample_rate": 1.0}})
    _serve(ModelInstance("tab_proc", "1.0", tabular, config, 0, None, None, observe), 2, observed)
    assert len(observed) == 2
    _check(observed[1], "k1-")
    assert threads == {"osprey-tab_proc-1.0-0"}


def test_monitoring_off_for_the_model_sends_nothing(tabular):
    from server.instances.process import ProcessInstance

    observed: list[Observation] = []
    config = parse_model_config({**tabular.config, "deviceType": "cpu", "monitoring": {"enabled": False}})
    out = _serve(ProcessInstance("tab_proc", "1.0", tabular, config, 0, None, None, 0, observed.append), rounds=1)
    assert b"malignant" in out[0][0][0].body or b"benign" in out[0][0][0].body
    time.sleep(0.5)
    assert observed == []
