"""TorchServe's metrics configuration (``metrics_config``): which metrics exist, their type,
unit and dimensions.

The file is TorchServe's YAML layout (``ts/configs/metrics.yaml``)::

    dimensions: [&model_name "ModelName", &level "Level", ...]   # anchors, optional
    ts_metrics:        # the frontend's: counter / gauge / histogram lists
      counter:
        - name: Requests2XX
          unit: Count
          dimensions: [*level, *hostname]
    model_metrics:     # the handlers': HandlerTime, PredictionTime, and custom ones
      gauge:
        - name: HandlerTime
          unit: ms
          dimensions: [*model_name, *level]

Without ``metrics_config`` TorchServe's own default (``ts_metrics_default.yaml``, a copy of
TorchServe 0.12's) applies. Model metrics get the ``Hostname`` dimension added, as TorchServe
adds it. A broken file is refused at start with a message naming the file and the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MetricSpec", "MetricsConfig", "load_metrics_config", "DEFAULT_METRICS_CONFIG"]

DEFAULT_METRICS_CONFIG = Path(__file__).with_name("ts_metrics_default.yaml")
_KINDS = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    unit: str
    dimensions: tuple[str, ...]


@dataclass(frozen=True)
class MetricsConfig:
    path: str
    ts_metrics: dict[str, MetricSpec]
    model_metrics: dict[str, MetricSpec]

    def frontend(self, name: str) -> MetricSpec | None:
        return self.ts_metrics.get(name)

    def model(self, name: str) -> MetricSpec | None:
        return self.model_metrics.get(name)


def _section(path: str, doc: dict, section: str, add_hostname: bool) -> dict[str, MetricSpec]:
    body = doc.get(section)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValueError(f"metrics_config {path}: {section} must map counter/gauge/histogram to lists of metrics")
    out: dict[str, MetricSpec] = {}
    for kind, entries in body.items():
        if kind not in _KINDS:
            raise ValueError(f"metrics_config {path}: {section}.{kind} is not one of {', '.join(_KINDS)}")
        for i, entry in enumerate(entries or ()):
            where = f"{section}.{kind}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(f"metrics_config {path}: {where} needs a name")
            dims = entry.get("dimensions") or []
            if not isinstance(dims, list) or not all(isinstance(d, str) and d for d in dims):
                raise ValueError(f"metrics_config {path}: {where} ({entry['name']}): dimensions must be a list of names")
            if add_hostname and "Hostname" not in dims:
                dims = [*dims, "Hostname"]
            unit = entry.get("unit", "")
            out[entry["name"]] = MetricSpec(entry["name"], kind, "" if unit is None else str(unit), tuple(dims))
    return out


def load_metrics_config(path: str | Path | None = None) -> MetricsConfig:
    """The metrics named in ``path`` (TorchServe's default when empty)."""
    file = Path(path) if path else DEFAULT_METRICS_CONFIG
    try:
        doc: Any = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ValueError(f"setting metrics_config: cannot read {str(file)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"setting metrics_config: {str(file)!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"setting metrics_config: {str(file)!r} must hold ts_metrics and/or model_metrics")
    return MetricsConfig(str(file), _section(str(file), doc, "ts_metrics", False),
                         _section(str(file), doc, "model_metrics", True))
