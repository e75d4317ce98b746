"""Torch settings that belong to one model instance's thread.

TorchScript's profiling graph executor specializes and recompiles a scripted model for
each new input shape it sees, up to its fusion-strategy budget; each compilation holds the
instance for several to tens of milliseconds (about 16 ms per new batch size for a tiny
MLP on this project's 2-core benchmark machine). Under dynamic batching every batch size
from 1 to ``batchSize`` is a new shape, so a freshly loaded model pays it again and again:
the tail latency of the first minutes is made of compilations, not of the model.

``jit_optimize`` (model-config.yaml) chooses, per instance thread (the flag is thread-local
in torch, so other models are not affected): ``false`` runs TorchScript graphs unspecialized
(the default on CPU, where the executor's fusions buy little: the convolutions and matrix
products are the same kernels either way), ``true`` keeps torch's profiling executor (the
default on GPU, where fused kernels can pay for the compilations). Triton's PyTorch backend
has the same switch (``DISABLE_OPTIMIZED_EXECUTION``).
"""

from __future__ import annotations

__all__ = ["prepare_instance_thread"]


def prepare_instance_thread(jit_optimize: bool | None, on_gpu: bool) -> None:
    """Apply the settings in the calling (instance) thread."""
    try:
        import torch
    except ImportError:  # a handler without torch: nothing to set
        return
    setter = getattr(torch._C, "_set_graph_executor_optimize", None)
    if setter is not None:
        setter(on_gpu if jit_optimize is None else jit_optimize)
