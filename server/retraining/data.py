"""Labelled rows and golden sets, as requests for an archive's handler.

A labelled production row (monitoring's dataset export, ``rows.pkl``)::

    {"rid": str, "ts": float, "inputs": X, "label": Y}

``X`` is what the handler received for that request: ``{"body": ...}`` or ``{"data": ...}``
(TorchServe style; bytes, text or a JSON value) or ``{name: numpy array}`` (Open Inference
Protocol tensors). ``Y`` is the label as sent in feedback: a class by name or index, or a
number (a list of numbers for a model with several outputs).

The golden set is the archive's ``reference.npz`` (``inputs`` in the units a client sends,
``targets``), each input turned into a request the way ``osprey examples`` profiles it: by the
training module's ``reference_request(row)`` when it has one, else the row as JSON (text as
text).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["RowError", "example_labels", "request_body", "handler_row", "read_rows", "split_rows", "read_reference",
           "golden_rows", "resolve_labels", "usable_rows"]


class RowError(ValueError):
    """A row that cannot be used: the message names its rid and why."""


def _rid(row: Any, i: int) -> str:
    return str(row.get("rid", f"#{i}")) if isinstance(row, dict) else f"#{i}"


def _inputs(row: Any, i: int) -> dict:
    if not isinstance(row, dict) or "inputs" not in row:
        raise RowError(f"row {_rid(row, i)}: a row is a dict with 'rid', 'inputs' and 'label'")
    inputs = row["inputs"]
    if not isinstance(inputs, dict) or not inputs:
        raise RowError(f"row {_rid(row, i)}: 'inputs' must be {{'body': ...}}, {{'data': ...}} or {{name: array}}, "
                       f"got {type(inputs).__name__}")
    return inputs


def _is_tensors(inputs: dict) -> bool:
    return all(isinstance(v, np.ndarray) for v in inputs.values())


def request_body(row: dict, i: int = 0) -> Any:
    """The row's inputs as a client's request body (what ``run_reference`` sends): the
    ``data`` / ``body`` value, or the dict of tensors."""
    inputs = _inputs(row, i)
    if _is_tensors(inputs) and not ({"body", "data"} & set(inputs)):
        return dict(inputs)
    for key in ("data", "body"):
        if key in inputs:
            return inputs[key]
    if len(inputs) == 1:
        return next(iter(inputs.values()))
    raise RowError(f"row {_rid(row, i)}: inputs has no 'body' or 'data' (keys: {', '.join(map(str, inputs))})")


def handler_row(row: dict, i: int = 0) -> dict:
    """The row's inputs as the handler's ``data`` row (``{"body": ...}``, or ``{"tensors": {...}}``)."""
    inputs = _inputs(row, i)
    if _is_tensors(inputs) and not ({"body", "data"} & set(inputs)):
        return {"tensors": dict(inputs)}
    return dict(inputs)


def read_rows(path: str | Path) -> list[dict]:
    """Rows from a ``rows.pkl`` (a pickled list of row dicts)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            rows = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise RowError(f"{path}: not a readable rows file ({exc})") from None
    if not isinstance(rows, list):
        raise RowError(f"{path}: holds a {type(rows).__name__}, not a list of rows")
    for i, row in enumerate(rows):
        _inputs(row, i)
        if "label" not in row:
            raise RowError(f"{path}: row {_rid(row, i)} has no label")
    return rows


def split_rows(rows: Sequence[dict], share: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rest, held) with ``share`` of the rows held (seeded, at least one of each when
    there are two or more rows and the share is above 0)."""
    rows = list(rows)
    if not rows or share <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n = min(len(rows) - 1, max(1, round(len(rows) * share))) if len(rows) > 1 else 0
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def read_reference(model_dir: str | Path) -> dict[str, np.ndarray]:
    """The archive's ``reference.npz`` arrays ({} when it has none)."""
    path = Path(model_dir) / "reference.npz"
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def golden_rows(model_dir: str | Path, to_request: Any = None, limit: int | None = None) -> list[dict]:
    """The archive's reference inputs with their targets as labelled rows (``rid``
    ``golden-<i>``); [] when ``reference.npz`` has no ``inputs`` and ``targets``."""
    ref = read_reference(model_dir)
    if "inputs" not in ref or "targets" not in ref:
        return []
    inputs, targets = ref["inputs"], ref["targets"]
    n = min(len(inputs), len(targets), limit or len(inputs))
    rows = []
    for i in range(n):
        x = inputs[i]
        if to_request is not None:
            body = to_request(x)
        else:
            body = str(x) if x.dtype.kind in "US" else x.tolist()
        y = targets[i]
        rows.append({"rid": f"golden-{i}", "ts": 0.0, "inputs": {"body": body},
                     "label": y.tolist() if isinstance(y, np.ndarray) else (y.item() if hasattr(y, "item") else y)})
    return rows


