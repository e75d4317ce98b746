"""The per-batch work of an instance, whatever runs it (a thread here, a child process).

:class:`BatchRunner` decodes each request the way TorchServe's worker does, calls
``handle(data, context)``, encodes each answer and stamps the request's timings. A request
whose inputs cannot be decoded fails alone and the rest of its batch runs without it; a
batch whose handler fails as a whole is re-run one request at a time so that only the
request at fault fails.

It reads only these attributes of a ticket: ``request`` (its ``fields``, ``tensors``,
``tensor_meta``, ``request_id``, ``headers``, ``protocol``: how an answer or a handler's
refusal is encoded, and whether the request is a describe, which is never captured), ``stream``
and ``timings`` (started, finished, stages); a thread instance hands it the loop's requests,
a child process plain copies of them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

from handlers.base import BaseHandler
from handlers.context import Context, RequestProcessor
from handlers.instance_thread import prepare_instance_thread
from handlers.loading import add_package_folder
from handlers.metrics import HandlerMetrics

from server import __version__

from server.core.codecs import decode_field, encode_body, fields_from_tensors
from server.core.errors import ErrorKind, OspreyError, from_status
from server.core.types import InferenceResponse, Protocol
from server.core.model_config import ModelConfig
from server.instances.service import Service, make_service

IDLE_S = 0.02  # = server.instances.capture.IDLE_S (not imported here: capture loads only when monitoring is on)

__all__ = ["BatchRunner", "Outcome", "error_for", "load_runner", "declared_specs"]

log = logging.getLogger("osprey.instances")
# a handler's failures, under TorchServe's backend logger name: in a model instance's thread (or
# child process) its lines go to model_log.log as TorchServe's do (server/log_files.py)
_service_log = logging.getLogger("ts.service")
_TORCHSERVE_APIS = (Protocol.REST, Protocol.GRPC, Protocol.DESCRIBE)
_DESCRIBE = Protocol.DESCRIBE
DECODE_INPUT_ENV = "TS_DECODE_INPUT_REQUEST"  # TorchServe's worker environment variable

Outcome = InferenceResponse | OspreyError


def error_for(exc: BaseException) -> OspreyError:
    if isinstance(exc, OspreyError):
        return exc
    code = getattr(exc, "error_code", None)
    if isinstance(code, int) and not isinstance(code, bool):  # PredictionException(message, code)
        # TorchServe answers a handler's PredictionException as an InternalServerException with
        # its code; the built-in handlers' InvalidInput is a BadRequestException
        kind_name = None if getattr(exc, "client_error", False) else "InternalServerException"
        return OspreyError(from_status(code), str(getattr(exc, "message", exc)), status=code, type_name=kind_name)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
            (isinstance(exc, RuntimeError) and str(exc).startswith("CUDA out of memory")):  # torch < 1.13
        return OspreyError(ErrorKind.OUT_OF_MEMORY, "Out of resources")
    return OspreyError(ErrorKind.PREDICTION_FAILED, "Prediction failed")


class BatchRunner:
    """A loaded handler and its context: runs batches of requests."""

    def __init__(self, name: str, version: str, service: Service, context: Context, capture: Any = None):
        self.name, self.version, self.service, self.context = name, version, service, context
        self.capture = capture  # a server.instances.capture.BatchCapture when the model is monitored
        # Osprey's own handlers get JSON that does not parse marked with why (a 400 from them);
        # any other handler gets the bytearray TorchServe hands it
        self.marks_json = isinstance(service.target, BaseHandler)
        # TorchServe's decode_input_request=false: every field reaches the handler as the
        # bytearray that came (no JSON or text decoding), for handlers that decode it themselves
        self.decode_input = os.environ.get(DECODE_INPUT_ENV, "true").strip().lower() != "false"

    def flush(self, force: bool = True) -> None:
        """Hand the monitor the observation of the batches run since the last flush (call it
        after their answers were handed back: the features never delay them); ``force=False``
        builds only when enough is pending (see :mod:`server.instances.capture`). Never raises."""
        if self.capture is not None:
            try:
                self.capture.flush(force)
            except Exception:  # capture never fails serving
                log.exception("model %s: monitoring capture failed", self.name)

    def flush_wait(self) -> float | None:
        """How long an instance's loop may wait for work before it flushes what is pending:
        None when nothing is (wait as long as you like), else at most
        :data:`~server.instances.capture.IDLE_S` (an idle instance flushes) and never past the
        moment it is due by age."""
        capture = self.capture
        if capture is None:
            return None
        wait = capture.wait()
        return None if wait is None else min(wait, IDLE_S)

    @property
    def accepts_tensors(self) -> bool:
        return bool(self.service.accepts_tensors)

    def run_handoff(self, batches: list[list]) -> list[list[Outcome]]:
        """Several batches of one handoff, one after another; never raises."""
        outcomes = []
        capture = self.capture
        opened = capture is not None and capture.open()  # monitoring: armed once for all of them
        try:
            for batch in batches:  # several small batches per handoff: see Batcher._bundle_limit
                try:
                    outcomes.append(self.run(batch))
                except BaseException as exc:  # never lose a batch
                    log.exception("model %s: unexpected failure", self.name)
                    outcomes.append([error_for(exc)] * len(batch))
        finally:
            if opened:
                try:
                    capture.close()
                except Exception:  # capture never fails serving
                    log.exception("model %s: monitoring capture failed", self.name)
        return outcomes

    def run(self, batch: list) -> list[Outcome]:
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

    def _single(self, request) -> Outcome:
        row = self._decode(request)  # afresh: the failed batch's handler may have changed its row
        if isinstance(row, OspreyError):
            return row
        out = self._handle([request], [row])
        return out if isinstance(out, OspreyError) else out[0]

    def _decode(self, r) -> dict[str, Any] | OspreyError:
        """One request as the handler's ``data`` row (TorchServe's decoding), or why not."""
        tensors = self.accepts_tensors
        try:
            w = r.request
            fields = w.fields
            if not tensors and w.tensors is not None and not fields:  # protocol tensors for a bytes handler
                fields = fields_from_tensors(w.tensors, w.tensor_meta)
            mark = self.marks_json
            if self.decode_input:
                row = {k: decode_field(f, mark) for k, f in fields.items()}
            else:
                row = {k: bytearray(f.value) for k, f in fields.items()}
        except OspreyError as err:
            return err
        except Exception:  # the front end let through what it should have refused: a server bug
            log.exception("model %s: could not decode the inputs of request %s", self.name, r.request.request_id)
            return OspreyError(ErrorKind.INTERNAL, "Internal server error: could not decode the request's inputs; "
                                                   "the server log has the details")
        if tensors and r.request.tensors is not None:
            row["tensors"] = r.request.tensors
        return row

    def _handle(self, batch: list, data: list[dict]) -> list[Outcome] | OspreyError:
        ctx = self.context
        tensors = self.accepts_tensors
        ctx.request_ids = {i: r.request.request_id for i, r in enumerate(batch)}
        if isinstance(ctx.metrics, HandlerMetrics):
            ctx.metrics.request_ids = ctx.request_ids
        ctx.request_processor = [RequestProcessor(r.request.headers) for r in batch]
        ctx.stream_writers = {i: r.stream for i, r in enumerate(batch) if r.stream is not None}
        ctx.stage_times = {}
        capture = self.capture
        describe = batch[0].request.protocol is _DESCRIBE  # (not a prediction: never captured)
        armed = capture is not None and not describe and capture.begin(len(batch))
        try:
            if describe and self.marks_json:  # Osprey's handlers (TorchServe's see the describe header)
                results = [self.service.target.describe_handle()]
            else:
                results = self.service.handle(data, ctx)
        except BaseException as exc:
            if armed:
                capture.end(None, [])
            err = error_for(exc)
            if err.kind is ErrorKind.PREDICTION_FAILED:
                # as TorchServe's backend logs it (logger ts.service): the traceback in model_log.log
                _service_log.error("Invoking custom service failed. (model %s: %s: %s)", self.name,
                                   type(exc).__name__, exc, exc_info=True)
            return err
        if armed and (not isinstance(results, list) or len(results) != len(batch)):
            capture.end(None, [])
        if not isinstance(results, list):
            log.warning("model %s: handler returned a %s, not a list", self.name, type(results).__name__)
            return OspreyError(ErrorKind.PREDICTION_FAILED, "Invalid model predict output")
        if len(results) != len(batch):
            log.warning("model %s: handler returned %d results for a batch of %d", self.name, len(results), len(batch))
            return OspreyError(ErrorKind.PREDICTION_FAILED, "number of batch response mismatched")
        if armed:
            capture.end(results, [r.request.request_id for r in batch])
        out: list[Outcome] = []
        for i, value in enumerate(results):
            rp = ctx.request_processor[i]
            status = rp.get_response_status_code()
            headers = rp.get_response_headers()
            failed = status >= 400
            # a status of 400 or more the handler set: on TorchServe's APIs its own result is the
            # body (its validation details, say); a text is the error's message (the built-in
            # handlers' way); the Open Inference Protocol's error shape is fixed
            if failed and (batch[i].request.protocol not in _TORCHSERVE_APIS or value is None or isinstance(value, str)):
                out.append(_chosen_error(rp, status, value))
                continue
            if not failed and tensors and isinstance(value, dict) and "tensors" in value and len(value) == 1:
                out.append(InferenceResponse(status=status, tensors=value["tensors"]))
                continue
            try:
                if batch[i].request.protocol in _TORCHSERVE_APIS and _is_torch_tensor(value):
                    body, ctype = _torch_saved(value), "application/octet-stream"  # as TorchServe's worker
                else:
                    body, ctype = encode_body(value)
            except Exception as exc:  # (torch.save can raise anything: that request fails, not its batch)
                if failed:
                    out.append(_chosen_error(rp, status, value))
                    continue
                _service_log.error("model %s: the handler's output for request %s is not serializable: %s",
                                   self.name, batch[i].request.request_id, exc)
                out.append(OspreyError(ErrorKind.PREDICTION_FAILED, f"handler output is not serializable: {exc}"))
                continue
            if headers:
                headers = {str(k).lower(): str(v) for k, v in headers.items()}
                ctype = headers.pop("content-type", ctype)
            out.append(InferenceResponse(body=body, status=status, content_type=ctype, headers=headers or {},
                                         model_version=self.version))
        return out


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a handler that made a tensor has imported torch
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_saved(value: Any) -> bytes:
    """A torch.Tensor result on TorchServe's APIs: the bytes of ``torch.save`` (TorchServe's
    worker sends a tensor so, and clients read it back with ``torch.load``); a tensor on a
    device is saved from the CPU, so that the client needs no such device to load it."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value.detach().cpu(), buf)
    return buf.getvalue()


