"""Scorers: how the gate judges a model whose answers hold nothing a label can be checked
against (a generator's images), with a judge the archive ships.

A conditional generator is asked ``{"seed": 7, "class": 3}`` and answers a picture: no
prediction to compare with a label. What matters is whether the picture shows the asked
class, and champion and challenger must be judged the same way on the same requests. So such
an archive names a **scorer**, ``"module:function"``, in ``training.json`` (``"scorer"``) or
in model-config.yaml (``retraining: gate: scorer:``, which wins); the module is looked for as
a training entry point's is (the archive's folder first, then installed packages). The gate
(and the validation of a retraining's trials) calls it once per model with the rows and
that model's answers to them::

    scores = scorer(rows, answers, judge_dir)

    rows       list[dict]  the rows ({"rid", "inputs", "label"}: the gate's holdout, the golden
               set, or the validation split)
    answers    list[InferenceResponse | None]  what the model answered each row, as a client
               receives it (``.body`` bytes, ``.content_type``, ``.headers``); None where the
               model refused the row
    judge_dir  Path  the CHAMPION's extracted archive (its judge's files, e.g. judge.npz): the
               same judge scores champion and challenger (a challenger cannot bring a kinder one)

and returns ``{"metric": "judged_accuracy", "values": [...], "higher_is_better": True}`` (or a
:class:`Scores`): one number per row (None: that row could not be scored). A model's metric
on a set of rows is the mean of their values. ``examples.digits_vae:judge`` is one: a
logistic regression trained on real digits (``judge.npz``) reads each answered PNG, and a
row's value is the share of its samples recognised as the class asked for.

A model whose handler's task is ``generator`` and that names no scorer cannot be gated: the
job fails before training, saying what to add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .entry import EntryPointError, TrainingError, resolve_entry_point

__all__ = ["Scores", "Scorer", "ScorerError", "NEEDS_SCORER", "scorer_spec", "load_scorer", "missing_scorer"]

#: handler tasks whose answers only a scorer can judge
NEEDS_SCORER = ("generator",)


class ScorerError(TrainingError):
    """No usable scorer: the message names the model, what is missing and how to add it."""


@dataclass
class Scores:
    metric: str
    values: list[float | None]
    higher_is_better: bool = True

    def mean(self, indices: Sequence[int]) -> tuple[float | None, int]:
        """(mean of the values at ``indices`` that were scored, how many were)."""
        got = [self.values[i] for i in indices if self.values[i] is not None]
        return (round(math.fsum(got) / len(got), 6) if got else None), len(got)


@dataclass
class Scorer:
    spec: str
    fn: Callable[..., Any] = field(repr=False)
    judge_dir: Path

    def __call__(self, rows: Sequence[dict], answers: Sequence[Any]) -> Scores:
        rows, answers = list(rows), list(answers)
        try:
            out = self.fn(rows, answers, self.judge_dir)
        except Exception as exc:
            raise ScorerError(f"scorer {self.spec} raised {type(exc).__name__}: {exc}") from exc
        return _checked(self.spec, out, len(rows))


def _checked(spec: str, out: Any, n: int) -> Scores:
    if isinstance(out, dict):
        unknown = set(out) - {"metric", "values", "higher_is_better"}
        if unknown or "metric" not in out or "values" not in out:
            raise ScorerError(f"scorer {spec} must return {{\"metric\": name, \"values\": [one per row], "
                              f"\"higher_is_better\": bool}}, got keys {sorted(map(str, out))}")
        out = Scores(str(out["metric"]), list(out["values"]), bool(out.get("higher_is_better", True)))
    if not isinstance(out, Scores):
        raise ScorerError(f"scorer {spec} returned a {type(out).__name__}, not a dict of metric and values")
    if not out.metric or not isinstance(out.metric, str):
        raise ScorerError(f"scorer {spec}: \"metric\" must be a non-empty name")
    if len(out.values) != n:
        raise ScorerError(f"scorer {spec} returned {len(out.values)} values for {n} rows")
    values: list[float | None] = []
    for i, v in enumerate(out.values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ScorerError(f"scorer {spec}: value {i} is {v!r}, not a finite number or None")
        values.append(None if v is None else float(v))
    out.values = values
    return out


def scorer_spec(training: dict | None, configured: str | None = None) -> str | None:
    """The scorer to use: ``retraining.gate.scorer``, else training.json ``"scorer"``, else None."""
    spec = configured or (training or {}).get("scorer")
    return str(spec) if spec else None


def load_scorer(judge_dir: str | Path, spec: str) -> Scorer:
    """The scorer ``spec`` names, judging with the files in ``judge_dir``."""
    try:
        fn = resolve_entry_point(judge_dir, spec)
    except EntryPointError as exc:
        raise ScorerError(exc.message.replace("training entry point", "scorer")) from None
    return Scorer(spec, fn, Path(judge_dir))


def missing_scorer(model: str, task: str | None) -> None:
    """:class:`ScorerError` naming what is missing when a model of ``task`` has no scorer but
    needs one (a generator); nothing otherwise."""
    if task in NEEDS_SCORER:
        raise ScorerError(
            f"{model} is a {task} (its answers hold no prediction to compare a label with): the gate needs a "
            "scorer to judge its outputs, and the archive names none. Add \"scorer\": \"module:function\" to its "
            "training.json (or retraining.gate.scorer in model-config.yaml): a function (rows, answers, "
            "judge_dir) -> {\"metric\", \"values\", \"higher_is_better\"}, e.g. examples.digits_vae:judge with "
            "the judge.npz it reads in the archive")
