"""A model version's signature: the input and output tensors it declares (and the dtype of
its loaded parameters).

Taken once, when the version's first instance has loaded: model-config.yaml's
``inputs``/``outputs`` first, then what the handler declares (``tensor_metadata()`` or
``inputs``/``outputs`` lists, reported by the instance), else, for a handler that takes
bytes, one BYTES input and output (the raw body). Adapters read it from the data plane's
answer, never from an instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Signature", "signature_of", "spec_dicts", "BYTES_INPUT", "BYTES_OUTPUT"]

BYTES_INPUT = {"name": "body", "datatype": "BYTES", "shape": [-1]}
BYTES_OUTPUT = {"name": "output", "datatype": "BYTES", "shape": [-1]}


@dataclass(frozen=True)
class Signature:
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    accepts_tensors: bool = False
    precision: str | None = None  # the loaded model's parameter dtype, as its instance reported it


def spec_dicts(specs: Any) -> list[dict]:
    """Specs as plain ``{"name", "datatype", "shape"}`` dicts (picklable, JSON-ready)."""
    out = []
    for s in specs or ():
        d = s.as_dict() if hasattr(s, "as_dict") else dict(s)
        out.append({"name": str(d["name"]), "datatype": str(d.get("datatype", "FP32")).upper(),
                    "shape": [int(x) for x in d.get("shape", [-1])]})
    return out


def signature_of(config: Any, declared: tuple[Any, Any] | None, accepts_tensors: bool,
                 precision: str | None = None) -> Signature:
    inputs, outputs = spec_dicts(config.inputs), spec_dicts(config.outputs)
    if declared is not None:
        declared_in, declared_out = declared
        inputs = inputs or (spec_dicts(declared_in) if isinstance(declared_in, (list, tuple)) else [])
        outputs = outputs or (spec_dicts(declared_out) if isinstance(declared_out, (list, tuple)) else [])
    if not accepts_tensors:
        inputs = inputs or [dict(BYTES_INPUT)]
        outputs = outputs or [dict(BYTES_OUTPUT)]
    return Signature(inputs, outputs, accepts_tensors, precision)
