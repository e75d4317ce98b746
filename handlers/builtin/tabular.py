"""``tabular``: feature records -> class probabilities or regression values.

The archive carries ``features.json``::

    {"features": ["age", "bmi", ...],          # the model's input order
     "mean": [...], "scale": [...],            # x_model = (x - mean) / scale (optional)
     "task": "classification" | "regression",
     "target": {"name": "progression", "mean": 152.1, "scale": 77.1}}   # regression output units

so clients send features by name in their natural units and the scaling lives with the
model. Labels of a classifier come from ``index_to_name.json``.

A body is one record ``{"age": 59, "bmi": 32.1, ...}``, one array in feature order, or a list
of either (answered with a list). A missing, unknown or non-numeric feature -- or one that is
not a finite float32 once standardized -- is a 400 naming it. A model with a batch limit
(``handler.max_examples`` in model-config.yaml, or a ``torch.export`` program's bound on its
batch dimension) takes at most that many records per request; a batch of requests holding
more runs in chunks. Answers: ``{label: probability}`` (every class, most probable first) or
``{target: value}``.
Open Inference Protocol: input ``input`` (FP32, N x features, natural units), output
``probabilities`` (N x classes) or ``prediction`` (N x 1).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import numpy as np

from ..errors import InvalidInput
from .common import BuiltinHandler, numeric_tensor, parse_json, read_json, read_labels, tensor, topk_labels

__all__ = ["TabularHandler"]


class TabularHandler(BuiltinHandler):
    example_noun = "records"

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        model_dir = context.system_properties["model_dir"]
        spec = read_json(model_dir, str(self.config.get("features_file", "features.json")))
        if not spec or not spec.get("features"):
            raise ValueError("the archive has no features.json naming the model's input features")
        self.features = [str(f) for f in spec["features"]]
        if len(set(self.features)) != len(self.features):
            raise ValueError("features.json: feature names must be distinct")
        self.index = {f: i for i, f in enumerate(self.features)}
        self._feature_set = frozenset(self.features)
        getter = operator.itemgetter(*self.features)
        self._in_order = getter if len(self.features) > 1 else (lambda rec: (getter(rec),))
        n = len(self.features)
        self.mean = np.asarray(spec.get("mean", [0.0] * n), dtype=np.float32)
        self.scale = np.asarray(spec.get("scale", [1.0] * n), dtype=np.float32)
        if self.mean.shape != (n,) or self.scale.shape != (n,) or np.any(self.scale == 0):
            raise ValueError(f"features.json: mean and scale need {n} values (scale nonzero)")
        self.task = str(spec.get("task", "classification"))
        if self.task not in ("classification", "regression"):
            raise ValueError("features.json: task must be classification or regression")
        target = spec.get("target") or {}
        self.target_name = str(target.get("name", "prediction"))
        self.target_mean = float(target.get("mean", 0.0))
        self.target_scale = float(target.get("scale", 1.0))
        self.labels = read_labels(model_dir)
        self.topk = int(self.config.get("topk", len(self.labels) if self.labels else 1000))

    def tensor_metadata(self) -> dict:
        n = len(self.features)
        if self.task == "regression":
            out = tensor("prediction", "FP32", [-1, 1])
        else:
            out = tensor("probabilities", "FP32", [-1, len(self.labels) if self.labels else -1])
        return {"inputs": [tensor("input", "FP32", [-1, n])], "outputs": [out]}

    # --- input ----------------------------------------------------------------------
    def _number(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InvalidInput(f"feature {name!r} must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise InvalidInput(f"feature {name!r} must be a number, got {value!r}") from None
        except OverflowError:  # an integer of hundreds of digits
            raise InvalidInput(f"feature {name!r} must be a finite number within float32's range "
                               "(about +-3.4e38)") from None

    def _check_range(self, rows: np.ndarray) -> None:
        """Every value of the N x features ``rows`` a finite float32, also once standardized
        (1e308 is a finite float but no float32): a 400 naming the first feature that is not.
        One vectorised pass per request; the offending column is looked for only on failure."""
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = (rows - self.mean) / self.scale
        if np.isfinite(scaled).all():
            return
        raw = ~np.isfinite(rows)
        if raw.any():
            row, col = (int(x) for x in np.argwhere(raw)[0])
            raise InvalidInput(f"{_record(row, len(rows))}feature {self.features[col]!r} must be a finite number "
                               "within float32's range (about +-3.4e38)")
        row, col = (int(x) for x in np.argwhere(~np.isfinite(scaled))[0])
        raise InvalidInput(f"{_record(row, len(rows))}feature {self.features[col]!r} is out of range: standardized, "
                           "it is not a finite float32")

    def _values(self, rec: Any) -> Any:
        """One record's values in feature order, as sent (numbers are checked per request)."""
        if isinstance(rec, dict):
            if rec.keys() != self._feature_set:
                unknown = [k for k in rec if k not in self.index]
                if unknown:
                    raise InvalidInput(f"unknown feature {unknown[0]!r}; the model takes {', '.join(self.features)}")
                missing = [f for f in self.features if f not in rec]
                raise InvalidInput(f"missing feature {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return self._in_order(rec)
        if isinstance(rec, list):
            if len(rec) != len(self.features):
                raise InvalidInput(f"an array record needs {len(self.features)} values in the order "
                                   f"{', '.join(self.features)}; got {len(rec)}")
            return rec
        raise InvalidInput("a record is a JSON object of features by name or an array in feature order")

    def _matrix(self, recs: list) -> np.ndarray:
        """The records as one N x features float32 array, checked once per request: a value
        that is no number, or no finite float32 (also standardized), is a 400 naming its feature."""
        values = []
        for i, r in enumerate(recs):
            try:
                values.append(self._values(r))
            except InvalidInput as exc:
                raise InvalidInput(f"{_record(i, len(recs))}{exc.message}") from None
        n = len(self.features)
        rows = None
        if set(map(type, itertools.chain.from_iterable(values))) <= {int, float}:  # plain JSON numbers
            try:
                rows = np.fromiter(itertools.chain.from_iterable(values), np.float64, count=len(values) * n)
            except OverflowError:  # an integer too large for any float: named below
                pass
        if rows is None:  # strings, booleans, nulls, huge integers: value by value, naming the first bad one
            checked = []
            for i, row in enumerate(values):
                try:
                    checked.append([self._number(f, v) for f, v in zip(self.features, row)])
                except InvalidInput as exc:
                    raise InvalidInput(f"{_record(i, len(values))}{exc.message}") from None
            rows = np.asarray(checked, dtype=np.float64)
        with np.errstate(over="ignore"):
            rows = rows.reshape(len(values), n).astype(np.float32)
        self._check_range(rows)
        return rows

    def examples_from_body(self, body: Any) -> list:
        if isinstance(body, (bytes, bytearray, str)):
            body = parse_json(body, expect="a record of features by name, an array, or a list of them")
        if isinstance(body, dict) and set(body) <= {"instances", "inputs", "data"} and body:
            body = next(iter(body.values()))
        if isinstance(body, list) and body and all(isinstance(r, (dict, list)) for r in body):
            return [(row, True) for row in self._matrix(body)]
        return [(self._matrix([body])[0], False)]

    def examples_from_tensors(self, tensors: dict) -> list:
        name, arr = self.input_tensor(tensors, ("input",))
        with np.errstate(over="ignore", invalid="ignore"):
            arr = numeric_tensor(name, arr).astype(np.float32, copy=False)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != len(self.features):
            raise InvalidInput(f"input must be N x {len(self.features)} ({', '.join(self.features)}), got {list(arr.shape)}")
        self._check_range(arr)
        return [(row, True) for row in arr]

    # --- model ----------------------------------------------------------------------
    def collate(self, examples: list) -> Any:
        import torch

        x = (np.stack([e for e, _ in examples]) - self.mean) / self.scale
        return self.prepare(torch.from_numpy(x.astype(np.float32)))

    def forward(self, batch: Any) -> dict:
        import torch

        out = self.inference(batch).float()
        if self.task == "regression":
            y = out.reshape(len(out), -1)[:, :1] * self.target_scale + self.target_mean
            return {"prediction": y.cpu().numpy()}
        if out.shape[-1] == 1:  # one logit: binary classification
            p = torch.sigmoid(out)
            out = torch.log(torch.cat([1 - p, p], dim=-1).clamp_min(1e-12))
        return {"probabilities": torch.softmax(out, dim=-1).cpu().numpy()}

    # --- monitoring (handlers/monitoring.py) ------------------------------------------------
    @property
    def monitor_task(self) -> str:
        return self.task

    def monitor_features(self, inputs: Any, outputs: Any) -> dict:
        """Each named input feature in natural units (the model's standardized input, unscaled)."""
        x = inputs.detach().float().cpu().numpy() * self.scale + self.mean
        return {name: x[:, j] for j, name in enumerate(self.features)}

    def monitor_outputs(self, outputs: Any) -> Any:
        """Class probabilities, or the predicted value in the target's units (as answered)."""
        out = outputs.detach().float().cpu().numpy()
        out = out.reshape(len(out), -1)
        if self.task == "regression":
            return out[:, 0] * self.target_scale + self.target_mean
        from ..monitoring import probabilities

        return probabilities(out)

    def answer(self, outputs: dict, examples: list, idx: int) -> Any:
        if self.task == "regression":
            answers = [{self.target_name: float(v[0])} for v in outputs["prediction"]]
        else:
            answers = [topk_labels(p, self.labels, self.topk) for p in outputs["probabilities"]]
        return answers if examples[0][1] else answers[0]


def _record(i: int, n: int) -> str:
    """How an error names the record it is about, in a request holding several."""
    return f"record {i}: " if n > 1 else ""