def example_labels(row: dict, i: int, n: int, unwrap_one: bool = False) -> list:
    """The labels of row ``i``'s ``n`` examples: a request holding several examples carries a list
    of ``n`` labels (RowError naming the row otherwise); one example, its label (``unwrap_one``:
    a list of one label is that label, and a list of several a RowError)."""
    label = row.get("label")
    if n > 1:
        if not isinstance(label, (list, tuple)) or len(label) != n:
            raise RowError(f"row {row.get('rid', i)}: its request holds {n} examples; its label must be a list of {n}")
        return list(label)
    if unwrap_one and isinstance(label, (list, tuple)):
        if len(label) != 1:
            raise RowError(f"row {row.get('rid', i)}: its request holds one example but its label is a list of {len(label)}")
        return list(label)
    return [label]


def resolve_labels(rows: Sequence[dict], task: str | None, classes: Sequence[str] | None,
                   width: int | None = None) -> list[Any]:
    """Each row's label as the quality monitor reads feedback: a class index (classification,
    by name or index) or the value(s) (regression); for an embedding model, the input's class
    as text (:func:`server.retraining.centroids.label_key`); :class:`RowError` naming the row
    otherwise."""
    from monitoring.quality.monitor import resolve_label

    if task == "embedding":
        from .centroids import label_key

        keys = []
        for i, row in enumerate(rows):
            try:
                keys.append(label_key(row.get("label")))
            except ValueError as exc:
                raise RowError(f"row {_rid(row, i)}: {exc} (an embedding model's label is the input's class)") from None
        return keys

    kind = b"r" if task == "regression" else b"c"
    out = []
    for i, row in enumerate(rows):
        label = row.get("label")
        if hasattr(label, "item") and not isinstance(label, np.ndarray):
            label = label.item()  # numpy scalars
        elif isinstance(label, np.ndarray):
            label = label.tolist()
        if kind == b"r":
            w = width or (len(label) if isinstance(label, list) else 1)
        else:
            w = width or (len(classes) if classes else 1 << 31)
        value, why = resolve_label(label, kind, w, list(classes) if classes else None)
        if why:
            raise RowError(f"row {_rid(row, i)}: {why}")
        out.append(value)
    return out


def usable_rows(rows: Sequence[dict], task: str | None, classes: Sequence[str] | None,
                counts: Sequence[int | None] | None = None) -> tuple[list[dict], list[str]]:
    """(the rows whose label this model can take, one line per row left out naming it and why).

    A label is checked as :func:`resolve_labels` reads it (a request holding several examples:
    each of its list's labels); a model whose task says nothing about its labels keeps every
    row. ``counts``: how many examples each row's request holds, where the handler can tell
    (:meth:`server.retraining.serving.LoadedModel.example_counts`; None for a row it cannot):
    a row whose label is not one per example is left out too. Production rows are what
    clients sent: one wrong label must cost its row, not the whole retraining."""
    if task not in ("classification", "regression", "embedding"):
        return list(rows), []
    kept, dropped = [], []
    for i, row in enumerate(rows):
        label = row.get("label")
        if isinstance(label, np.ndarray):
            label = label.tolist()
        n = counts[i] if counts is not None else None
        rid = _rid(row, i)
        try:
            if n is None:  # as many examples as the label says (a regression's list is one value)
                labels = label if isinstance(label, (list, tuple)) and task != "regression" else [label]
            else:
                labels = example_labels(dict(row, label=label, rid=rid), i, n, unwrap_one=task != "regression")
            resolve_labels([{"rid": rid, "label": y} for y in labels], task, classes)
        except RowError as exc:
            dropped.append(str(exc))
            continue
        kept.append(row)
    return kept, dropped
