"""The Open Inference Protocol's gRPC messages and stub for tests, from one source.

Osprey's generated ``grpc_service_pb2`` and tritonclient's ``service_pb2`` both register
``grpc_service.proto`` in protobuf's one default pool: a test process that imports both gets
"duplicate file name". Tests take tritonclient's copy when it is installed (the tritonclient
tests import it anyway) and Osprey's otherwise; the wire format is the same.
"""

from __future__ import annotations

try:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError:
    from server.protocols.grpc.generated import grpc_service_pb2 as pb
    from server.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
