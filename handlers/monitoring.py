"""What a model saw and answered, for the batches the monitor samples (handler side).

:class:`Tap` is installed on a loaded handler object once (by ``server.instances.capture``).
While a monitored instance runs a handoff of batches it is *armed*: the handler object's
``inference`` (wrapped as an instance attribute, so TorchServe-style ``self.inference(x)``
calls go through it) keeps references to what it was called with and what it returned -- no
copies -- and a forward hook keeps the penultimate activations (the capture notes which
batch each belongs to). Later, :meth:`Tap.collect` turns them into per-row arrays,
vectorized on many batches at once. Unarmed, the tap costs one extra Python call per
``inference`` call and nothing else (the forward hook exists only while armed).

**What a handler may define** (any kind of handler: Osprey's ``BaseHandler``, the built-ins,
TorchServe subclasses, plain classes; all optional):

- ``monitor_features(self, inputs, outputs) -> dict[str, array]``: named input features,
  one value per row the model saw. ``inputs`` is what ``inference`` was called with (its
  only positional argument, or the tuple of them), ``outputs`` what it returned; called
  once per ``inference`` call of the batch (a batch run in chunks: once per chunk, the
  results joined). Values are numbers ((n,) arrays, any float or int dtype, torch or numpy)
  or strings ((n,) of str: a categorical feature). Reserved names: ``embedding`` (an (n, d)
  array: replaces the penultimate activations), and prediction features
  (``reconstruction_error``, ``prediction``, ``prediction[...]``, ``predicted_class``,
  ``confidence``, ``entropy``): they go to the observation's predictions.
- ``monitor_task``: ``"classification" | "regression" | "autoencoder" | "embedding" |
  "generator"`` or None (an attribute or a method of no argument). Defined (even as None),
  it is taken as it is; undefined, the task is inferred (below). ``generator``: a
  conditional generator whose outputs (from ``monitor_outputs``) are the asked classes as
  one-hot rows (n, C): a feedback label is the class a viewer recognised in the sample.
- ``monitor_logits = True``: the outputs of a classifier are logits (softmax them without
  checking whether they already are probabilities).
- ``monitor_outputs(self, outputs) -> array``: the raw outputs as class probabilities (n, C)
  or values ((n,) / (n, k)); without it the rules below apply. Defined with two parameters,
  ``monitor_outputs(self, outputs, inputs)``, it also gets what ``inference`` was called
  with (the generator reads the asked classes there).
- ``monitor_layer``: the module whose output is the penultimate activation (as
  ``monitoring.layer``, which wins), or False for no forward hook (a handler giving its own
  ``embedding``).
- ``monitor_rows``: for a handler whose model rows are not its requests one for one (a
  request holding several examples): the index in ``data`` of the request each row came
  from (the built-ins set it).

**The built-in handlers' features** (input features; predictions; embedding):

=================  ==========================================================================
``tabular``        every feature of features.json by name, natural units (the model's
                   standardized input unscaled); classification: ``predicted_class``,
                   ``confidence``, ``entropy`` (labels of index_to_name.json), regression:
                   ``prediction`` in the target's units; the last Linear layer's input
``image_classifier``  ``mean``, ``contrast`` (standard deviation) of the preprocessed tensor,
                   ``channel_mean[c]`` for c < C when it has several channels;
                   ``predicted_class``, ``confidence``, ``entropy``; the penultimate activations
``text_classifier``   ``length`` (tokens), ``unknown_rate`` (share of unknown tokens, when the
                   tokenizer has one); ``predicted_class``, ``confidence``, ``entropy``; the
                   classifier head's input (pooled / final hidden state)
``text_embedding``  ``length``, ``unknown_rate``; no predictions (task ``embedding``); the
                   sentence embedding as answered
``anomaly``        ``mean``, ``contrast`` of the model input; ``reconstruction_error`` (also the
                   observation's ``outputs``); the last Linear layer's input
``generator``      ``latent_norm`` (RMS of the latent vector), ``class`` (categorical, for a
                   conditional model); no prediction features; outputs: the asked class
                   one-hot (task ``generator``; unconditional: task None); no embedding
``tensor``         none; predictions by the rules below (regression values of a narrow
                   output, probabilities...); the last Linear layer's input
=================  ==========================================================================

**Prediction features without any hook** (the rules, in order):

1. ``inference`` was called: its output (a tensor; the first of a tuple; a dict's
   ``logits``, else its first value), as float32 rows:
   - task classification (given or inferred): one column -> sigmoid, giving [1 - p, p];
     rows already probabilities (>= 0, summing to 1 within 1e-3) are taken as they are;
     anything else is logits -> softmax. Inferred classification: 2-D output whose columns
     match the handler's label mapping (``labels`` or TorchServe's ``mapping``), or rows that
     are already probabilities.
   - task regression (given or inferred): 1-D, or 2-D with at most :data:`MAX_VALUES`
     columns: ``prediction`` (one value) or ``prediction[i]``.
   - anything else (images, sequences, wide outputs) says nothing usable: no predictions.
2. ``inference`` was never called (a module-level ``handle``, a handler that calls its model
   itself): the handler's returned results, one per request:
   - every result a dict of two or more labels -> numbers within [0, 1] (``{label:
     probability}``, top-k or all): classification over the labels seen (the mapping's
     order when there is one, else numeric-aware sorted), a missing label counts 0;
   - every result a number, or a list of at most MAX_VALUES numbers of one length, or a
     dict of the same numeric keys: regression (``prediction``, ``prediction[i]``,
     ``prediction[key]``);
   - anything else (bytes, text, images): no predictions.

Classification gives ``predicted_class`` (categorical: the class label), ``confidence``
(top probability) and ``entropy`` (nats); regression gives the values; an autoencoder its
``reconstruction_error`` (from its hook). ``embedding``: the handler's own, else the
penultimate activations: the output of the module named by ``monitoring.layer``, else the
input of the last ``torch.nn.Linear`` of the handler's ``model``; for a TorchScript model
(no hooks there) the input of the last ``aten::linear`` of its inlined forward graph, taken
by running, in sampled batches only, a copy of that graph with this value as an extra
output. A ``torch.export`` program or an ONNX model gives none. As (n, d) float32 (a 3-D
activation (n, L, d) is averaged over L).
"""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Tap", "Captured", "MAX_VALUES", "PREDICTION_NAMES", "prediction_features", "from_results",
           "as_array", "main_output", "class_labels"]

