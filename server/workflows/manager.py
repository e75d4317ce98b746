"""Registered workflows: register (a .war's nodes become model versions in the registry),
list, describe, unregister (its node models go too) and predict (server.workflows.dag).

TorchServe's answers, recorded from 0.12 (tests/fixtures/torchserve_workflows/answers.json):
200 "Workflow W has been registered and scaled successfully.", 409 "Workflow W is already
registered.", 404 "Workflow not found: W", 500 "Workflow W has failed to register. Failures:
[...]" when a node's model cannot be registered (the nodes registered already are taken out
again), 200 'Workflow "W" unregistered'. As in TorchServe the workflow API is not behind
enable_model_api.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.core.dataplane import DataPlane
from server.core.errors import ErrorKind, OspreyError
from server.core.events import event
from server.core.registry import Registry
from server.core.types import Field, InferenceResponse
from server.workflows.archive import WorkflowArchive, open_war, resolve_war
from server.workflows.dag import node_model, run_dag
from server.workflows.spec import WorkflowSpec, parse_spec

__all__ = ["Workflow", "Workflows"]

log = logging.getLogger("osprey.workflows")


def _not_found(name: str) -> OspreyError:
    return OspreyError(ErrorKind.NOT_FOUND, f"Workflow not found: {name}", type_name="WorkflowNotFoundException")


@dataclass
class Workflow:
    name: str
    url: str
    spec: WorkflowSpec
    archive: WorkflowArchive

    @property
    def models(self) -> list[str]:
        return [node_model(self.name, n) for n in self.spec.order]


class Workflows:
    def __init__(self, registry: Registry, dataplane: DataPlane, store: str):
        self.registry = registry
        self.dataplane = dataplane
        self.store = store  # the workflow store: where .war files are found
        self.workflows: dict[str, Workflow] = {}
        self._registering: set[str] = set()

    def get(self, name: str) -> Workflow:
        wf = self.workflows.get(name)
        if wf is None:
            raise _not_found(name)
        return wf

    # --- management ------------------------------------------------------------------
    async def register(self, url: str | None, name: str | None = None, *, response_timeout: float | None = None,
                       startup_timeout: float | None = None) -> dict[str, Any]:
        path = resolve_war(self.store, url)
        if name is not None:
            self.registry.check_name(name)
        loop = asyncio.get_running_loop()
        archive = await loop.run_in_executor(None, lambda: open_war(
            path, url, self.registry.extractions.folder(), self.registry.settings.max_archive_size, name))
        try:
            name = self.registry.check_name(archive.name)
            spec = parse_spec(name, archive.spec_text, archive.spec_file, archive.handler, archive.handler_source)
            if name in self.workflows or name in self._registering:
                raise OspreyError(ErrorKind.CONFLICT, f"Workflow {name} is already registered.")
            self._registering.add(name)
        except BaseException:
            archive.cleanup()
            raise
        try:
            failures = await self._register_nodes(name, archive, spec, response_timeout, startup_timeout)
            if failures:
                archive.cleanup()
                raise OspreyError(ErrorKind.INTERNAL, f"Workflow {name} has failed to register. "
                                                      f"Failures: [{', '.join(failures)}]",
                                  type_name="WorkflowException")
            self.workflows[name] = Workflow(name, url, spec, archive)
        finally:
            self._registering.discard(name)
        event(log, "workflow_registered", workflow=name, url=url, nodes=len(spec.order))
        return {"status": f"Workflow {name} has been registered and scaled successfully."}

    async def _register_nodes(self, name: str, archive: WorkflowArchive, spec: WorkflowSpec,
                              response_timeout: float | None, startup_timeout: float | None) -> list[str]:
        """Register every node's model concurrently; on any failure take the registered ones
        out again and return the failures (TorchServe's words), else []."""
        loop = asyncio.get_running_loop()

        async def one(node: str) -> str | None:
            settings = spec.nodes[node]
            model = node_model(name, node)
            try:
                if settings.url is None:  # a function of the handler file: a model folder made for it
                    folder = await loop.run_in_executor(None, archive.function_folder, model, node)
                    await self.registry.register(f"{archive.url}:{node}", path=folder, model_name=model,
                                                 batch_size=1, max_batch_delay=0, initial_workers=1,
                                                 response_timeout=response_timeout, startup_timeout=startup_timeout,
                                                 workflow=name)
                else:
                    # TorchServe starts max-workers workers for a workflow's model
                    await self.registry.register(settings.url, model_name=model, batch_size=settings.batch_size,
                                                 max_batch_delay=settings.max_batch_delay,
                                                 initial_workers=settings.max_workers,
                                                 response_timeout=response_timeout, startup_timeout=startup_timeout,
                                                 workflow=name)
            except OspreyError as exc:
                return f"Workflow Node {model} failed to register. Details: {exc.message}"
            except Exception as exc:  # a model that cannot load raises what its loader raised
                log.exception("workflow %s: node %s failed to register", name, node)
                return f"Workflow Node {model} failed to register. Details: {type(exc).__name__}: {exc}"
            return None

        results = await asyncio.gather(*(one(n) for n in spec.order))
        failures = [r for r in results if r is not None]
        if failures:
            for node, failure in zip(spec.order, results):
                if failure is None:
                    await self._unregister_model(node_model(name, node))
        return failures

    async def _unregister_model(self, model: str) -> None:
        try:
            mv = self.registry.get(model)
        except OspreyError:
            return  # unregistered by hand already
        for version in [v.version for v in self.registry.versions(model) if v is not mv] + [mv.version]:
            try:
                await self.registry.unregister(model, version, force=True)
            except OspreyError as exc:
                if exc.kind is not ErrorKind.NOT_FOUND:
                    raise

    async def unregister(self, name: str) -> dict[str, Any]:
        wf = self.workflows.pop(name, None)
        if wf is None:
            raise _not_found(name)
        try:
            await asyncio.gather(*(self._unregister_model(m) for m in wf.models))
        finally:
            wf.archive.cleanup()
        event(log, "workflow_unregistered", workflow=name)
        return {"status": f"Workflow \"{name}\" unregistered"}

    def list(self, limit: int, token: int) -> dict[str, Any]:
        """``GET /workflows``: as TorchServe pages it (limit outside 0..100 is 100, a negative token 0)."""
        if limit < 0 or limit > 100:
            limit = 100
        token = max(token, 0)
        names = sorted(self.workflows)
        body: dict[str, Any] = {}
        if token + limit <= len(names):  # TorchServe: a token whenever the page reaches the end exactly or not
            body["nextPageToken"] = str(token + limit)
        body["workflows"] = [{"workflowName": n, "workflowUrl": self.workflows[n].url}
                             for n in names[token:token + limit]]
        return body

    def describe(self, name: str) -> list[dict[str, Any]]:
        wf = self.get(name)
        g = wf.spec.globals
        return [{"workflowName": name, "workflowUrl": wf.url, "minWorkers": g["min-workers"],
                 "maxWorkers": g["max-workers"], "batchSize": g["batch-size"], "maxBatchDelay": g["max-batch-delay"],
                 "workflowDag": wf.spec.dag_text,
                 # Osprey's: the models its nodes run as
                 "models": wf.models}]

    # --- inference -------------------------------------------------------------------
    async def predict(self, name: str, fields: dict[str, Field], headers: dict[str, Any], request_id: str,
                      client: Any = None) -> InferenceResponse:
        wf = self.get(name)
        return await run_dag(self.dataplane, name, wf.spec, fields, headers, request_id, client)

    async def close(self) -> None:
        for wf in self.workflows.values():
            wf.archive.cleanup()
        self.workflows.clear()
