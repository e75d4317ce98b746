"""Osprey: a model inference server.

Package map (each module has one job):

- ``settings``   typed settings (CLI > env > config.properties > defaults)
- ``errors``     error kinds as data, mapped once to HTTP and gRPC status
- ``types``      the internal request / response every front end speaks
- ``archive``    .mar / .tar.gz / folder archives: read, write, safe extraction
- ``runtime``    model instances: handler loading, device, execution threads
- ``batching``   per-model work-conserving dynamic batcher
- ``registry``   models by name and version, default version, load / unload / scale
- ``dataplane``  the single core the REST and gRPC adapters call
- ``rest``       ASGI adapters (TorchServe inference / management, metrics)
- ``serve``      process wiring: listeners, signals, pid file
- ``cli``        the ``osprey`` command
"""

__version__ = "0.1.0"
