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

__version__ = "0.1.0"
