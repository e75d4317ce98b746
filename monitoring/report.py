"""``osprey monitor report``: one model version's drift and live quality as an HTML page with PNG plots.

People look at drift, they do not read it. The report is a client: it fetches
``GET {url}/monitoring/{model}[/{version}]`` (the inference port, inference token; the JSON is
described in monitoring/README.md) and, with ``--prometheus``, the history of
``osprey_drift_score`` and ``osprey_quality`` through Prometheus's ``query_range``. It writes
``DIR/index.html`` (no script, no stylesheet or image from elsewhere: the folder is the whole
report) beside the PNGs it shows:

- ``feature-NN-NAME.png``: reference vs current distribution of each drifted feature (bars over
  the reference bins or categories); the top few features by score when none drifted;
- ``drift-windows.png``: drift scores over the server's recent windows with the threshold;
- ``quality-windows.png``: live quality metrics over the labelled windows with their baseline;
- ``drift-prometheus.png`` / ``quality-prometheus.png``: the same over wall-clock time (``--prometheus``).

Errors are ``ReportError``s carrying the exit status; ``run`` prints one line on stderr:
``EXIT_UNREACHABLE`` (3, the server or an answer it could not give), ``EXIT_AUTH`` (4, 401 or
an unreadable key file), ``EXIT_NOT_FOUND`` (5, unknown model or version), ``EXIT_BAD_JSON``
(6, the JSON lacks what the report needs: the field is named), ``EXIT_PROMETHEUS`` (7),
``EXIT_ERROR`` (1, the output folder cannot be written). argparse answers 2 for bad usage.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "fetch_status", "check_status", "fetch_prometheus", "write_report",
           "add_report_parser", "run", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_AUTH",
           "EXIT_NOT_FOUND", "EXIT_BAD_JSON", "EXIT_PROMETHEUS"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's status for bad arguments
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_BAD_JSON = 6
EXIT_PROMETHEUS = 7

TOP_WHEN_NONE_DRIFTED = 3  # distribution plots when no feature drifted: the highest scores
TOP_IN_TIME_PLOTS = 6  # feature lines in a score-over-time plot
DEFAULT_KEY_FILE = "key_file.json"  # the server writes it in its workdir (default: where it started)


class ReportError(Exception):
    """A report that cannot be made; ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- fetching

