"""A workflow's spec (the YAML named by its manifest): the models, their settings, the DAG.

Read as TorchServe 0.12 reads it (``org.pytorch.serve.ensemble.WorkFlow`` and ``Dag``): global
``min-workers``, ``max-workers``, ``batch-size``, ``max-batch-delay``, ``retry-attempts`` and
``timeout-ms`` under ``models``, overridden per model; every other key under ``models`` is a
model with a ``url``. The nodes are the names in ``dag`` (keys and targets): a node named
in ``models`` is that model, any other is a function of the workflow's handler file. The DAG
must have exactly one start node and no cycle (TorchServe's words: "DAG should have only one
start node", "Self loop exception", "Not a valid DAG"). Unlike TorchServe, a value of the
wrong type, a missing section or a node that is neither a model nor a function of the handler
file is refused here with a 400 naming it (TorchServe fails later: a Java exception, or its
worker for the function not starting).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import yaml

from server.core.errors import ErrorKind, OspreyError, show

__all__ = ["NodeModel", "WorkflowSpec", "parse_spec", "handler_functions", "java_map"]

# TorchServe's defaults (WorkFlow.java) and the spec keys that set them
DEFAULTS = {"min-workers": 1, "max-workers": 1, "batch-size": 1, "max-batch-delay": 50, "retry-attempts": 1,
            "timeout-ms": 10000}
_MINIMUM = {"min-workers": 0, "max-workers": 1, "batch-size": 1, "max-batch-delay": 0, "retry-attempts": 0,
            "timeout-ms": 1}


def _bad(workflow: str, why: str, type_name: str = "InvalidWorkflowException") -> OspreyError:
    return OspreyError(ErrorKind.BAD_INPUT, why if why.startswith(("Self loop", "Not a valid", "DAG should"))
                       else f"Invalid workflow specification of {workflow}: {why}", type_name=type_name)


@dataclass(frozen=True)
class NodeModel:
    """One node: a model (``url`` set) or a function of the handler file (``url`` None)."""

    node: str
    url: str | None
    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay: int = 0
    retry_attempts: int = 1
    timeout_ms: int = 10000


@dataclass
class WorkflowSpec:
    globals: dict[str, int]
    nodes: dict[str, NodeModel]  # by node name, in the order the dag names them
    children: dict[str, list[str]]
    parents: dict[str, list[str]]
    start: str
    order: list[str]  # topological
    dag_text: str  # the dag as TorchServe's describe shows it (a Java Map's toString)
    functions: list[str] = field(default_factory=list)


def _int(workflow: str, where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(workflow, f"{where}{key} must be a whole number, got {show(value)}")
    if value < _MINIMUM[key]:
        raise _bad(workflow, f"{where}{key} must be at least {_MINIMUM[key]}, got {value}")
    return value


def java_map(value: Any) -> str:
    """``value`` as Java's toString shows a LinkedHashMap of lists: ``{a=[b, c], b=[d]}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={java_map(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(java_map(v) for v in value) + "]"
    return "null" if value is None else str(value)


