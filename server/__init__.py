"""Osprey: a model inference server.

Package map (folders name the layers; imports go only downward, see tests/unit/test_layers.py):

- ``settings``     typed settings (CLI > env > config.properties > defaults)
- ``core/``        the internal request and response (``types``), errors as data, archives,
                   model configuration, the batcher, the registry of model versions, the
                   instance protocol and the data plane every adapter calls
- ``instances/``   model instances (threads; the only importers of ``handlers/``)
- ``protocols/``   REST (``rest/``) and gRPC (``grpc/``) adapters, TorchServe management and
                   Open Inference Protocol semantics shared by both
- ``frontends/``   front-end processes sharing the inference port (``frontends``), relaying
                   each request to this process's router
- ``serve``        process wiring: listeners, signals, pid file
- ``cli``          the ``osprey`` command
"""

import os as _os

__version__ = "0.1.0"

# gRPC's fork handlers off, before anything imports grpc. uvloop starts every child process
# (pip for a model's requirements, retraining jobs, front ends) with fork() then exec(); with
# gRPC's handlers on, a fork while a gRPC call is in flight crashed about 1 child in 100 with
# SIGSEGV before its exec (grpcio 1.85). Osprey forks without exec only in multiprocessing's fork
# server (process instances), which never imports grpc, so nothing needs them. Set over any
# inherited value: the crash is in the server's own children.
_os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
