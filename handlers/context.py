"""The handler context, with TorchServe's ``ts.context.Context`` interface.

One Context belongs to one model instance; the runtime refills its per-batch parts
(request ids, request headers, response status and headers) before each ``handle`` call.
"""

from __future__ import annotations

from typing import Any

from .streaming import IntermediateSocket

__all__ = ["Context", "RequestProcessor"]


class RequestProcessor:
    """Request headers in, response status and headers out, for one request of a batch."""

    __slots__ = ("_request_header", "_status_code", "_reason_phrase", "_response_header")

    def __init__(self, request_header: dict[str, str]):
        self._request_header = request_header
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}

    def get_request_property(self, key: str) -> Any:
        value = self._request_header.get(key)
        if value is None:
            value = self._request_header.get(key.lower())
        return value

    def get_request_properties(self) -> dict[str, str]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = int(code)
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: Any) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> Any:
        return self._response_header.get(key)


class Context:
    """What a handler knows about its model and the batch it is handling."""

    def __init__(self, model_name: str, model_dir: str, manifest: dict, batch_size: int,
                 gpu: int | None, mms_version: str, limit_max_image_pixels: bool = True,
                 metrics: Any = None, model_yaml_config: dict | None = None):
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] | None = None
        self._metrics = metrics
        self.model_yaml_config = model_yaml_config if model_yaml_config is not None else {}
        self.stopping_criteria = None
        self.cl_socket = IntermediateSocket(self)  # TorchServe's send_intermediate_predict_response
        # Osprey extras: where to send intermediate (streamed) responses, per batch index.
        self.stream_writers: dict[int, Any] = {}
        self.stage_times: dict[str, float] = {}

    # --- TorchServe's API -------------------------------------------------------------
    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    @property
    def metrics(self) -> Any:
        return self._metrics

    @metrics.setter
    def metrics(self, value: Any) -> None:
        self._metrics = value

    def get_request_id(self, idx: int = 0) -> str | None:
        return self.request_ids.get(idx) if self.request_ids else None

    def get_request_header(self, idx: int, key: str) -> Any:
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        rp = self.request_processor[idx]
        return rp.get_response_status_code(), rp.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if self.request_processor is not None and idx < len(self.request_processor):
            self.request_processor[idx].report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for rp in self.request_processor or ():
            rp.report_status(code, phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self.request_processor[idx].get_response_headers()

    def set_response_header(self, idx: int, key: str, value: Any) -> None:
        self.request_processor[idx].add_response_property(key, value)

    def get_sequence_id(self, idx: int) -> str | None:
        return self.get_request_header(idx, "ts_request_sequence_id")

    # --- Osprey: intermediate responses for streaming ---------------------------------
    def send_intermediate(self, idx: int, data: Any) -> None:
        """Send one intermediate response for request ``idx`` (gRPC StreamPredictions, a chunk of a REST answer).
        The response headers set for it so far go along: a chunked REST answer starts with those
        of its first part (set_response_header, set_response_content_type), as TorchServe's does."""
        writer = self.stream_writers.get(idx)
        if writer is None:
            raise RuntimeError("this request was not made with a streaming call")
        headers = None
        if self.request_processor and idx < len(self.request_processor):
            headers = {str(k): str(v) for k, v in self.get_response_headers(idx).items()
                       if str(k).lower() != "ts_stream_next"}  # TorchServe's own marker, never sent
        if headers:
            writer(data, headers)
        else:
            writer(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and self.__dict__ == other.__dict__
