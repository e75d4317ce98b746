"""Protocol adapters: REST (``rest/``) and gRPC (``grpc/``) translate their wire formats
into the core's request, call the data plane, and encode its answer. Semantics shared by
both live beside them (``oip``: Open Inference Protocol, ``auth``: tokens)."""
