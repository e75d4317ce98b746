"""The core: one internal request and response, errors as data, archives and model
configuration, the batcher, the registry of model versions and the data plane that every
protocol adapter calls. Nothing here imports a protocol, an instance implementation or a
handler."""