MAX_VALUES = 16  # the most output columns read as regression values
PREDICTION_NAMES = frozenset({"reconstruction_error", "prediction", "predicted_class", "confidence", "entropy"})
_UNSET = object()


def _is_prediction(name: str) -> bool:
    return name in PREDICTION_NAMES or name.startswith("prediction[")


def as_array(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """A tensor (any device, bf16 included) or array-like as a numpy array of ``dtype``
    (no copy where it already is one); strings stay strings."""
    if hasattr(x, "detach"):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if dtype is not None and x.is_floating_point() and str(x.dtype) != "torch.float32":
            x = x.float()
        x = x.numpy()
    a = np.asarray(x)
    if dtype is not None and a.dtype.kind in "biuf" and a.dtype != dtype:
        a = a.astype(dtype)
    return a


def main_output(out: Any) -> Any:
    """The main tensor of what ``inference`` returned (a tuple's first, a dict's ``logits``)."""
    if isinstance(out, dict):
        if not out:
            return None
        return out.get("logits", next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out and hasattr(out[0], "shape"):
        return out[0]
    return out


def class_labels(target: Any, n: int | None = None) -> tuple[str, ...] | None:
    """Class labels in output-index order from a handler's ``labels`` ({index: label}, the
    built-ins) or ``mapping`` (TorchServe's index_to_name.json: {"0": label | [id, label]})."""
    for attr in ("labels", "mapping"):
        raw = getattr(target, attr, None)
        if isinstance(raw, (list, tuple)) and raw:
            raw = dict(enumerate(raw))
        if not isinstance(raw, dict) or not raw:
            continue
        try:
            by_index = {int(k): (str(v[-1]) if isinstance(v, (list, tuple)) else str(v)) for k, v in raw.items()}
        except (TypeError, ValueError):
            continue
        size = len(by_index) if n is None else n
        if set(by_index) == set(range(size)):
            return tuple(by_index[i] for i in range(size))
    return None


def _probability_rows(p: np.ndarray) -> bool:
    return p.ndim == 2 and p.shape[1] >= 2 and bool(np.all(p >= 0)) and \
        bool(np.all(np.abs(p.sum(axis=1) - 1.0) <= 1e-3))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def probabilities(raw: np.ndarray, logits: bool = False) -> np.ndarray:
    """(n, C) class probabilities from a classifier's outputs (see the module's rules);
    ``logits``: they are known to be logits (softmax without looking)."""
    raw = raw.reshape(len(raw), -1).astype(np.float32, copy=False)
    if raw.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-raw[:, 0]))
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    if not logits and _probability_rows(raw):
        return raw
    return _softmax(raw).astype(np.float32, copy=False)


