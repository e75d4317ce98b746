from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackItem(_message.Message):
    __slots__ = ("request_id", "label")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: _struct_pb2.Value
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "items")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    items: _containers.RepeatedCompositeFieldContainer[FeedbackItem]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., items: _Optional[_Iterable[_Union[FeedbackItem, _Mapping]]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("accepted", "unmatched", "invalid", "errors", "unmatched_ids", "kept")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_IDS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    unmatched: int
    invalid: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    unmatched_ids: _containers.RepeatedScalarFieldContainer[str]
    kept: int
    def __init__(self, accepted: _Optional[int] = ..., unmatched: _Optional[int] = ..., invalid: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ..., unmatched_ids: _Optional[_Iterable[str]] = ..., kept: _Optional[int] = ...) -> None: ...

class ModelMonitoringRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelMonitoringResponse(_message.Message):
    __slots__ = ("json", "status")
    JSON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    json: str
    status: _struct_pb2.Struct
    def __init__(self, json: _Optional[str] = ..., status: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