def _chosen_error(rp: Any, status: int, value: Any) -> OspreyError:
    """The error a handler chose with set_response_status: its phrase, else its text result."""
    phrase = rp.get_response_status_phrase() or (value if isinstance(value, str) else "Prediction failed")
    return OspreyError(from_status(status), phrase, status=status)


def load_runner(name: str, version: str, model_dir: str, handler: str, manifest: dict, config: ModelConfig,
                gpu_id: int | None, metrics_sink: Callable | None, observe: Callable | None = None,
                envelope: str = "", packages: str | None = None, packages_first: bool = False) -> BatchRunner:
    """Resolve and initialize the handler in the calling thread (the one that will run it), in
    the request ``envelope`` the server's ``service_envelope`` names (handlers/envelopes.py).
    With ``observe`` (the monitor's, or a child's collector) and ``config.monitoring.enabled``,
    sampled batches are captured (:mod:`server.instances.capture`)."""
    prepare_instance_thread(config.jit_optimize, gpu_id is not None)
    if packages:  # the model's requirements.txt, installed (install_py_dep_per_model)
        add_package_folder(packages, packages_first)
    context = Context(name, model_dir, manifest, config.batch_size, gpu_id, __version__, True,
                      HandlerMetrics(name, metrics_sink), dict(config.raw))
    service = make_service(model_dir, handler, envelope)
    if service.initialize is not None:
        service.initialize(context)
    warmup = getattr(service.target, "warmup", None)
    if callable(warmup):
        warmup(context)
    capture = None
    if observe is not None:
        from server.instances.capture import make_capture

        capture = make_capture(name, version, service.target, config, observe)
    return BatchRunner(name, version, service, context, capture)


def declared_specs(target: Any) -> tuple[list | None, list | None]:
    """(inputs, outputs) a handler object declares (``tensor_metadata()`` or ``inputs``/``outputs``)."""
    if target is None:
        return None, None
    declared = target.tensor_metadata() if callable(getattr(target, "tensor_metadata", None)) else {}
    inputs = declared.get("inputs") or getattr(target, "inputs", None)
    outputs = declared.get("outputs") or getattr(target, "outputs", None)
    return (list(inputs) if isinstance(inputs, (list, tuple)) else None,
            list(outputs) if isinstance(outputs, (list, tuple)) else None)


_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "int8",
           "qint8": "int8", "quint8": "int8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


def model_precision(target: Any) -> str | None:
    """The dtype of the first parameter of a handler's ``model`` (fp32, fp16, bf16, int8, ...),
    or None where the handler has no torch model to look at."""
    params = getattr(getattr(target, "model", None), "parameters", None)
    if callable(params):
        try:
            for p in params():
                name = str(p.dtype).rsplit(".", 1)[-1]
                return _DTYPES.get(name, name)
        except Exception:  # a model whose parameters() is something else: say nothing
            return None
    return None
