"""The workflow spec reader (server.workflows.spec): settings, nodes, the DAG's checks."""

from __future__ import annotations

import pytest
import yaml

from server.core.errors import ErrorKind, OspreyError
from server.workflows.spec import parse_spec
from tests.workflow_archives import FAN_IN, SEQUENTIAL, WORKFLOW_HANDLER


def spec(doc, handler: str | None = WORKFLOW_HANDLER):
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
    return parse_spec("wf", text, "spec.yaml", "wf_handler.py" if handler else None, handler)


def test_sequential_spec_nodes_settings_and_order():
    s = spec(SEQUENTIAL)
    assert s.order == ["pre", "double", "add_one", "post"] and s.start == "pre"
    assert s.functions == ["pre", "post"]
    double, add_one, pre = s.nodes["double"], s.nodes["add_one"], s.nodes["pre"]
    assert (double.url, double.batch_size, double.max_batch_delay, double.retry_attempts, double.timeout_ms) == \
        ("double.mar", 4, 5, 1, 10000)
    assert add_one.batch_size == 2  # the model's own value over the global one
    assert (pre.url, pre.batch_size, pre.max_batch_delay) == (None, 1, 0)  # functions: batches of one, no delay
    assert s.dag_text == "{pre=[double], double=[add_one], add_one=[post]}"  # as TorchServe's describe shows it


def test_fan_in_parents_in_dag_order():
    s = spec(FAN_IN)
    assert s.parents["merge"] == ["double", "add_one"] and s.children["pre"] == ["double", "add_one"]
    assert s.globals == {"min-workers": 1, "max-workers": 1, "batch-size": 1, "max-batch-delay": 50,
                         "retry-attempts": 1, "timeout-ms": 10000}  # TorchServe's defaults


@pytest.mark.parametrize("doc, words", [
    ({"models": {}, "dag": {"pre": ["a"], "a": ["b"], "b": ["a"]}}, "Not a valid DAG: it has a cycle through a, b"),
    ({"models": {}, "dag": {"pre": ["pre"]}}, "Self loop exception"),
    ({"models": {}, "dag": {"pre": ["post"], "merge": ["post"]}}, "DAG should have only one start node (it has 2: pre, merge)"),
    ({"models": {}, "dag": {"pre": ["nope"]}}, "dag node(s) nope are neither models"),
    ({"models": {"m": {"url": "m.mar", "batch-size": 0}}, "dag": {"pre": ["m"]}}, "models.m.batch-size must be at least 1"),
    ({"models": {"m": {"url": "m.mar", "workers": 2}}, "dag": {"pre": ["m"]}}, "unknown setting(s) workers"),
    ({"models": {"m": "m.mar"}, "dag": {"pre": ["m"]}}, "model 'm' must be a mapping with a 'url'"),
    ({"models": {"timeout-ms": True}, "dag": {"pre": ["post"]}}, "models.timeout-ms must be a whole number"),
    ({"models": {}}, "has no 'dag' section"),
    ("- a list\n", "must be a mapping with 'models' and 'dag'"),
    ("dag: {pre: [", "Failed to parse yaml."),
])
def test_bad_specs_are_refused_naming_what_is_wrong(doc, words):
    with pytest.raises(OspreyError) as err:
        spec(doc)
    assert err.value.kind is ErrorKind.BAD_INPUT and words in err.value.message, err.value.message


def test_function_nodes_need_a_handler_file_and_a_star_import_is_trusted():
    with pytest.raises(OspreyError, match="the archive has none"):
        spec({"dag": {"pre": ["post"]}}, handler=None)
    assert spec({"dag": {"pre": ["post"]}}, handler="from helpers import *\n").functions == ["pre", "post"]
    with pytest.raises(OspreyError, match="not valid Python"):
        spec({"dag": {"pre": ["post"]}}, handler="def pre(:\n")
