"""The gate: a challenger replaces the champion only when it is better on fresh data and no
worse on the golden set, no slower and no much larger.

Both models run through their archive's handler in this process (the serving code path:
:mod:`server.retraining.serving`) on the same rows:

- the **holdout**: labelled production rows held back from training (never trained or
  searched on);
- the **golden set**: the champion's frozen ``reference.npz`` (inputs and targets), each input
  sent as a client sends it.

The metric (``gate.metric``; default ``accuracy`` for classifiers, ``mse`` for regression; also
``f1``, ``precision``, ``recall``, ``roc_auc``, ``log_loss``, ``mae``, ``r2``) is computed the way
live quality is (:mod:`monitoring.quality.metrics`, labels read as feedback is). An autoencoder
(the ``anomaly`` handler, task ``autoencoder``) is judged by ``reconstruction_error``: the mean
of the handler's per-example reconstruction error on the rows' inputs, lower is better; its
labels are not used (the quality monitor keeps none for autoencoders either). A model whose
answers hold nothing a label can be checked against (a conditional generator, task
``generator``) is judged by its archive's **scorer** (:mod:`server.retraining.scoring`): both
models' answers, as clients receive them, go to the champion's judge (digits_vae:
``judged_accuracy``, the share of samples a classifier trained on real digits recognises as
the asked class, higher is better); the metric is the scorer's, the mean of its per-row
values. A generator without a scorer is an error naming what to add. An embedding model (the
``text_embedding`` handler, task ``embedding``) is judged by ``centroid_accuracy``
(:mod:`server.retraining.centroids`): its labels are the inputs' classes (a text's topic), class
centroids come from the golden set embedded by the model under test, and a row is right when
its nearest centroid is its own class (golden rows: leave-one-out; no golden set: the scored
rows' own centroids, leave-one-out); higher is better. Changes are
absolute for scores in [0, 1] (accuracy 0.80 -> 0.82 is +0.02) and relative for errors
(mse 100 -> 90 is an improvement of 0.10), as quality tolerances are. The challenger passes
only if every check holds:

1. holdout: improvement >= ``min_improvement`` and, when ``min_improvement`` >= 0, the
   challenger better in at least ``confidence`` (default 0.9) of 400 bootstrap resamples of
   the holdout rows (paired: both models scored on the same resampled rows), so that a
   difference of a row or two on a small holdout is not taken for an improvement;
2. golden: regression (minus the improvement) <= ``max_regression``;
3. no holdout row the champion answers is refused by the challenger;
4. latency of one batch of 1 and of 32 requests (at least 7 runs and 0.25 s, the two models
   taking turns; the ratio is the median of the challenger's run to the champion's turn by
   turn, so load on the machine falls on both alike, and the times shown are each one's
   fastest; a size that fails is timed again and the lower ratio kept, so one burst of load
   does not reject a model):
   challenger <= ``max_latency_ratio`` x champion's, or at most :data:`LATENCY_SLACK_S` slower
   (timer noise on sub-millisecond models);
5. archive size (bytes of its files) <= ``max_size_ratio`` x champion's.

Each failed check is a reason naming its numbers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from monitoring.quality.metrics import HIGHER_IS_BETTER, classification_metrics, regression_metrics
from server.core.retraining_config import GateConfig

from .centroids import centroid_score
from .data import example_labels, golden_rows, request_body, resolve_labels
from .entry import reference_encoder
from .scoring import Scorer, load_scorer, missing_scorer, scorer_spec
from .serving import LoadedModel, Predictions, archive_size, predict_rows, score_answers, time_batches

__all__ = ["GateConfig", "GateResult", "gate_config", "evaluate", "score", "score_rows", "scorer_of", "improvement",
           "default_metric", "LATENCY_SLACK_S"]

log = logging.getLogger("osprey.retraining")

LATENCY_SLACK_S = 0.001


def _too_slow(a: float | None, b: float | None, max_ratio: float, ratio: float | None = None) -> bool:
    """Whether the challenger's ``b`` seconds break the latency check against the champion's
    ``a``; ``ratio``: the challenger's to the champion's measured turn by turn (else b / a)."""
    if a is None or b is None:
        return False
    if ratio is None:
        ratio = b / a if a > 0 else float("inf")
    return ratio > max_ratio and b - a > LATENCY_SLACK_S


CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("mse", "mae", "r2")
AUTOENCODER_METRICS = ("reconstruction_error",)  # lower is better (not in HIGHER_IS_BETTER)
EMBEDDING_METRICS = ("centroid_accuracy",)  # higher is better
ALL_METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS + AUTOENCODER_METRICS + EMBEDDING_METRICS
HIGHER = tuple(HIGHER_IS_BETTER) + EMBEDDING_METRICS  # the named metrics scored higher-is-better


def gate_config(cfg: Any = None) -> GateConfig:
    """A :class:`~server.core.retraining_config.GateConfig` from None, a dict, or any object
    with those attributes (``RetrainingConfig.gate``)."""
    if cfg is None:
        return GateConfig()
    if isinstance(cfg, GateConfig):
        return cfg
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
    if isinstance(cfg, dict):
        unknown = set(cfg) - set(GateConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"gate: unknown setting {sorted(unknown)[0]!r}; known: "
                             f"{', '.join(GateConfig.__dataclass_fields__)}")
    d = GateConfig()
    out = {}
    for name in ("min_improvement", "max_regression", "max_latency_ratio", "max_size_ratio", "confidence"):
        v = get(name, getattr(d, name))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"gate.{name} must be a number, got {v!r}")
        out[name] = float(v)
    metric = get("metric", None)
    if metric is not None and metric not in ALL_METRICS:
        raise ValueError(f"gate.metric {metric!r} is not one of {', '.join(ALL_METRICS)}")
    scorer = get("scorer", None)
    if scorer is not None and (not isinstance(scorer, str) or scorer.count(":") != 1):
        raise ValueError(f"gate.scorer must be 'module:function', got {scorer!r}")
    return GateConfig(metric=metric, scorer=scorer, **out)


@dataclass
class GateResult:
    passed: bool
    numbers: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_metric(task: str | None) -> str:
    if task == "autoencoder":
        return "reconstruction_error"
    if task == "embedding":
        return "centroid_accuracy"
    return "mse" if task == "regression" else "accuracy"


def allowed_metrics(task: str | None) -> tuple[str, ...]:
    if task == "autoencoder":
        return AUTOENCODER_METRICS
    if task == "embedding":
        return EMBEDDING_METRICS
    return REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS


def improvement(metric: str, champion: float, challenger: float, higher: bool | None = None) -> float:
    """How much better the challenger is: absolute for scores, relative for errors
    (``higher``: the metric's direction when it is a scorer's, else known by name)."""
    if higher if higher is not None else metric in HIGHER:
        return challenger - champion
    if champion > 0:
        return (champion - challenger) / champion
    return champion - challenger


RESAMPLES = 400


def better_share(p_champ: Predictions, p_chal: Predictions, rows: Sequence[dict], both: Sequence[int],
                 anchors: Sequence[int] | None, metric: str, higher: bool, resamples: int = RESAMPLES,
                 seed: int = 0) -> float:
    """The share of bootstrap resamples of the rows ``both`` (drawn with replacement, the same
    rows for both models) on which the challenger's ``metric`` beats the champion's. A
    resample where the metric cannot be computed (one class only, for roc_auc) counts as no.

    Classification and regression: each model's labels and outputs are resolved once, and each
    resample computes ``metric`` alone on the drawn rows (the values :func:`score` gives; all
    metrics per resample cost 20 ms, 16 s for one gate)."""
    if not both:
        return 0.0
    rng = np.random.default_rng(seed)
    pool = np.asarray(both)
    fast = (p_champ.scores is None and p_chal.scores is None
            and p_champ.task == p_chal.task and p_champ.task in ("classification", "regression"))
    if fast:
        ex_a = _examples(p_champ, rows, both)
        ex_b = _examples(p_chal, rows, both)
        position = {row: k for k, row in enumerate(both)}
    wins = 0
    for _ in range(resamples):
        idx = pool[rng.integers(0, len(pool), len(pool))].tolist()
        if fast:
            picks = [position[i] for i in idx]
            a = _metric_of(p_champ.task, metric, ex_a, picks)
            b = _metric_of(p_chal.task, metric, ex_b, picks)
        else:
            a, b = score(p_champ, rows, idx, anchors).get(metric), score(p_chal, rows, idx, anchors).get(metric)
        if a is not None and b is not None and improvement(metric, a, b, higher) > 0:
            wins += 1
    return wins / resamples


def _examples(pred: Predictions, rows: Sequence[dict], indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list]:
    """(labels, outputs, per index its examples' positions) of the rows ``indices``, resolved once."""
    ys, outs, where = [], [], []
    for i in indices:
        y, o = _labelled(pred, rows, i)
        where.append(list(range(len(ys), len(ys) + len(y))))
        ys += y
        outs += o
    return np.asarray(ys), (np.stack(outs) if outs else np.empty((0,))), where


def _metric_of(task: str, metric: str, examples: tuple[np.ndarray, np.ndarray, list], picks: Sequence[int]) -> Any:
    ys, outs, where = examples
    sel = [e for k in picks for e in where[k]]
    if not sel:
        return None
    if task == "regression":
        return regression_metrics(ys[sel].astype(np.float64), outs[sel], only=metric).get(metric)
    return classification_metrics(ys[sel].astype(np.int64), outs[sel], only=metric).get(metric)


def _labelled(pred: Predictions, rows: Sequence[dict], i: int) -> tuple[list, list]:
    """Row ``i``'s labels (resolved for the model's task and classes) and output rows, one per
    example of its request; ([], []) when the model did not answer it."""
    out = pred.outputs.get(i)
    if out is None:
        return [], []
    labels = example_labels(rows[i], i, len(out), unwrap_one=pred.task != "regression")
    width = out.shape[-1] if out.ndim > 1 else 1
    ys = resolve_labels([{"rid": rows[i].get("rid", i), "label": y} for y in labels], pred.task, pred.classes,
                        width=width)
    return list(ys), list(out)


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def score(pred: Predictions, rows: Sequence[dict], indices: Sequence[int],
          anchors: Sequence[int] | None = None) -> dict[str, Any]:
    """The metrics of ``pred`` on ``rows[i]`` for ``i`` in ``indices`` (rows it answered);
    ``anchors``: for an embedding model, the rows whose classes' centroids it is judged by."""
    ys, outs = [], []
    task = pred.task
    if pred.scores is not None:  # a scorer's value per row (generators): their mean
        value, n = pred.scores.mean([i for i in indices if i in pred.outputs])
        return {"rows": n, pred.scores.metric: value} if n else {"rows": 0}
    if task == "embedding":
        return centroid_score(pred.outputs, rows, indices, anchors)
    if task == "autoencoder":  # outputs: each example's reconstruction error; labels not used
        errs = [np.asarray(pred.outputs[i], dtype=np.float64).reshape(-1) for i in indices if i in pred.outputs]
        if not errs:
            return {"rows": 0}
        errs = np.concatenate(errs)
        return {"rows": len(errs), "reconstruction_error": round(float(errs.mean()), 8)}
    for i in indices:
        y, o = _labelled(pred, rows, i)
        ys += y
        outs += o
    if not ys:
        return {"rows": 0}
    outputs = np.stack(outs)
    if task == "regression":
        metrics = regression_metrics(np.asarray(ys, dtype=np.float64), outputs)
    elif task == "classification":
        metrics = classification_metrics(np.asarray(ys, dtype=np.int64), outputs)
    else:
        raise ValueError(f"the handler's task is {task!r}: only classification, regression, autoencoder "
                         "and embedding models (and models with a scorer) are gated")
    return {"rows": len(ys), **metrics}


def scorer_of(model: LoadedModel, cfg: Any = None) -> Scorer | None:
    """The archive's scorer (``gate.scorer``, else training.json ``"scorer"``), judging with the
    files of ``model`` (the champion's); None when it names none."""
    try:
        training = json.loads((model.model_dir / "training.json").read_text())
    except (OSError, ValueError):
        training = {}
    spec = scorer_spec(training, gate_config(cfg).scorer)
    return load_scorer(model.model_dir, spec) if spec else None


def score_rows(archive: str | Path, rows: Sequence[dict], gate_cfg: Any = None) -> dict[str, Any]:
    """One model's metrics on labelled rows, through its handler (``refused``: rows it refused);
    a model with a scorer: the scorer's metric (and ``higher_is_better``); an embedding model:
    centroids from its archive's golden set, as in :func:`evaluate`."""
    rows, anchors = list(rows), None
    n = len(rows)
    with LoadedModel(archive) as model:
        scorer = scorer_of(model, gate_cfg)
        if scorer is None:
            pred = predict_rows(model.archive, rows)
            missing_scorer(model.archive.name, pred.task)
            gold = _golden(model, None) if pred.task == "embedding" else []
            if gold:
                anchors = range(n, n + len(gold))
                pred.outputs.update({n + i: v for i, v in predict_rows(model.archive, gold).outputs.items()})
                rows = rows + gold
        else:
            pred = score_answers(model, rows, scorer)
    out = {**score(pred, rows, range(n), anchors), "refused": len(pred.errors), "task": pred.task}
    if pred.scores is not None:
        out.update(metric=pred.scores.metric, higher_is_better=pred.scores.higher_is_better)
    return out


def _golden(model: LoadedModel, golden: Any) -> list[dict]:
    if golden is None:
        try:
            training = json.loads((model.model_dir / "training.json").read_text())
        except (OSError, ValueError):
            training = {}
        return golden_rows(model.model_dir, reference_encoder(model.model_dir, training))
    return list(golden)


def evaluate(champion_dir: str | Path, challenger_dir: str | Path, holdout_rows: Sequence[dict],
             golden: Sequence[dict] | None = None, gate_cfg: Any = None, *, repeats: int = 7,
             log: Callable[[str], Any] | None = None) -> GateResult:
    """Judge the challenger against the champion (archive folders or files).

    ``golden``: labelled rows; None for the champion's ``reference.npz`` (inputs sent as its
    training module's ``reference_request`` makes them, targets as labels); [] for none."""
    cfg = gate_config(gate_cfg)
    say = log or (lambda msg: None)
    reasons: list[str] = []
    holdout = list(holdout_rows)
    champ, chal = LoadedModel(champion_dir), None
    try:
        chal = LoadedModel(challenger_dir)
        gold = _golden(champ, golden)
        rows = holdout + gold
        n_hold = len(holdout)
        say(f"gate: scoring champion and challenger on {n_hold} held-out rows and {len(gold)} golden rows")
        scorer = scorer_of(champ, cfg)  # the champion's judge scores both
        if scorer is None:
            p_champ = predict_rows(champ.archive, rows)
            p_chal = predict_rows(chal.archive, rows)
        else:
            say(f"gate: judging both models' answers with {scorer.spec}")
            p_champ, p_chal = score_answers(champ, rows, scorer), score_answers(chal, rows, scorer)
        task = p_champ.task or p_chal.task
        missing_scorer(champ.archive.name, None if scorer is not None else task)
        if scorer is not None:
            metric, higher = p_champ.scores.metric, p_champ.scores.higher_is_better
            if cfg.metric is not None and cfg.metric != metric:
                raise ValueError(f"gate.metric {cfg.metric!r} does not fit: {scorer.spec} scores {metric}")
        else:
            metric = cfg.metric or default_metric(task)
            higher = metric in HIGHER
            allowed = allowed_metrics(task)
            if metric not in allowed:
                raise ValueError(f"gate.metric {metric!r} does not fit a {task} model (use {', '.join(allowed)})")
        numbers: dict[str, Any] = {"metric": metric, "task": task, "direction": "higher" if higher else "lower",
                                   "config": asdict(cfg)}
        if scorer is not None:
            numbers["scorer"] = scorer.spec

        # an embedding model's class centroids: the golden rows both models answered
        anchors = [i for i in range(n_hold, len(rows)) if i in p_champ.outputs and i in p_chal.outputs] or None

        def part(name: str, idx: range) -> dict[str, Any]:
            both = [i for i in idx if i in p_champ.outputs and i in p_chal.outputs]
            s_champ, s_chal = score(p_champ, rows, both, anchors), score(p_chal, rows, both, anchors)
            out = {"rows": len(idx), "scored": len(both), "champion": s_champ, "challenger": s_chal,
                   "refused": {"champion": sum(i in p_champ.errors for i in idx),
                               "challenger": sum(i in p_chal.errors for i in idx)}}
            a, b = s_champ.get(metric), s_chal.get(metric)
            out["change"] = None if a is None or b is None else round(improvement(metric, a, b, higher), 6)
            newly = [i for i in idx if i in p_chal.errors and i not in p_champ.errors]
            if newly:
                i = newly[0]
                reasons.append(f"{name}: the challenger refused {len(newly)} row(s) the champion answers "
                               f"(row {rows[i].get('rid', i)}: {p_chal.errors[i]})")
            return out

        # 1. fresh data
        if not holdout:
            reasons.append("holdout: no held-out labelled rows to compare the models on")
            numbers["holdout"] = {"rows": 0}
        else:
            hold = part("holdout", range(n_hold))
            numbers["holdout"] = hold
            if hold["change"] is None:
                reasons.append(f"holdout: {metric} could not be computed on {hold['scored']} rows")
            elif hold["change"] < cfg.min_improvement:
                reasons.append(f"holdout: {metric} {_f(hold['champion'][metric])} -> {_f(hold['challenger'][metric])} "
                               f"(change {hold['change']:+.4f}) does not improve by at least {cfg.min_improvement}")
            elif cfg.min_improvement >= 0 and cfg.confidence > 0:
                both = [i for i in range(n_hold) if i in p_champ.outputs and i in p_chal.outputs]
                share = better_share(p_champ, p_chal, rows, both, anchors, metric, higher)
                hold["better_in_resamples"] = round(share, 4)
                if share < cfg.confidence:
                    reasons.append(f"holdout: {metric} {_f(hold['champion'][metric])} -> "
                                   f"{_f(hold['challenger'][metric])} is better in only {share:.0%} of "
                                   f"{RESAMPLES} bootstrap resamples of the {len(both)} held-out rows (at least "
                                   f"{cfg.confidence:.0%} required): more labelled rows, or a lower gate.confidence")
        # 2. golden set
        if gold:
            g = part("golden", range(n_hold, len(rows)))
            numbers["golden"] = g
            if g["change"] is None:
                reasons.append(f"golden: {metric} could not be computed on {g['scored']} rows")
            elif -g["change"] > cfg.max_regression:
                reasons.append(f"golden: {metric} {_f(g['champion'][metric])} -> {_f(g['challenger'][metric])} "
                               f"regresses by {-g['change']:.4f} (at most {cfg.max_regression} allowed)")
        else:
            numbers["golden"] = {"rows": 0, "note": "no golden set (reference.npz without inputs and targets)"}
        # 3. latency
        bodies = [request_body(r, i) for i, r in enumerate(rows[:64]) if i in p_champ.outputs]
        say(f"gate: timing batches of 1 and 32 (at least {repeats} runs each)")
        (t_champ, t_chal), (_, ratios) = time_batches([champ, chal], bodies, (1, 32), repeats)
        slow = [n for n in (1, 32) if _too_slow(t_champ.get(n), t_chal.get(n), cfg.max_latency_ratio, ratios.get(n))]
        if slow:  # a rejection is confirmed by a second, later timing: the fastest runs and lower ratio of both
            say(f"gate: timing batches of {', '.join(map(str, slow))} again to confirm the challenger is slower")
            (again_champ, again_chal), (_, again) = time_batches([champ, chal], bodies, slow, repeats)
            for n in slow:
                t_champ[n] = min(t_champ[n], again_champ[n])
                t_chal[n] = min(t_chal[n], again_chal[n])
                ratios[n] = min(ratios[n], again[n])
        lat = {}
        for size in (1, 32):
            a, b, ratio = t_champ.get(size), t_chal.get(size), ratios.get(size)
            if a is None or b is None or ratio is None:
                continue
            lat[str(size)] = {"champion_s": round(a, 6), "challenger_s": round(b, 6), "ratio": round(ratio, 3)}
            if _too_slow(a, b, cfg.max_latency_ratio, ratio):
                reasons.append(f"latency: a batch of {size} takes {b * 1000:.2f} ms, {ratio:.2f}x the champion's "
                               f"{a * 1000:.2f} ms (at most {cfg.max_latency_ratio}x allowed)")
        numbers["latency"] = lat
        # 4. size
        s_a, s_b = archive_size(champ.model_dir), archive_size(chal.model_dir)
        ratio = s_b / s_a if s_a else float("inf")
        numbers["size_bytes"] = {"champion": s_a, "challenger": s_b, "ratio": round(ratio, 3)}
        if ratio > cfg.max_size_ratio:
            reasons.append(f"size: the challenger's archive is {s_b} bytes, {ratio:.2f}x the champion's {s_a} "
                           f"(at most {cfg.max_size_ratio}x allowed)")
        result = GateResult(not reasons, numbers, reasons)
        say("gate: passed" if result.passed else "gate: rejected: " + "; ".join(reasons))
        return result
    finally:
        champ.close()
        if chal is not None:
            chal.close()
