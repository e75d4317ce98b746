"""Model instances: one handler object in its own execution thread.

The event loop never runs a handler. :meth:`ModelInstance.submit` hands a batch to the
instance's thread; the thread decodes the inputs the way TorchServe's worker does, calls
``handle(data, context)``, encodes each answer, and reports back on the loop with
``call_soon_threadsafe``. A request whose inputs cannot be decoded fails alone and the
rest of its batch runs without it; a batch whose handler fails as a whole is re-run one
request at a time so that only the request at fault fails.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from handlers.context import Context, RequestProcessor
from handlers.instance_thread import prepare_instance_thread
from handlers.metrics import HandlerMetrics

from server import __version__
from server.core.archive import ModelArchive
from server.core.errors import ErrorKind, OspreyError, from_status
from server.core.model_config import ModelConfig
from server.core.codecs import decode_field, encode_body, fields_from_tensors
from server.instances.service import Service, make_service
from server.core.instance import InstanceStatus
from server.core.types import InferenceResponse, Ticket

__all__ = ["ModelInstance", "Outcome"]

log = logging.getLogger("osprey.instances")

Outcome = InferenceResponse | OspreyError
_ids = itertools.count(9000)


def _error_for(exc: BaseException) -> OspreyError:
    if isinstance(exc, OspreyError):
        return exc
    code = getattr(exc, "error_code", None)
    if isinstance(code, int) and not isinstance(code, bool):  # PredictionException(message, code)
        return OspreyError(from_status(code), str(getattr(exc, "message", exc)), status=code)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
            (isinstance(exc, RuntimeError) and str(exc).startswith("CUDA out of memory")):  # torch < 1.13
        return OspreyError(ErrorKind.OUT_OF_MEMORY, "Out of resources")
    return OspreyError(ErrorKind.PREDICTION_FAILED, "Prediction failed")


class ModelInstance:
    """One handler object and the thread that runs it."""

    def __init__(self, name: str, version: str, archive: ModelArchive, config: ModelConfig,
                 index: int, gpu_id: int | None, metrics_sink: Callable | None = None):
        self.name, self.version, self.archive, self.config = name, version, archive, config
        self.index = index
        self.id = str(next(_ids))
        self.gpu_id = gpu_id
        self.status = InstanceStatus.LOADING
        self.start_time = time.time()
        self.error: str | None = None
        self.service: Service | None = None
        self.context = Context(name, str(archive.model_dir), archive.manifest, config.batch_size,
                               gpu_id, __version__, True,
                               HandlerMetrics(name, metrics_sink), dict(config.raw))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=f"osprey-{name}-{version}-{index}", daemon=True)
        self._loaded = threading.Event()
        self._on_loaded: Callable[[], None] | None = None  # wakes wait_loaded on the loop

    # --- lifecycle (called from the loop) -------------------------------------------
    def start(self) -> None:
        self._thread.start()

    async def wait_loaded(self, timeout: float) -> None:
        # awaited on the loop, not in an executor thread: 64 instances loading at once must not
        # take every thread of the default executor (archive extraction at register needs one)
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        self._on_loaded = lambda: loop.call_soon_threadsafe(wake)
        if self._loaded.is_set():  # the thread may have finished before the callback was there
            wake()
        try:
            await asyncio.wait_for(woken, timeout)
        except asyncio.TimeoutError:
            pass
        loaded = self._loaded.is_set()
        if not loaded:
            self.status = InstanceStatus.FAILED
            raise OspreyError(ErrorKind.UNAVAILABLE, f"model {self.name} did not load within {timeout:g} s (startupTimeout)")
        if self.status == InstanceStatus.STOPPED:
            raise OspreyError(ErrorKind.UNAVAILABLE, f"model {self.name} was stopped while loading")
        if self.status != InstanceStatus.READY:
            raise OspreyError(ErrorKind.BAD_INPUT, f"model {self.name} failed to load: {self.error}")

    def stop(self) -> None:
        self.status = InstanceStatus.STOPPED
        self._jobs.put(None)

    @property
    def ended(self) -> bool:
        """The thread has finished (or never started): its handler and model are dropped."""
        return self._thread.ident is None or not self._thread.is_alive()

    def release(self) -> None:
        """Drop the handler object (and its model) and the context once the thread has ended."""
        if self.ended:
            self.service = None
            self.context = None
            self._on_loaded = None

    @property
    def accepts_tensors(self) -> bool:
        return bool(self.service and self.service.accepts_tensors)

    def tensor_specs(self) -> tuple[Any, Any]:
        """(inputs, outputs) the loaded handler declares (``tensor_metadata()`` or
        ``inputs``/``outputs`` attributes), None where it declares none."""
        target = self.service.target if self.service is not None else None
        if target is None:
            return None, None
        declared = target.tensor_metadata() if callable(getattr(target, "tensor_metadata", None)) else {}
        return (declared.get("inputs") or getattr(target, "inputs", None),
                declared.get("outputs") or getattr(target, "outputs", None))

    def submit(self, batches: list[list[Ticket]], loop: asyncio.AbstractEventLoop,
               on_done: Callable[["ModelInstance", list, list[list[Outcome]]], None]) -> None:
        """Run ``batches`` one after another; report all their outcomes with one loop callback."""
        self._jobs.put((batches, loop, on_done))

    # --- the thread ------------------------------------------------------------------
    def _main(self) -> None:
        try:
            prepare_instance_thread(self.config.jit_optimize, self.gpu_id is not None)
            self.service = make_service(str(self.archive.model_dir), self.archive.handler)
            if self.service.initialize is not None:
                self.service.initialize(self.context)
            warmup = getattr(self.service.target, "warmup", None)
            if callable(warmup):
                warmup(self.context)
            if self.status != InstanceStatus.STOPPED:  # stopped while loading: it ends below without serving
                self.status = InstanceStatus.READY
        except BaseException as exc:  # reported at registration, never raised on the loop
            log.exception("model %s instance %d failed to load", self.name, self.index)
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = InstanceStatus.FAILED
        finally:
            self._loaded.set()
            wake = self._on_loaded
            if wake is not None:
                try:
                    wake()
                except RuntimeError:  # the loop has closed: nobody is waiting
                    pass
        if self.status != InstanceStatus.READY:
            return
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batches, loop, on_done = job
            outcomes = []
            for batch in batches:  # several small batches per handoff: see Batcher._bundle_limit
                try:
                    outcomes.append(self.run(batch))
                except BaseException as exc:  # never lose a batch
                    log.exception("model %s: unexpected failure", self.name)
                    outcomes.append([_error_for(exc)] * len(batch))
            try:
                loop.call_soon_threadsafe(on_done, self, batches, outcomes)
            except RuntimeError:  # loop closed during shutdown
                break

    def run(self, batch: list[Ticket]) -> list[Outcome]:
        """Handle a batch; if it fails as a whole, handle each request alone.

        A request whose inputs cannot be decoded fails alone before the handler runs; the
        others go on as one batch without it."""
        now = time.monotonic()
        for r in batch:
            r.timings.started = now
        outcomes: list[Any] = [None] * len(batch)
        ready, rows = [], []
        for i, r in enumerate(batch):
            row = self._decode(r)
            if isinstance(row, OspreyError):
                outcomes[i] = row
            else:
                ready.append(i)
                rows.append(row)
        if ready:
            sub = [batch[i] for i in ready]
            results = self._handle(sub, rows)
            if isinstance(results, OspreyError):
                results = [results] if len(sub) == 1 else [self._single(r) for r in sub]
            for i, outcome in zip(ready, results):
                outcomes[i] = outcome
        end = time.monotonic()
        stages = dict(self.context.stage_times) if ready and self.context.stage_times else None
        for r in batch:
            r.timings.finished = end
            r.timings.stages = stages
        return outcomes

    def _single(self, request: Ticket) -> Outcome:
        row = self._decode(request)  # afresh: the failed batch's handler may have changed its row
        if isinstance(row, OspreyError):
            return row
        out = self._handle([request], [row])
        return out if isinstance(out, OspreyError) else out[0]

    def _decode(self, r: Ticket) -> dict[str, Any] | OspreyError:
        """One request as the handler's ``data`` row (TorchServe's decoding), or why not."""
        tensors = self.accepts_tensors
        w = r.request
        try:
            fields = w.fields
            if not tensors and w.tensors is not None and not fields:  # protocol tensors for a bytes handler
                fields = fields_from_tensors(w.tensors, w.tensor_meta)
            row = {k: decode_field(f) for k, f in fields.items()}
        except OspreyError as err:
            return err
        except Exception:  # the front end let through what it should have refused: a server bug
            log.exception("model %s: could not decode the inputs of request %s", self.name, w.request_id)
            return OspreyError(ErrorKind.INTERNAL, "Internal server error: could not decode the request's inputs; "
                                                   "the server log has the details")
        if tensors and w.tensors is not None:
            row["tensors"] = w.tensors
        return row

    def _handle(self, batch: list[Ticket], data: list[dict]) -> list[Outcome] | OspreyError:
        ctx = self.context
        tensors = self.accepts_tensors
        ctx.request_ids = {i: r.request.request_id for i, r in enumerate(batch)}
        ctx.request_processor = [RequestProcessor(r.request.headers) for r in batch]
        ctx.stream_writers = {i: r.stream for i, r in enumerate(batch) if r.stream is not None}
        ctx.stage_times = {}
        try:
            results = self.service.handle(data, ctx)
        except BaseException as exc:
            err = _error_for(exc)
            if err.kind is ErrorKind.PREDICTION_FAILED:
                log.warning("model %s: handler raised %s: %s", self.name, type(exc).__name__, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))
            return err
        if not isinstance(results, list):
            log.warning("model %s: handler returned a %s, not a list", self.name, type(results).__name__)
            return OspreyError(ErrorKind.PREDICTION_FAILED, "Invalid model predict output")
        if len(results) != len(batch):
            log.warning("model %s: handler returned %d results for a batch of %d", self.name, len(results), len(batch))
            return OspreyError(ErrorKind.PREDICTION_FAILED, "number of batch response mismatched")
        out: list[Outcome] = []
        for i, value in enumerate(results):
            rp = ctx.request_processor[i]
            status = rp.get_response_status_code()
            headers = rp.get_response_headers()
            if status >= 400:
                phrase = rp.get_response_status_phrase() or (value if isinstance(value, str) else "Prediction failed")
                out.append(OspreyError(from_status(status), phrase, status=status))
                continue
            if tensors and isinstance(value, dict) and "tensors" in value and len(value) == 1:
                out.append(InferenceResponse(status=status, tensors=value["tensors"], raw=value))
                continue
            try:
                body, ctype = encode_body(value)
            except (TypeError, ValueError) as exc:
                out.append(OspreyError(ErrorKind.PREDICTION_FAILED, f"handler output is not serializable: {exc}"))
                continue
            if headers:
                headers = {str(k).lower(): str(v) for k, v in headers.items()}
                ctype = headers.pop("content-type", ctype)
            out.append(InferenceResponse(body=body, status=status, content_type=ctype, headers=headers or {},
                                         model_version=self.version, raw=value))
        return out
