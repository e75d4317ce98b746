"""Nearest-centroid accuracy: how the gate judges an embedding model with labels.

An embedding model answers a vector, which a feedback label cannot be compared with. Its
label is the class of the input (a text's topic, as the archive's ``reference.npz`` targets
name it), and the question the gate asks is the one users of embeddings rely on: do inputs
of one class land near each other, and near that class's reference examples?

``centroid_accuracy``: each scored example is given the class whose centroid (the mean of the
unit-length embeddings of that class's *anchor* examples) is nearest by cosine similarity;
the share given their own label. The anchors are the golden set (the archive's reference
inputs with their targets) embedded by the model under test, so champion and challenger each
use their own centroids, built from the same examples. An example that is itself an anchor
(the golden set scored against itself) is left out of its class's centroid (leave-one-out).
Labels are compared as text (``2``, ``"2"`` and ``np.int64(2)`` are one class); an example
whose label no anchor has cannot be right and counts as wrong (``no_centroid`` says how many).
Higher is better, absolute changes, as accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .data import RowError, example_labels

__all__ = ["METRIC", "label_key", "centroid_accuracy", "centroid_score"]

METRIC = "centroid_accuracy"


def label_key(label: Any) -> str:
    """A class label as the text it is compared by."""
    if hasattr(label, "item") and not isinstance(label, np.ndarray):
        label = label.item()  # numpy scalars
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if label is None or isinstance(label, (list, tuple, dict, np.ndarray)) or str(label) == "":
        raise ValueError(f"a class label must be a name or a number, got {label!r}")
    return str(label)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def centroid_accuracy(vectors: np.ndarray, keys: Sequence[str], anchor_vectors: np.ndarray,
                      anchor_keys: Sequence[str], self_anchor: Sequence[int] | None = None) -> dict[str, Any]:
    """Nearest-centroid accuracy of ``vectors`` (N x d) labelled ``keys`` against the class
    centroids of the anchors; ``self_anchor[j]``: the anchor that is example ``j`` itself (left
    out of its centroid), or -1."""
    n = len(keys)
    if n == 0:
        return {"rows": 0}
    v, a = _unit(vectors), _unit(anchor_vectors)
    classes = sorted(set(anchor_keys))
    index = {c: i for i, c in enumerate(classes)}
    a_cls = np.array([index[k] for k in anchor_keys], dtype=np.int64)
    sums = np.zeros((len(classes), a.shape[1]))
    np.add.at(sums, a_cls, a)
    counts = np.bincount(a_cls, minlength=len(classes)).astype(np.float64)
    dots = v @ sums.T  # N x C; the direction of a sum is the direction of the mean
    sq = np.tile((sums ** 2).sum(1), (n, 1))
    cnt = np.tile(counts, (n, 1))
    if self_anchor is not None:
        for j, s in enumerate(self_anchor):
            if s is not None and s >= 0:  # leave example j out of its own class's centroid
                c = a_cls[s]
                dots[j, c] -= v[j] @ a[s]
                sq[j, c] += -2.0 * (sums[c] @ a[s]) + a[s] @ a[s]
                cnt[j, c] -= 1
    sims = np.where(cnt > 0, dots / np.sqrt(np.maximum(sq, 1e-24)), -np.inf)
    pred = sims.argmax(1)
    truth = np.array([index.get(k, -1) for k in keys], dtype=np.int64)
    return {"rows": n, METRIC: round(float((pred == truth).mean()), 6), "classes": len(classes),
            "no_centroid": int((truth < 0).sum())}


def _examples(outputs: Mapping[int, np.ndarray], rows: Sequence[dict], indices: Sequence[int]):
    """(vectors, keys, example positions by row) of the answered rows among ``indices``."""
    vecs, keys, where = [], [], {}
    for i in indices:
        out = outputs.get(i)
        if out is None:
            continue
        out = np.asarray(out).reshape(len(out), -1)
        rid = rows[i].get("rid", i)
        labels = example_labels(rows[i], i, len(out), unwrap_one=True)  # several texts: one label each
        try:
            got = [label_key(y) for y in labels]
        except ValueError as exc:
            raise RowError(f"row {rid}: {exc} (an embedding model's label is the input's class)") from None
        where[i] = list(range(len(keys), len(keys) + len(got)))
        vecs.append(out)
        keys += got
    if not vecs:
        return np.zeros((0, 0)), [], where
    return np.concatenate(vecs), keys, where


def centroid_score(outputs: Mapping[int, np.ndarray], rows: Sequence[dict], indices: Sequence[int],
                   anchors: Sequence[int] | None = None) -> dict[str, Any]:
    """``centroid_accuracy`` of the rows ``indices`` (their embeddings in ``outputs``, by row
    index) against the centroids of the rows ``anchors`` (default: ``indices`` themselves,
    leave-one-out)."""
    indices = list(indices)
    anchors = indices if anchors is None else list(anchors)
    vecs, keys, where = _examples(outputs, rows, indices)
    if not keys:
        return {"rows": 0}
    a_vecs, a_keys, a_where = _examples(outputs, rows, anchors)
    if not a_keys:
        return {"rows": len(keys), "note": "no anchor rows to build class centroids from"}
    self_anchor = [-1] * len(keys)
    for i, pos in where.items():
        for p, q in zip(pos, a_where.get(i, ())):
            self_anchor[p] = q
    return centroid_accuracy(vecs, keys, a_vecs, a_keys, self_anchor)
