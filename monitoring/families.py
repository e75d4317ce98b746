"""Cheap metric families for the event-loop thread, rendered as Prometheus text.

The request path records into these on the event loop only (observers and batch hooks run
there, and so does the ``/metrics`` handler), so a counter is one float in a list and a
histogram observation is one ``bisect`` and two additions: no locks, no label validation
per call. Callers look a labelled child up once and keep it (see ``ServingMetrics``).

Rendering writes the text exposition format (0.0.4) directly, so a family's ``# TYPE``
line names exactly the samples it carries: ``ts_inference_latency_microseconds`` stays a
counter without a ``_total`` suffix, as TorchServe exposes it.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Sequence

__all__ = ["Counter", "Histogram", "Gauge", "render_family", "escape", "fmt"]


def escape(value: str) -> str:
    """A label value, escaped for the text format."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def fmt(value: float) -> str:
    if value != value:
        return "NaN"
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value)}.0"
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "", end: str = "") -> str:
    parts = [f'{n}="{escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + end + "}" if parts else ""


def render_family(name: str, kind: str, doc: str, lines: Iterable[str]) -> str:
    body = "".join(lines)
    return f"# HELP {name} {doc.replace(chr(10), ' ')}\n# TYPE {name} {kind}\n{body}"


class Counter:
    """A counter family; ``child(*labels)`` is a one-element list to add to.

    ``torchserve=True`` writes each label set as TorchServe 0.12 writes it (its Prometheus
    Java client ends it with a comma: ``{Level="Host",Hostname="h",}``, which Prometheus
    reads as the same labels): clients of TorchServe match those lines by text, its own
    Postman API tests among them (tests/e2e/test_torchserve_postman.py)."""

    kind = "counter"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], *, torchserve: bool = False):
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.end = "," if torchserve else ""
        self.children: dict[tuple[str, ...], list[float]] = {}

    def child(self, *values: str) -> list[float]:
        c = self.children.get(values)
        if c is None:
            c = self.children[values] = [0.0]
        return c

    def remove(self, match) -> None:
        for key in [k for k in self.children if match(dict(zip(self.labelnames, k)))]:
            del self.children[key]

    def render(self) -> str:
        lines = (f"{self.name}{_labels(self.labelnames, k, end=self.end)} {fmt(c[0])}\n" for k, c in self.children.items())
        return render_family(self.name, self.kind, self.doc, lines)


class Gauge(Counter):
    kind = "gauge"


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, value: float, n: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """A histogram family with fixed bucket edges (``le`` is inclusive, as in Prometheus)."""

    kind = "histogram"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], buckets: Iterable[float]):
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.bounds = tuple(sorted({float(b) for b in buckets if b != float("inf")}))
        if not self.bounds:
            raise ValueError(f"histogram {name} needs at least one finite bucket edge")
        self._les = ['le="' + fmt(b) + '"' for b in self.bounds] + ['le="+Inf"']
        self.children: dict[tuple[str, ...], _HistogramChild] = {}

    def child(self, *values: str) -> _HistogramChild:
        c = self.children.get(values)
        if c is None:
            c = self.children[values] = _HistogramChild(self.bounds)
        return c

    def remove(self, match) -> None:
        for key in [k for k in self.children if match(dict(zip(self.labelnames, k)))]:
            del self.children[key]

    def render(self) -> str:
        out = []
        for key, c in self.children.items():
            total = 0
            for le, n in zip(self._les, c.counts):
                total += n
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {total}.0\n")
            lab = _labels(self.labelnames, key)
            out.append(f"{self.name}_sum{lab} {fmt(c.sum)}\n{self.name}_count{lab} {total}.0\n")
        return render_family(self.name, self.kind, self.doc, out)