def handler_functions(source: str, handler: str) -> set[str] | None:
    """The names a handler file defines at its top level (functions, imports, assignments),
    read without running it; None when it cannot be told (a star import)."""
    try:
        tree = ast.parse(source, handler)
    except SyntaxError as exc:
        raise OspreyError(ErrorKind.BAD_INPUT, f"Workflow handler {handler} is not valid Python: {exc}") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def parse_spec(workflow: str, text: str, spec_file: str, handler: str | None,
               handler_source: str | None) -> WorkflowSpec:
    """The spec of workflow ``workflow`` from the YAML ``text``; BAD_INPUT naming what is wrong."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise OspreyError(ErrorKind.BAD_INPUT, f"Failed to parse yaml. ({spec_file}: {exc})",
                          type_name="InvalidWorkflowException") from None
    if not isinstance(spec, dict):
        raise _bad(workflow, f"{spec_file} must be a mapping with 'models' and 'dag', got {type(spec).__name__}")
    models = spec.get("models")
    if models is None:
        models = {}  # TorchServe: a NullPointerException; no models at all is a workflow of functions
    if not isinstance(models, dict):
        raise _bad(workflow, f"'models' must be a mapping, got {show(models)}")
    dag = spec.get("dag")
    if not isinstance(dag, dict) or not dag:
        raise _bad(workflow, f"{spec_file} has no 'dag' section mapping each node to the nodes its output feeds "
                             "(e.g. dag: {pre_processing: [m1], m1: [post_processing]})")
    glob = dict(DEFAULTS)
    for key in DEFAULTS:
        if key in models:
            glob[key] = _int(workflow, "models.", key, models[key])
    declared: dict[str, dict] = {}
    for name, value in models.items():
        if name in DEFAULTS:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("url"), str) or not value["url"]:
            raise _bad(workflow, f"model {show(name)} must be a mapping with a 'url' (its .mar in the model "
                                 f"store), got {show(value)}")
        unknown = sorted(set(value) - set(DEFAULTS) - {"url"})
        if unknown:
            raise _bad(workflow, f"model {name}: unknown setting(s) {', '.join(map(str, unknown))}; "
                                 f"expected url, {', '.join(DEFAULTS)}")
        declared[str(name)] = value
    children: dict[str, list[str]] = {}
    for source, targets in dag.items():
        source = str(source)
        children.setdefault(source, [])
        if targets is None:
            continue
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list):
            raise _bad(workflow, f"dag entry {source} must list the nodes it feeds, got {show(targets)}")
        for target in targets:
            if target is None or not str(target).strip():
                continue  # skipped, as TorchServe skips them
            target = str(target)
            if target == source:
                raise _bad(workflow, f"Self loop exception: dag node {source} feeds itself", "InvalidDAGException")
            children.setdefault(target, [])
            if target not in children[source]:
                children[source].append(target)
    parents: dict[str, list[str]] = {n: [] for n in children}
    for source, targets in children.items():
        for target in targets:
            parents[target].append(source)
    starts = [n for n in children if not parents[n]]
    if len(starts) != 1:
        raise _bad(workflow, f"DAG should have only one start node (it has {len(starts)}"
                             f"{': ' + ', '.join(starts) if starts else ''})", "InvalidDAGException")
    order: list[str] = []
    waiting = {n: len(p) for n, p in parents.items()}
    ready = list(starts)
    while ready:
        node = ready.pop(0)
        order.append(node)
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if len(order) != len(children):
        cyclic = sorted(n for n in children if n not in order)
        raise _bad(workflow, f"Not a valid DAG: it has a cycle through {', '.join(cyclic)}", "InvalidDAGException")
    nodes: dict[str, NodeModel] = {}
    functions = []
    for node in children:
        if node in declared:
            m = declared[node]
            settings = {k: _int(workflow, f"models.{node}.", k, m[k]) if k in m else glob[k] for k in DEFAULTS}
            if settings["max-workers"] < settings["min-workers"]:
                raise _bad(workflow, f"model {node}: max-workers ({settings['max-workers']}) is below min-workers "
                                     f"({settings['min-workers']})")
            nodes[node] = NodeModel(node, m["url"], settings["min-workers"], settings["max-workers"],
                                    settings["batch-size"], settings["max-batch-delay"], settings["retry-attempts"],
                                    settings["timeout-ms"])
        else:
            functions.append(node)
            # TorchServe's function nodes: one worker, batches of one, no delay; the global retries and timeout
            nodes[node] = NodeModel(node, None, 1, 1, 1, 0, glob["retry-attempts"], glob["timeout-ms"])
    if functions:
        if not handler or handler_source is None:
            raise _bad(workflow, f"dag node(s) {', '.join(functions)} are not models of the 'models' section, so "
                                 "they must be functions of the workflow's handler file, and the archive has none")
        defined = handler_functions(handler_source, handler)
        missing = [f for f in functions if defined is not None and f not in defined]
        if missing:
            raise _bad(workflow, f"dag node(s) {', '.join(missing)} are neither models of the 'models' section "
                                 f"({', '.join(declared) or 'none'}) nor functions of the handler {handler}")
    return WorkflowSpec(glob, nodes, children, parents, starts[0], order, java_map(dag), functions)