_LABELS: dict[tuple, np.ndarray] = {}


def _label_array(classes: tuple[str, ...] | None, width: int) -> np.ndarray:
    key = (classes, width)
    labels = _LABELS.get(key)
    if labels is None:
        labels = np.asarray(classes if classes is not None and len(classes) == width
                            else [str(i) for i in range(width)], dtype=object)
        if len(_LABELS) < 256:
            _LABELS[key] = labels
    return labels


def prediction_features(task: str | None, outputs: np.ndarray | None,
                        classes: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    """Prediction features of one batch from its outputs (probabilities for classifiers,
    values for regression); vectorized."""
    if outputs is None or task is None:
        return {}
    if task == "classification":
        p = outputs
        top = p.argmax(axis=1)
        entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(axis=1)  # 0 log 0 = 0
        return {"predicted_class": _label_array(classes, p.shape[1])[top],
                "confidence": p[np.arange(len(p)), top], "entropy": entropy}
    if task == "regression":
        v = outputs.reshape(len(outputs), -1)
        if v.shape[1] == 1:
            return {"prediction": v[:, 0]}
        return {f"prediction[{i}]": v[:, i] for i in range(v.shape[1])}
    return {}


def _numeric_sort(labels: list[str]) -> list[str]:
    if all(s.lstrip("-").isdigit() for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def from_results(results: list, target: Any) -> tuple[str | None, np.ndarray | None, tuple | None, list | None]:
    """(task, outputs, classes, value names) read from a handler's returned results (rule 2)."""
    if not results:
        return None, None, None, None
    first = results[0]
    if isinstance(first, dict):
        if not all(isinstance(r, dict) and r and all(_number(v) for v in r.values()) for r in results):
            return None, None, None, None
        if all(len(r) >= 2 and all(0.0 <= v <= 1.0 for v in r.values()) for r in results):
            seen: dict[str, None] = {}
            for r in results:
                seen.update(dict.fromkeys(map(str, r)))
            mapped = class_labels(target)
            order = list(mapped) if mapped is not None and set(seen) <= set(mapped) else _numeric_sort(list(seen))
            col = {k: i for i, k in enumerate(order)}
            out = np.zeros((len(results), len(order)), dtype=np.float32)
            for i, r in enumerate(results):  # the handler already made one dict per row
                for k, v in r.items():
                    out[i, col[str(k)]] = v
            return "classification", out, tuple(order), None
        keys = list(first)
        if len(keys) <= MAX_VALUES and all(list(r) == keys for r in results):
            out = np.asarray([list(r.values()) for r in results], dtype=np.float32)
            return "regression", out, None, [str(k) for k in keys]
        return None, None, None, None
    # numbers, or lists of numbers: one conversion (numpy checks every row's length and type)
    if _number(first) or (isinstance(first, (list, tuple)) and 0 < len(first) <= MAX_VALUES and _number(first[0])):
        try:
            values = np.asarray(results, dtype=np.float32)
        except (TypeError, ValueError):  # mixed rows: something else than values
            return None, None, None, None
        if values.ndim == 1 or (values.ndim == 2 and values.shape[1] <= MAX_VALUES):
            return "regression", values, None, None
    return None, None, None, None


@dataclass
class Captured:
    """One batch's capture, every array with one row per row the model saw."""

    rows: int
    row_requests: np.ndarray | None  # request index (into the batch's data) of each row; None: one row each
    features: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    task: str | None = None
    outputs: np.ndarray | None = None
    classes: tuple[str, ...] | None = None


def _find_model(target: Any) -> Any:
    """The eager torch module a handler runs (``model``; a wrapper's ``model``/``_orig_mod``)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    model = getattr(target, "model", None)
    for _ in range(3):
        if model is None:
            return None
        if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
            return model
        model = getattr(model, "_orig_mod", None) or getattr(model, "model", None)
    return None


def _find_script(target: Any) -> Any:
    """The TorchScript module a handler runs (its ``model``), or None."""
    torch = sys.modules.get("torch")
    model = getattr(target, "model", None)
    if torch is None or not isinstance(model, torch.jit.ScriptModule):
        return None
    return model


def _script_penultimate(model: Any) -> Any:
    """A function(module, *inputs) -> (the model's output, the input of its last
    ``aten::linear``): the model's own forward graph (inlined) with that value added to its
    outputs; None where the graph has no linear layer at its top level (or cannot be read)."""
    import torch

    optimized = torch._C._get_graph_executor_optimize()
    try:
        torch._C._set_graph_executor_optimize(True)  # the inliner does nothing while it is off (CPU instances)
        graph = model.forward.graph.copy()
        torch._C._jit_pass_inline(graph)
        linear = [n for n in graph.nodes() if n.kind() == "aten::linear"]  # top level only, in run order
        outs = list(graph.outputs())
        if not linear or len(outs) != 1:
            return None
        hidden, out = linear[-1].inputsAt(0), outs[0]
        graph.eraseOutput(0)
        node = graph.create("prim::TupleConstruct", [out, hidden], 1)
        node.insertBefore(graph.return_node())
        node.output().setType(torch._C.TupleType([out.type(), hidden.type()]))
        graph.registerOutput(node.output())
        return torch._C._create_function_from_graph(f"osprey_monitor_tap_{id(model)}", graph)
    except Exception:  # a graph this cannot rewrite: no embedding, nothing else changes
        return None
    finally:
        torch._C._set_graph_executor_optimize(optimized)


def _positional(fn: Any) -> int:
    """How many named positional parameters ``fn`` has (a bound method: without self); 1 if unknown."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class Tap:
    """The monitoring hooks on one handler object (see the module docstring)."""

    def __init__(self, target: Any, layer: str | None = None):
        self.target = target
        self.armed = False
        self._thread = 0  # the thread running the armed batch
        self.calls: list[tuple[Any, Any]] = []  # (inputs, outputs) of each inference call while armed
        self.activations: list[Any] = []
        self._hook = None
        self._module = None
        self._use_output = False
        self.layer_name: str | None = None
        self.layer_error: str | None = None  # monitoring.layer named no module: why (the layer is then found)
        self.wrapped = False
        task = getattr(target, "monitor_task", _UNSET)
        self._task = task() if callable(task) else task
        self._features = getattr(target, "monitor_features", None)
        self._outputs = getattr(target, "monitor_outputs", None)
        self._outputs_inputs = self._outputs is not None and _positional(self._outputs) >= 2
        self._logits = bool(getattr(target, "monitor_logits", False))  # outputs are logits: no need to look
        self._class_cache: dict[int, tuple[str, ...] | None] = {}
        # monitor_rows on the handler's class (a property, a default), else in its own __dict__
        # (set in handle, or a module handler's global), else nowhere (see row_map)
        self._rows_declared = (hasattr(type(target), "monitor_rows") or hasattr(type(target), "__getattr__")
                               or not hasattr(target, "__dict__") or "__getattr__" in target.__dict__)
        self._own = None if self._rows_declared else target.__dict__
        inference = getattr(target, "inference", None)
        if callable(inference) and not isinstance(target, types.ModuleType):
            tap = self

            def tapped(*args: Any, **kwargs: Any) -> Any:
                out = inference(*args, **kwargs)
                if tap.armed and threading.get_ident() == tap._thread:
                    tap.calls.append((args[0] if len(args) == 1 else args, out))
                return out
            tapped.__wrapped__ = inference  # type: ignore[attr-defined]
            target.inference = tapped
            self.wrapped = True
        own = getattr(target, "monitor_layer", None)  # a handler's own choice: a module name, or False for none
        if layer is None and own is False:
            return
        try:
            self._find_layer(layer or own)
        except ValueError as exc:
            self.layer_error = str(exc)
            self._find_layer(None)

    def _find_layer(self, layer: str | None) -> None:
        model = _find_model(self.target)
        if model is None and not layer:
            script = _find_script(self.target)
            if script is not None:
                self._tap_script(script)
                return
        if model is None:
            if layer:
                raise ValueError(f"monitoring.layer {layer!r}: the handler has no eager torch model to hook")
            return  # TorchScript, torch.export, ONNX, or no model attribute: no penultimate activations
        if layer:
            modules = dict(model.named_modules())
            if layer not in modules:
                raise ValueError(f"monitoring.layer {layer!r} is no module of the model "
                                 f"(it has {', '.join(n for n in list(modules)[1:8] if n)}, ...)")
            self._module, self._use_output, self.layer_name = modules[layer], True, layer
            return
        import torch

        last = None
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                last = (name, m)
        if last is not None:
            self.layer_name, self._module = last

    def _tap_script(self, model: Any) -> None:
        """TorchScript runs its own graph (no hooks): while armed, the model's ``forward`` runs
        a copy of its graph that also returns the last linear layer's input (same kernels, one
        extra output); unarmed, its own forward, behind one Python call."""
        fn = _script_penultimate(model)
        if fn is None:
            return
        original = model.forward
        tap = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if tap.armed and not kwargs and tap._script_fn is not None and threading.get_ident() == tap._thread:
                try:
                    out, hidden = tap._script_fn(model._c, *args)
                except Exception:  # inputs the copy cannot take: stop tapping, run the model as it is
                    tap._script_fn = None
                else:
                    tap.activations.append(hidden)
                    return out
            return original(*args, **kwargs)
        self._script_fn = fn
        model.__dict__["forward"] = forward
        self.layer_name = "(last linear layer of the TorchScript graph)"

    _script_fn: Any = None

    # --- one sampled batch ---------------------------------------------------------------
    def arm(self) -> None:
        """Install the forward hook for the calling thread; what runs is kept while
        :attr:`armed` is set (the capture sets it for each sampled batch of a handoff)."""
        self.calls, self.activations = [], []
        self._thread = threading.get_ident()
        if self._module is not None and self._hook is None:
            if self._use_output:
                self._hook = self._module.register_forward_hook(self._keep_output)
            else:
                self._hook = self._module.register_forward_pre_hook(self._keep_input)
        self.armed = False

    def disarm(self) -> tuple[list, list]:
        """Stop keeping and remove the hook; the (calls, activations) kept since :meth:`arm`."""
        self.armed = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        calls, acts = self.calls, self.activations
        self.calls, self.activations = [], []
        return calls, acts

    def row_map(self) -> Any:
        """The handler's ``monitor_rows`` for the batch that just ran (None: one row per
        request). Read after every batch: a handler that has none (a module, a TorchServe
        handler) is looked up in its ``__dict__``, without the exception a missing attribute
        costs."""
        if self._rows_declared:
            return getattr(self.target, "monitor_rows", None)
        own = self._own
        return None if own is None else own.get("monitor_rows")

    # a model shared by several instances (a module-level handler's global) runs in other
    # threads too: keep only what this instance's thread computes
    def _keep_input(self, module: Any, args: tuple) -> None:
        if self.armed and args and threading.get_ident() == self._thread:
            self.activations.append(args[0])

    def _keep_output(self, module: Any, args: tuple, out: Any) -> None:
        if self.armed and threading.get_ident() == self._thread:
            self.activations.append(main_output(out))

    def _classes(self, width: int) -> tuple[str, ...] | None:
        if width not in self._class_cache:
            self._class_cache[width] = class_labels(self.target, width)
        return self._class_cache[width]

    @property
    def task_given(self) -> bool:
        return self._task is not _UNSET

    def collect(self, calls: list, activations: list, row_map: Any, results: list, n_requests: int) -> Captured | None:
        """The batch's features, embedding and predictions (one row per row the model saw),
        or None when there is nothing to say. Raises what a handler's hook raises."""
        target = self.target
        features: dict[str, list] = {}
        embedding_parts: list[np.ndarray] = []
        if self._features is not None and calls:
            for inputs, outputs in calls:
                got = self._features(inputs, outputs) or {}
                if not isinstance(got, dict):
                    raise TypeError(f"monitor_features returned a {type(got).__name__}, not a dict")
                for name, value in got.items():
                    if name == "embedding":
                        embedding_parts.append(as_array(value).reshape(len(value), -1))
                    else:
                        features.setdefault(str(name), []).append(as_array(value, None).reshape(-1))
        joined = {k: _concat(v) for k, v in features.items()}
        task = None if not self.task_given else self._task
        outputs = classes = None
        names = None
        if calls:
            raw_parts = [main_output(out) for _, out in calls]
            if self._outputs is not None:
                parts = [self._outputs(out, inp) if self._outputs_inputs else self._outputs(out)
                         for inp, out in calls]
                outputs = None if any(p is None for p in parts) else _concat([as_array(p) for p in parts])
            elif all(hasattr(r, "shape") for r in raw_parts):
                raw = _concat([as_array(r) for r in raw_parts])
                if raw.dtype.kind == "f" and raw.ndim in (1, 2) and len(raw):
                    width = 1 if raw.ndim == 1 else raw.shape[1]
                    if not self.task_given:
                        if raw.ndim == 2 and (self._classes(width) is not None or _probability_rows(raw)):
                            task = "classification"
                        elif width <= MAX_VALUES:
                            task = "regression"
                    if task == "classification" and (raw.ndim == 2 or self.task_given):  # 1-D: one logit
                        outputs = probabilities(raw, self._logits)
                    elif task == "regression" and width <= MAX_VALUES:
                        outputs = raw
            if task == "classification" and outputs is not None:
                classes = self._classes(outputs.shape[1])
        elif not self.task_given or task in ("classification", "regression"):
            t, outputs, classes, names = from_results(results, target)
            task = t if not self.task_given else (task if t == task else None)
            if task is None:
                outputs = classes = None
        rows = None
        if outputs is not None:
            rows = len(outputs)
        elif joined:
            rows = len(next(iter(joined.values())))
        embedding = _concat(embedding_parts) if embedding_parts else None
        if embedding is None and activations:
            try:
                acts = [as_array(a) for a in activations]
                acts = [a.mean(axis=1) if a.ndim == 3 else a.reshape(len(a), -1) for a in acts]
                embedding = _concat(acts)
            except ValueError:  # activations of different widths: no embedding
                embedding = None
        if rows is None and embedding is not None:
            rows = len(embedding)
        if rows is None or rows == 0:
            return None
        preds = {k: v for k, v in joined.items() if _is_prediction(k)}
        inputs = {k: v for k, v in joined.items() if not _is_prediction(k)}
        if names is not None and outputs is not None:  # regression read from {key: value} results
            v = outputs.reshape(len(outputs), -1)
            preds.update({"prediction": v[:, 0]} if len(names) == 1 else
                         {f"prediction[{k}]": v[:, i] for i, k in enumerate(names)})
            if len(names) == 1:
                outputs = v[:, 0]
        else:
            preds.update(prediction_features(task, outputs, classes))
        if task == "autoencoder" and outputs is None and "reconstruction_error" in preds:
            outputs = np.asarray(preds["reconstruction_error"], dtype=np.float32)
        if task == "regression" and outputs is not None and outputs.ndim == 2 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        for name, v in (*inputs.items(), *preds.items()):
            if len(v) != rows:
                raise ValueError(f"feature {name!r} has {len(v)} values for {rows} rows")
        if embedding is not None and len(embedding) != rows:
            embedding = None  # the layer ran on something else than the batch's rows
        row_requests = None
        if row_map is not None:
            row_requests = np.asarray(row_map, dtype=np.int64)
            if len(row_requests) != rows:
                return None
        elif rows != n_requests:
            return None  # rows that are not the requests, and no map from one to the other
        return Captured(rows, row_requests, inputs, preds, embedding, task,
                        None if outputs is None else outputs.astype(np.float32, copy=False), classes)