def _base(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def monitoring_url(url: str, model: str, version: str | None = None) -> str:
    path = "/monitoring/" + urllib.parse.quote(model, safe="")
    if version:
        path += "/" + urllib.parse.quote(version, safe="")
    return _base(url) + path


def _server_message(body: bytes) -> str:
    """The ``message`` of an Osprey/TorchServe error body, else the body's first line."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            text = str(data.get("message") or data.get("error") or text)
    except ValueError:
        pass
    return text.splitlines()[0][:300] if text else ""


def _get(url: str, headers: dict[str, str], timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.read()


def fetch_status(url: str, model: str, version: str | None = None, token: str | None = None,
                 timeout: float = 30.0) -> dict:
    """The monitoring JSON of ``model`` (``version``, else its default version), checked."""
    target = monitoring_url(url, model, version)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        body = _get(target, headers, timeout)
    except urllib.error.HTTPError as exc:
        message = _server_message(exc.read())
        what = f"model {model!r}" + (f" version {version!r}" if version else "")
        # 400 too when the server answers token failures as TorchServe does (OSPREY_TOKEN_AUTH_STATUS=400)
        if exc.code in (401, 403) or (exc.code == 400 and "token" in message.lower()):
            hint = ("the token was refused: pass the inference key (--token, or --key-file with the server's "
                    "key_file.json)" if token else "the server requires a token: pass the inference key with "
                    "--token, or --key-file with the server's key_file.json")
            raise ReportError(f"{exc.code} from {target}: {hint}", EXIT_AUTH) from None
        if exc.code == 404:
            raise ReportError(f"unknown {what}: {target} answered 404" + (f" ({message})" if message else ""),
                              EXIT_NOT_FOUND) from None
        raise ReportError(f"{target} answered {exc.code}" + (f": {message}" if message else ""),
                          EXIT_UNREACHABLE) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReportError(f"cannot reach the Osprey server at {_base(url)} ({target}): {reason}",
                          EXIT_UNREACHABLE) from None
    try:
        status = json.loads(body)
    except ValueError:
        raise ReportError(f"{target} answered something that is not JSON: {body[:80]!r}", EXIT_BAD_JSON) from None
    check_status(status, source=target)
    return status


def read_key_file(path: str | os.PathLike) -> str:
    """The inference key of a server's ``key_file.json``."""
    try:
        return str(json.loads(Path(path).read_text())["inference"]["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"cannot read the inference key from the key file {path}: "
                          f"{exc.__class__.__name__}: {exc}", EXIT_AUTH) from None


# ---------------------------------------------------------------- checking the JSON

_NUMBER = (int, float)


def _field(obj: Any, path: str, key: str, types: tuple, source: str, nullable: bool = False) -> Any:
    where = f"{path}.{key}" if path else key
    if not isinstance(obj, dict) or key not in obj:
        raise ReportError(f"the monitoring JSON from {source} lacks {where}", EXIT_BAD_JSON)
    value = obj[key]
    if value is None and nullable:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
        raise ReportError(f"the monitoring JSON from {source}: {where} should be {names}, not {value!r:.80}",
                          EXIT_BAD_JSON)
    return value


def check_status(status: Any, source: str = "the server") -> None:
    """Raise ``ReportError(EXIT_BAD_JSON)`` naming the first field the report needs and lacks."""
    if not isinstance(status, dict):
        raise ReportError(f"the monitoring JSON from {source} is not an object", EXIT_BAD_JSON)
    for key in ("model", "version"):
        _field(status, "", key, (str,), source)
    _field(status, "", "reference", (str,), source, nullable=True)  # null: the version is not monitored
    drift = _field(status, "", "drift", (dict,), source)
    _field(drift, "drift", "detected", (bool,), source)
    _field(drift, "drift", "score", _NUMBER, source, nullable=True)
    _field(drift, "drift", "episode", (dict,), source, nullable=True)
    features = _field(drift, "drift", "features", (list,), source)
    for i, feature in enumerate(features):
        path = f"drift.features[{i}]"
        _field(feature, path, "name", (str,), source)
        _field(feature, path, "score", _NUMBER, source, nullable=True)
        _field(feature, path, "threshold", _NUMBER, source)
        _field(feature, path, "drifted", (bool,), source)
        # null: the server has no reference for it (a profile changed under a stored window): not plotted
        reference = _field(feature, path, "reference", (dict,), source, nullable=True)
        current = _field(feature, path, "current", (dict,), source)
        if reference is None:
            continue
        ref = _field(reference, f"{path}.reference", "proportions", (list,), source)
        if "categories" in reference:
            bins = len(_field(reference, f"{path}.reference", "categories", (list,), source))
        elif "edges" in reference:
            edges = _field(reference, f"{path}.reference", "edges", (list,), source)
            if not all(e is None or (isinstance(e, _NUMBER) and not isinstance(e, bool)) for e in edges):
                raise ReportError(f"the monitoring JSON from {source}: {path}.reference.edges should be numbers "
                                  f"(null for the open ends)", EXIT_BAD_JSON)
            bins = len(edges) - 1
        else:
            raise ReportError(f"the monitoring JSON from {source} lacks {path}.reference.edges "
                              f"(or .categories)", EXIT_BAD_JSON)
        cur = _field(current, f"{path}.current", "proportions", (list,), source)
        if len(ref) != bins or len(cur) != bins:
            raise ReportError(f"the monitoring JSON from {source}: {path} ({feature['name']}) has {bins} "
                              f"reference bins but {len(ref)} reference and {len(cur)} current proportions",
                              EXIT_BAD_JSON)
    quality = _field(status, "", "quality", (dict,), source, nullable=True)
    if quality is not None and "error" not in quality:  # {"degraded": true, "error": ...}: quality failed
        _field(quality, "quality", "metrics", (dict,), source)
        _field(quality, "quality", "baseline", (dict,), source, nullable=True)
        _field(quality, "quality", "degraded", (bool,), source)
    history = _field(status, "", "history", (list,), source)
    for i, entry in enumerate(history):
        path = f"history[{i}]"
        _field(entry, path, "window", (int,), source)
        _field(entry, path, "score", _NUMBER, source, nullable=True)
        _field(entry, path, "drifted", (bool,), source)
        _field(entry, path, "features", (dict,), source)


# ---------------------------------------------------------------- Prometheus

def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fetch_prometheus(prom_url: str, model: str, version: str, since_s: float = 6 * 3600,
                     end: float | None = None, timeout: float = 30.0) -> dict[str, dict[str, list]]:
    """``{"drift": {feature: [(t, score)]}, "quality": {metric: [(t, value)]}}`` over the last ``since_s``."""
    end = time.time() if end is None else end
    start = end - since_s
    step = max(15.0, since_s / 600)  # at most ~600 points a series
    selector = f"model={_promql_string(model)}, version={_promql_string(version)}"
    queries = {"drift": (f"max by (feature) (osprey_drift_score{{{selector}}})", "feature"),
               "quality": (f"max by (metric) (osprey_quality{{{selector}}})", "metric")}
    out: dict[str, dict[str, list]] = {}
    for key, (query, label) in queries.items():
        params = urllib.parse.urlencode({"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                         "step": f"{step:g}"})
        target = f"{_base(prom_url)}/api/v1/query_range?{params}"
        try:
            body = _get(target, {}, timeout)
        except urllib.error.HTTPError as exc:
            raise ReportError(f"Prometheus at {_base(prom_url)} answered {exc.code} to {query}: "
                              f"{_server_message(exc.read())}", EXIT_PROMETHEUS) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ReportError(f"cannot reach Prometheus at {_base(prom_url)}: {getattr(exc, 'reason', exc)}",
                              EXIT_PROMETHEUS) from None
        try:
            data = json.loads(body)
            if data.get("status") != "success":
                raise ReportError(f"Prometheus at {_base(prom_url)} refused {query}: {data.get('error')}",
                                  EXIT_PROMETHEUS)
            out[key] = {str(s["metric"].get(label, "")): [(float(t), float(v)) for t, v in s["values"]]
                        for s in data["data"]["result"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReportError(f"Prometheus at {_base(prom_url)} answered {query} with something that is not a "
                              f"query_range result ({exc.__class__.__name__}: {exc})", EXIT_PROMETHEUS) from None
    return out


def parse_duration(text: str) -> float:
    """``90``, ``30m``, ``6h``, ``2d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (e.g. 90, 30m, 6h, 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ---------------------------------------------------------------- plots

REFERENCE_COLOR = "#4c72b0"
CURRENT_COLOR = "#dd8452"
DRIFT_COLOR = "#c44e52"


def _figure(width: float = 8.0, height: float = 4.0):
    # A Figure of its own (no pyplot): no global state, no display; PNGs go through Agg.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.{digits}g}"
    return str(value)


def _bin_labels(reference: dict) -> list[str]:
    if "categories" in reference:
        return [str(c) for c in reference["categories"]]
    # JSON has no infinity: the server writes the open ends as null
    edges = [float(e) if e is not None else (-math.inf if i == 0 else math.inf)
             for i, e in enumerate(reference["edges"])]
    labels = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        if math.isinf(lo) or i == 0:
            labels.append(f"< {hi:.3g}")
        elif math.isinf(hi) or i == len(edges) - 2:
            labels.append(f"≥ {lo:.3g}")
        else:
            labels.append(f"{lo:.3g} – {hi:.3g}")
    return labels


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:40] or "feature"


def plot_feature(feature: dict, path: Path) -> None:
    """Reference vs current proportions over the reference's bins or categories."""
    labels = _bin_labels(feature["reference"])
    ref = [float(p) for p in feature["reference"]["proportions"]]
    cur = [float(p) for p in feature["current"]["proportions"]]
    fig = _figure(max(6.0, min(16.0, 0.55 * len(labels) + 2)), 4.2)
    ax = fig.add_subplot()
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], ref, width=0.4, label="reference", color=REFERENCE_COLOR)
    ax.bar([x + 0.2 for x in xs], cur, width=0.4, label="current window", color=CURRENT_COLOR)
    tilt = len(labels) > 6 and max(len(label) for label in labels) > 3
    ax.set_xticks(list(xs), labels, rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylabel("share of rows")
    state = "drifted" if feature["drifted"] else "not drifted"
    method = feature.get("method") or ""
    ax.set_title(f"{feature['name']} ({feature.get('kind', '?')}): {method} {_fmt(feature['score'], 3)}, "
                 f"threshold {_fmt(feature['threshold'], 3)}, {state}",
                 color=DRIFT_COLOR if feature["drifted"] else "black")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png")


def _thresholds(ax, names: list[str], thresholds: dict[str, float], colors: dict[str, Any]) -> None:
    distinct = {thresholds[n] for n in names if n in thresholds}
    if len(distinct) == 1:
        ax.axhline(distinct.pop(), color=DRIFT_COLOR, linestyle="--", label="threshold")
    else:
        for n in names:
            if n in thresholds:
                ax.axhline(thresholds[n], color=colors[n], linestyle="--", linewidth=0.8)


def _top_names(series: dict[str, list], first: list[str], n: int) -> list[str]:
    rest = sorted((k for k in series if k not in first), key=lambda k: -max((v for _, v in series[k]), default=0))
    return ([k for k in first if k in series] + rest)[:n]


def plot_drift_windows(status: dict, path: Path) -> None:
    """Per-feature scores (top features, drifted first) and the window score over the history."""
    history = status["history"]
    features = {f["name"]: f for f in status["drift"]["features"]}
    series: dict[str, list] = {}
    for entry in history:
        for name, score in entry["features"].items():
            if isinstance(score, _NUMBER):
                series.setdefault(name, []).append((entry["window"], float(score)))
    drifted_now = [f["name"] for f in sorted(status["drift"]["features"], key=lambda f: -(f["score"] or 0))
                   if f["drifted"]]
    names = _top_names(series, drifted_now, TOP_IN_TIME_PLOTS)
    fig = _figure(9, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    colors = {}
    for name in names:
        (line,) = top.plot(*zip(*series[name]), marker=".", label=name)
        colors[name] = line.get_color()
    _thresholds(top, names, {n: float(f["threshold"]) for n, f in features.items()}, colors)
    top.set_ylabel("feature drift score")
    top.set_title(f"{status['model']} {status['version']}: drift per window (drifted windows shaded)")
    if names:
        top.legend(fontsize="small", loc="upper left")
    points = [(e["window"], e["score"]) for e in history if e["score"] is not None]
    if points:
        bottom.plot(*zip(*points), color="black", marker=".", label="window score")
    for entry in history:
        if entry["drifted"]:
            for ax in (top, bottom):
                ax.axvspan(entry["window"] - 0.5, entry["window"] + 0.5, color=DRIFT_COLOR, alpha=0.15, linewidth=0)
    bottom.set_xlabel("window")
    bottom.set_ylabel("window score")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.savefig(path, format="png")


def _window_quality(entry: dict) -> dict[str, float]:
    quality = entry.get("quality")
    if not isinstance(quality, dict):
        return {}
    metrics = quality.get("metrics", quality)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, _NUMBER) and not isinstance(v, bool)
            and k not in ("labels", "unmatched", "invalid", "window")} if isinstance(metrics, dict) else {}


_UNIT_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "auc")  # name parts of metrics in [0, 1]


def _unit_metric(name: str) -> bool:
    return any(part in name for part in _UNIT_METRICS)


def quality_panels(names) -> list[list[str]]:
    """The quality plot's panels: the metrics in [0, 1], then the others (each panel sorted;
    an empty one left out)."""
    return [g for g in ([n for n in sorted(names) if _unit_metric(n)],
                        [n for n in sorted(names) if not _unit_metric(n)]) if g]


def _plot_quality(series: dict[str, list], baseline: dict, path: Path, title: str, xlabel: str,
                  time_axis: bool) -> None:
    """Metrics in [0, 1] (accuracy, F1, AUC, ...) on one panel and the others (log loss, MSE,
    MAE, R²) on their own, so that a log loss of 5 does not flatten an accuracy drop."""
    groups = quality_panels(series)
    fig = _figure(9, 4.5 if len(groups) == 1 else 7)
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, names in zip(axes, groups):
        for name in names:
            xs, ys = zip(*series[name])
            if time_axis:
                xs = [_dt.datetime.fromtimestamp(x, _dt.timezone.utc) for x in xs]
            (line,) = ax.plot(xs, ys, marker="." if len(ys) < 60 else None, label=name)
            base = baseline.get(name)
            if isinstance(base, _NUMBER) and not isinstance(base, bool):
                ax.axhline(float(base), color=line.get_color(), linestyle="--", linewidth=1,
                           label=f"{name} baseline {float(base):.3g}")
        ax.set_ylabel("metric" if len(groups) == 1 else ("score (0-1)" if _unit_metric(names[0]) else "error / loss"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncols=2)
    if not time_axis:
        from matplotlib.ticker import MaxNLocator

        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # windows are counted, not measured
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    fig.savefig(path, format="png")


def plot_prometheus_drift(status: dict, series: dict[str, list], path: Path) -> None:
    features = {f["name"]: f for f in status["drift"]["features"]}
    drifted = [f["name"] for f in status["drift"]["features"] if f["drifted"]]
    names = _top_names(series, drifted, TOP_IN_TIME_PLOTS)
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    colors = {}
    for name in names:
        ts, ys = zip(*series[name])
        (line,) = ax.plot([_dt.datetime.fromtimestamp(t, _dt.timezone.utc) for t in ts], ys, label=name)
        colors[name] = line.get_color()
    _thresholds(ax, names, {n: float(f["threshold"]) for n, f in features.items()}, colors)
    ax.set_title(f"{status['model']} {status['version']}: osprey_drift_score (Prometheus, top features)")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("drift score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png")


# ---------------------------------------------------------------- the page

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.drifted td { background: #fbe4e4; }
.badge { display: inline-block; padding: 0.15em 0.6em; border-radius: 0.8em; color: white; font-weight: bold; }
.bad { background: #c44e52; } .ok { background: #55a868; } .warn { background: #dd8452; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.muted { color: #777; }
"""


def _when(value: Any) -> str:
    if isinstance(value, _NUMBER) and not isinstance(value, bool):
        return _dt.datetime.fromtimestamp(float(value), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _fmt(value)


def _e(value: Any) -> str:
    return html.escape(_fmt(value))


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _badge(ok: bool, good: str, bad: str) -> str:
    return f'<span class="badge {"ok" if ok else "bad"}">{html.escape(good if ok else bad)}</span>'


def _render(status: dict, source: str, images: dict[str, Any], prom_url: str | None) -> str:
    drift, quality = status["drift"], status.get("quality")
    model, version = status["model"], status["version"]
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>Osprey monitoring: {html.escape(model)} {html.escape(version)}</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>{html.escape(model)} <span class=\"muted\">version {html.escape(version)}</span></h1>"]
    reference = status["reference"]
    if reference == "baseline":
        progress = status.get("baseline_progress") or {}
        reference_text = (f"baseline: the version's first requests "
                          f"({_e(progress.get('rows'))} of {_e(progress.get('needed'))} rows)")
    elif reference == "archive":
        reference_text = "archive: the profile shipped in the model archive (osprey-profile.json)"
    else:
        reference_text = "none: this version is not monitored" if reference is None else str(reference)
    rows = [("reference", html.escape(reference_text)),
            ("monitored requests", _e(status.get("requests"))),
            ("closed windows", _e(status.get("windows")))]
    if status.get("degraded"):
        rows.append(("monitoring degraded", f'<span class="badge warn">{_e(status["degraded"])}</span>'))
    out.append("<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>")

    # drift
    episode = drift.get("episode")
    out.append("<h2>Drift " + _badge(not drift["detected"], "no drift", "drift detected") + "</h2>")
    rows = [("score", f"{_e(drift['score'])} ({_e(drift.get('method'))})"),
            ("episodes so far", _e(drift.get("episodes")))]
    if episode:
        state = "open" if episode.get("open") else f"closed {_when(episode.get('ended'))}"
        rows.append(("episode", f"{_e(episode.get('id'))}: started {html.escape(_when(episode.get('started')))}, "
                                f"{html.escape(state)}"))
    else:
        rows.append(("episode", "none"))
    out.append("<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>")
    features = sorted(drift["features"], key=lambda f: (not f["drifted"], -(f["score"] or 0)))
    if features:
        out.append("<table><tr><th>feature</th><th>kind</th><th>method</th><th>score</th><th>threshold</th>"
                   "<th>drifted</th></tr>")
        for f in features:
            out.append(f"<tr class=\"{'drifted' if f['drifted'] else ''}\"><td>{_e(f['name'])}</td>"
                       f"<td>{_e(f.get('kind'))}</td><td>{_e(f.get('method'))}</td>"
                       f"<td class=\"num\">{_e(f['score'])}</td><td class=\"num\">{_e(f['threshold'])}</td>"
                       f"<td>{_e(f['drifted'])}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p class=\"muted\">No feature scored yet (no window closed, or the baseline is still being "
                   "collected).</p>")
    if images["features"]:
        out.append("<h3>" + ("Drifted features: reference vs current" if any(f["drifted"] for f in drift["features"])
                             else "No feature drifted; the highest scores: reference vs current") + "</h3>")
        out += [_img(name, f"distribution of {feature}") for feature, name in images["features"]]
    if images.get("drift_windows"):
        out.append("<h3>Drift over the recent windows</h3>" + _img(images["drift_windows"], "drift per window"))
    elif not status["history"]:
        out.append("<p class=\"muted\">No window closed yet: no drift history.</p>")

    # quality
    out.append("<h2>Live quality</h2>")
    if quality is None:
        out.append("<p class=\"muted\">No quality section (no labels sent to POST /feedback).</p>")
    else:
        out.append("<p>" + _badge(not quality["degraded"], "not degraded", "quality degraded") + "</p>")
        if quality.get("error"):
            out.append(f'<p><span class="badge warn">{_e(quality["error"])}</span></p>')
        rows = [("labels", _e(quality.get("labels"))), ("unmatched", _e(quality.get("unmatched"))),
                ("invalid", _e(quality.get("invalid")))]
        out.append("<table>" + "".join(f"<tr><th>{k}</th><td class=\"num\">{v}</td></tr>" for k, v in rows)
                   + "</table>")
        metrics = quality.get("metrics") or {}
        baseline = quality.get("baseline") or {}
        estimated = {k: v for k, v in (quality.get("estimated") or {}).items()  # from confidence, before labels
                     if isinstance(v, float) and k != "rows"}
        names = list(dict.fromkeys([*metrics, *baseline, *estimated]))
        if names:
            out.append("<table><tr><th>metric</th><th>live</th><th>baseline (held-out)</th><th>live − baseline</th>"
                       + ("<th>estimated (no labels)</th>" if estimated else "") + "</tr>")
            for name in names:
                live, base = metrics.get(name), baseline.get(name)
                delta = (float(live) - float(base) if isinstance(live, _NUMBER) and isinstance(base, _NUMBER)
                         else None)
                out.append(f"<tr><td>{_e(name)}</td><td class=\"num\">{_e(live)}</td><td class=\"num\">{_e(base)}</td>"
                           f"<td class=\"num\">{html.escape('' if delta is None else f'{delta:+.4g}')}</td>"
                           + (f"<td class=\"num\">{_e(estimated.get(name))}</td>" if estimated else "") + "</tr>")
            out.append("</table>")
        else:
            out.append("<p class=\"muted\">No metric yet (fewer labels than a quality window needs).</p>")
    if images.get("quality_windows"):
        out.append("<h3>Quality over the labelled windows</h3>" + _img(images["quality_windows"], "quality per window"))

    if prom_url:
        out.append(f"<h2>Over time <span class=\"muted\">(Prometheus at {html.escape(prom_url)})</span></h2>")
        for key, alt in (("drift_prometheus", "osprey_drift_score over time"),
                         ("quality_prometheus", "osprey_quality over time")):
            if images.get(key):
                out.append(_img(images[key], alt))
        if not images.get("drift_prometheus") and not images.get("quality_prometheus"):
            out.append("<p class=\"muted\">Prometheus holds no osprey_drift_score or osprey_quality sample for this "
                       "version in the period.</p>")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    out.append(f"<hr><p class=\"muted\">From {html.escape(source)}, {generated}. "
               f"<code>osprey monitor report</code></p></body></html>\n")
    return "\n".join(out)


def write_report(status: dict, out_dir: str | os.PathLike, source: str = "",
                 prometheus: dict[str, dict[str, list]] | None = None, prom_url: str | None = None) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; the path of ``index.html``."""
    check_status(status, source or "the caller")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in ("feature-*.png", "drift-*.png", "quality-*.png"):  # an earlier report's plots
            for old in out.glob(pattern):
                old.unlink()
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}", EXIT_ERROR) from None
    images: dict[str, Any] = {"features": []}
    try:
        features = sorted(status["drift"]["features"], key=lambda f: -(f["score"] or 0))
        plottable = [f for f in features if f["reference"] is not None]
        shown = [f for f in plottable if f["drifted"]] or plottable[:TOP_WHEN_NONE_DRIFTED]
        for i, feature in enumerate(shown):
            name = f"feature-{i:02d}-{_slug(feature['name'])}.png"
            plot_feature(feature, out / name)
            images["features"].append((feature["name"], name))
        if status["history"]:
            plot_drift_windows(status, out / "drift-windows.png")
            images["drift_windows"] = "drift-windows.png"
        baseline = (status.get("quality") or {}).get("baseline") or {}
        series: dict[str, list] = {}
        # the labelled windows (the quality part's own history); else what each drift window saw
        labelled = (status.get("quality") or {}).get("history") if isinstance(status.get("quality"), dict) else None
        for entry in (labelled if isinstance(labelled, list) and labelled else status["history"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("window"), _NUMBER):
                continue
            quality = _window_quality(entry if "quality" in entry else {"quality": entry})
            for name, value in quality.items():
                series.setdefault(name, []).append((entry["window"], value))
        if series:
            _plot_quality(series, baseline, out / "quality-windows.png",
                          f"{status['model']} {status['version']}: live quality per window (dashed: baseline)",
                          "window", time_axis=False)
            images["quality_windows"] = "quality-windows.png"
        if prometheus:
            if prometheus.get("drift"):
                plot_prometheus_drift(status, prometheus["drift"], out / "drift-prometheus.png")
                images["drift_prometheus"] = "drift-prometheus.png"
            if prometheus.get("quality"):
                _plot_quality(prometheus["quality"], baseline, out / "quality-prometheus.png",
                              f"{status['model']} {status['version']}: osprey_quality (Prometheus; dashed: baseline)",
                              "time (UTC)", time_axis=True)
                images["quality_prometheus"] = "quality-prometheus.png"
        index = out / "index.html"
        index.write_text(_render(status, source, images, prom_url), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc.strerror or exc}", EXIT_ERROR) from None
    return index


# ---------------------------------------------------------------- command line

def add_report_parser(sub) -> None:
    """``report`` under ``osprey monitor``."""
    p = sub.add_parser("report", help="write an HTML page with plots of a model's drift and live quality",
                       description="Fetch GET URL/monitoring/MODEL[/VERSION] and write DIR/index.html with PNG "
                                   "plots: reference vs current distribution of each drifted feature, drift "
                                   "scores and live quality over time.")
    p.add_argument("model", metavar="MODEL", help="the model's name")
    p.add_argument("--version", dest="model_version", metavar="V",
                   help="the model version (default: its default version)")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="the server's inference address (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write index.html and the PNGs to")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="the inference key (Authorization: Bearer)")
    auth.add_argument("--key-file", help=f"the server's key file; its inference key is sent (default: "
                                         f"./{DEFAULT_KEY_FILE} when it exists)")
    p.add_argument("--prometheus", metavar="URL", help="a Prometheus scraping the server: also plot "
                                                        "osprey_drift_score and osprey_quality over time")
    p.add_argument("--since", default="6h",
                   help="with --prometheus: how far back (e.g. 30m, 6h, 2d; default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds each HTTP request may take (default %(default)s)")


def run(args) -> int:
    """Make the report; one line on stderr and a non-zero status when it cannot be made."""
    import sys

    try:
        token = args.token
        if token is None and args.key_file:
            token = read_key_file(args.key_file)
        elif token is None and Path(DEFAULT_KEY_FILE).is_file():
            token = read_key_file(DEFAULT_KEY_FILE)
        try:
            since = parse_duration(args.since)
        except ValueError as exc:
            raise ReportError(f"--since: {exc}", EXIT_USAGE) from None
        status = fetch_status(args.url, args.model, args.model_version, token, timeout=args.timeout)
        prometheus = None
        if args.prometheus:
            prometheus = fetch_prometheus(args.prometheus, status["model"], status["version"], since,
                                          timeout=args.timeout)
        index = write_report(status, args.out, source=monitoring_url(args.url, args.model, args.model_version),
                             prometheus=prometheus, prom_url=_base(args.prometheus) if args.prometheus else None)
    except ReportError as exc:
        print(f"osprey monitor report: {exc}", file=sys.stderr)
        return exc.code
    print(index)
    return EXIT_OK
