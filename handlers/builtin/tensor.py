"""``tensor``: input to tensor, forward, output as a list (TorchServe BaseHandler's default),
taking Open Inference Protocol tensors directly.

A model declares its tensors in model-config.yaml (``inputs`` / ``outputs``: name,
datatype, shape with the batch dimension first). A protocol request hands its tensors
over as they are (``row["tensors"]``, numpy views of the request bytes); every request's
tensors are concatenated along the batch dimension, the model runs once with one argument
per input (in declared order), and each request gets its rows of every output back as
tensors. A plain REST request (a JSON list of numbers: one example) joins the same batch
and gets its output row as a list, as with TorchServe's BaseHandler.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..base import BaseHandler, body_of
from ..errors import InvalidInput

__all__ = ["TensorHandler"]

# Protocol inputs are read-only views of the request bytes; the model never writes to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
       "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
       "BF16": np.float32, "FP32": np.float32, "FP64": np.float64}


class TensorHandler(BaseHandler):
    accepts_tensors = True

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        meta = self.tensor_metadata()
        self.input_specs = list(meta.get("inputs") or [])
        self.output_specs = list(meta.get("outputs") or [])

    def tensor_metadata(self) -> dict:
        cfg = (self.context.model_yaml_config or {}) if self.context else {}
        return {"inputs": list(cfg.get("inputs") or []), "outputs": list(cfg.get("outputs") or [])}

    # --- the pipeline -----------------------------------------------------------------
    def _input_names(self, data: list[dict]) -> list[str]:
        if self.input_specs:
            return [s["name"] for s in self.input_specs]
        for row in data:
            if "tensors" in row:
                return list(row["tensors"])
        return ["input__0"]

    def _row_arrays(self, row: dict, names: list[str]) -> list[np.ndarray]:
        tensors = row.get("tensors")
        if tensors is not None:
            missing = [n for n in names if n not in tensors]
            if missing:
                raise InvalidInput(f"missing input(s) {', '.join(map(repr, missing))}; the model takes {', '.join(map(repr, names))}")
            extra = [n for n in tensors if n not in names]
            if extra:
                raise InvalidInput(f"unknown input(s) {', '.join(map(repr, extra))}; the model takes {', '.join(map(repr, names))}")
            arrays = [tensors[n] for n in names]
            for i, (n, a) in enumerate(zip(names, arrays)):
                if a.dtype == object:
                    raise InvalidInput(f"input '{n}': BYTES tensors cannot be fed to a tensor model")
                if a.ndim == 0:
                    raise InvalidInput(f"input '{n}': needs a batch dimension")
                if self.input_specs:
                    self._check(self.input_specs[i], a)
            if len({a.shape[0] for a in arrays}) > 1:  # each input's rows are one request's examples
                sizes = ", ".join(f"'{n}' {a.shape[0]}" for n, a in zip(names, arrays))
                raise InvalidInput(f"inputs differ in their batch dimension (the first of the shape): {sizes}; "
                                   f"every input of a request must hold the same number of examples")
            return arrays
        if len(names) != 1:
            raise InvalidInput(f"the model takes {len(names)} inputs; send them as Open Inference Protocol tensors")
        dtype = _NP.get(self.input_specs[0]["datatype"].upper(), np.float32) if self.input_specs else np.float32
        try:
            arr = np.asarray(body_of(row), dtype=dtype)[None]
        except (TypeError, ValueError, RecursionError, OverflowError) as exc:
            raise InvalidInput(f"body is not a numeric array ({exc})") from None
        if self.input_specs:
            self._check(self.input_specs[0], arr)
        return [arr]

    @staticmethod
    def _check(spec: dict, a: np.ndarray) -> None:
        """The declared datatype and shape (-1: any) of model-config.yaml."""
        want = _NP.get(str(spec.get("datatype", "FP32")).upper())
        if want is not None and a.dtype != want:
            raise InvalidInput(f"input '{spec['name']}': datatype {a.dtype} does not match the declared "
                               f"{spec.get('datatype')}")
        shape = list(spec.get("shape") or ())
        if shape and (len(shape) != a.ndim or any(d != -1 and d != s for d, s in zip(shape, a.shape))):
            raise InvalidInput(f"input '{spec['name']}': shape {list(a.shape)} does not match the declared {shape}")

    def preprocess(self, data: list[dict]) -> Any:
        import torch

        names = self._input_names(data)
        per_row = [self._row_arrays(row, names) for row in data]
        self._sizes = [arrays[0].shape[0] for arrays in per_row]
        batch = []
        for i, name in enumerate(names):
            parts = [arrays[i] for arrays in per_row]
            if len({p.shape[1:] for p in parts}) > 1 or len({p.dtype for p in parts}) > 1:
                raise InvalidInput(f"input '{name}': requests in one batch differ in shape or datatype: "
                                   f"{sorted({(p.shape[1:], str(p.dtype)) for p in parts})}")
            joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
            batch.append(self.prepare(torch.from_numpy(joined)))
        return batch

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode(), self.autocast():
            return self.model(*data, *args, **kwargs)

    def _named_outputs(self, result: Any) -> dict[str, Any]:
        names = [s["name"] for s in self.output_specs]
        if isinstance(result, dict):
            return dict(result)
        items = list(result) if isinstance(result, (tuple, list)) else [result]
        if names and len(names) != len(items):
            raise ValueError(f"the model returned {len(items)} outputs, model-config.yaml declares {len(names)}")
        return {names[i] if names else f"output__{i}": t for i, t in enumerate(items)}

    def postprocess(self, data: Any) -> list:
        outputs = {}
        for name, t in self._named_outputs(data).items():
            if hasattr(t, "detach"):
                t = t.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                if str(t.dtype) != "torch.bfloat16":
                    t = t.numpy()
            outputs[name] = t
        return self._split(outputs)

    def _split(self, outputs: dict[str, Any]) -> list:
        rows = getattr(self, "_rows", None)
        out, start = [], 0
        for i, size in enumerate(self._sizes):
            part = {n: t[start:start + size] for n, t in outputs.items()}
            start += size
            if rows is not None and not rows[i]:  # a plain REST body: its row as a list
                values = [(v.float() if hasattr(v, "float") else v)[0].tolist() for v in part.values()]
                out.append(values[0] if len(values) == 1 else dict(zip(part, values)))
            else:
                out.append({"tensors": part})
        return out

    @property
    def monitor_rows(self) -> np.ndarray | None:
        """Monitoring: the request of each row of the last batch (a tensor request may hold several);
        None when every request is one row."""
        sizes = getattr(self, "_sizes", None) or []
        if sizes.count(1) == len(sizes):  # one row each: the identity, nothing to compute
            return None
        return np.repeat(np.arange(len(sizes)), sizes)

    def handle(self, data: list[dict], context: Any) -> list:
        self._rows = [("tensors" in row) for row in data]
        return super().handle(data, context)
