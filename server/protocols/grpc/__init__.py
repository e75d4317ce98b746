"""gRPC front ends on grpc.aio: TorchServe's inference and management APIs and the Open
Inference Protocol's GRPCInferenceService, plus health checking and reflection."""
