'''The training contract: an archive's entry point ``retrain(ctx) -> {"weights": path, ...}``.

How a model retrains
--------------------
An archive names its training entry point, ``"module:function"``, in ``training.json``
(``"entry_point"``) or in model-config.yaml (``retraining: entry_point:``, which wins). The
module is looked for first in the archive's own folder (a ``train.py`` shipped beside the
handler), then among installed packages (``examples.digits_cnn``). Osprey calls it with one
argument, a :class:`TrainContext`::

    ctx.archive_dir      Path   the champion's extracted archive (handler, weights, features.json, ...)
    ctx.manifest         dict   its MAR-INF/MANIFEST.json
    ctx.config           ModelConfig  its parsed model-config.yaml (``ctx.config.raw``: the YAML)
    ctx.training         dict   its training.json
    ctx.reference        dict[str, ndarray]  its reference.npz: ``inputs`` (as clients send
                                them), ``outputs`` (the champion's), ``targets``
    ctx.rows             list[dict]  labelled production rows to train on
                                ``{"rid", "ts", "inputs", "label"}`` (the gate's holdout and the
                                validation split are NOT in it)
    ctx.validation       list[dict]  the validation split (for early stopping / the search;
                                never the gate's holdout)
    ctx.out_dir          Path   where to write the new weights (empty, yours)
    ctx.hyperparameters  dict   retraining.hyperparameters, with this search trial's draw on top
    ctx.seed             int
    ctx.progress(fraction, message="")   report 0..1 (a trial's share of the job)
    ctx.log(message)                     a line in the job's log (``ctx.logger``: a logging.Logger)
    ctx.preprocess(rows) -> Tensor       the archive's own handler preprocessing of the rows'
                                         inputs (the serving code path): the model input tensor
    ctx.labels(rows) -> list             the rows' labels as the model's targets: class
                                         indices (by name or index) or numbers; for an
                                         embedding model, the input's class as text
    ctx.dataset(rows) -> (x, y)          both, aligned: x the model input tensor, y int64
                                         class indices or float32 values
    ctx.task, ctx.classes                "classification" / "regression", class names

It returns where the new weights are, in a format the archive's handler loads (the same
kind as the champion's ``serializedFile``: TorchScript, a state_dict for the archive's model
file, a ``torch.export`` .pt2, ONNX), as a dict (or a :class:`TrainResult`)::

    {"weights": ctx.out_dir / "model.pt",       # required
     "config": {"batchSize": 32},               # optional: model-config.yaml overrides
     "metrics": {"accuracy": 0.93},             # optional: its own validation numbers
     "reference": {"inputs": x, "targets": y, "outputs": p},   # optional: the training data
                                                # used, as clients send it: the new version's
                                                # reference.npz and drift reference
     "files": {"encoder.pt": ctx.out_dir / "encoder.pt"}}    # optional: other files of the
                                                # new version's archive (a plain file name ->
                                                # the file), replacing the champion's: e.g. the
                                                # part of a model that is trained but not served

An example (``examples/digits_cnn.py``)::

    def retrain(ctx):
        x_ref = torch.from_numpy(ctx.reference["inputs"][:, None] / 16.0).float()
        y_ref = torch.from_numpy(ctx.reference["targets"]).long()
        x_new, y_new = ctx.dataset(ctx.rows)              # the handler's view of the rows
        model = fit(DigitsCNN(), (torch.cat([x_ref, x_new]),), torch.cat([y_ref, y_new]), ...)
        path = ctx.out_dir / "digits_cnn.pt"
        torch.jit.script(model).save(str(path))
        return {"weights": path}

Osprey then loads the weights through the archive's handler (a model that cannot load fails
the job, naming why), scores them on ``ctx.validation`` and, with a search, keeps the best trial.
A model whose answers hold no prediction (a generator) is scored by its archive's scorer
(:mod:`server.retraining.scoring`); one that names none fails the job before training.
An entry point that raises fails the job with its traceback; one that returns nothing or no
weights file fails it saying so.
'''

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from server.core.model_config import ModelConfig

from .data import RowError, example_labels, read_reference, resolve_labels, split_rows
from .entry import EntryPointError, TrainingError, entry_point_of, resolve_entry_point
from .scoring import missing_scorer, scorer_spec
from .search import draws

__all__ = ["TrainContext", "TrainResult", "TrainingError", "EntryPointError", "run_training"]

logger = logging.getLogger("osprey.retraining")

VALIDATION_SHARE = 0.2
MIN_VALIDATION_ROWS = 10  # fewer rows than this: no validation split (all rows train)


@dataclass
class TrainContext:
    """What a training entry point gets (see the module docstring)."""

    archive_dir: Path
    manifest: dict
    config: ModelConfig
    training: dict
    reference: dict[str, np.ndarray]
    rows: list[dict]
    validation: list[dict]
    out_dir: Path
    hyperparameters: dict = field(default_factory=dict)
    seed: int = 0
    trial: int | None = None
    _progress: Callable[[float, str], Any] | None = field(default=None, repr=False)
    _log: Callable[[str], Any] | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)

    @property
    def logger(self) -> logging.Logger:
        return logger

    def progress(self, fraction: float, message: str = "") -> None:
        if self._progress is not None:
            self._progress(min(1.0, max(0.0, float(fraction))), message)

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(str(message))
        else:
            logger.info("%s", message)

    @property
    def model(self):
        """The champion loaded through its handler (:class:`~server.retraining.serving.LoadedModel`)."""
        if self._model is None:
            from .serving import LoadedModel

            self._model = LoadedModel(self.archive_dir)
        return self._model

    @property
    def task(self) -> str | None:
        return self.model.task

    @property
    def classes(self) -> list[str] | None:
        return self.model.classes

    def preprocess(self, rows: Sequence[dict]) -> Any:
        """The handler's preprocessing of ``rows``' inputs: the model input tensor."""
        return self.model.preprocess(list(rows))

    def labels(self, rows: Sequence[dict]) -> list:
        return resolve_labels(list(rows), self.task, self.classes)

    def dataset(self, rows: Sequence[dict]) -> tuple[Any, Any]:
        """(x, y): the model input tensor and the labels as a tensor (int64 class indices or
        float32 values), one per example (a row whose request held k examples has k labels)."""
        import torch

        rows = list(rows)
        x = self.preprocess(rows)
        if len(x) == len(rows):  # one example a row: a list of one label is that label (not for a regression)
            unwrap = self.task != "regression"
            labels = self.labels([dict(r, label=example_labels(r, i, 1, unwrap_one=unwrap)[0])
                                  for i, r in enumerate(rows)])
        else:
            expanded = []
            for r in rows:  # several examples per request: the label is a list of k
                lab = r.get("label")
                expanded += [dict(r, label=v) for v in lab] if isinstance(lab, list) else [r]
            labels = self.labels(expanded)
            if len(labels) != len(x):
                raise RowError(f"{len(rows)} rows gave {len(x)} examples but {len(labels)} labels")
        if self.task == "regression":
            y = torch.tensor(labels, dtype=torch.float32)
        else:
            y = torch.tensor(labels, dtype=torch.int64)
        return x, y

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None


@dataclass
class TrainResult:
    """The new weights and what is known about them."""

    weights: Path
    config: dict | None = None
    metrics: dict = field(default_factory=dict)  # the entry point's own numbers
    reference: dict | None = None  # arrays for the new reference.npz (inputs, targets, outputs)
    files: dict = field(default_factory=dict)  # other archive files: name -> path (replacing the champion's)
    validation: dict = field(default_factory=dict)  # scored by Osprey through the handler on ctx.validation
    hyperparameters: dict = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)
    entry_point: str = ""
    rows: int = 0
    validation_rows: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = str(self.weights)
        d["reference"] = None if self.reference is None else {k: list(np.shape(v)) for k, v in self.reference.items()}
        d["files"] = {k: str(v) for k, v in self.files.items()}
        return d


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _result(spec: str, value: Any) -> TrainResult:
    """The entry point's return value, checked."""
    if value is None:
        raise TrainingError(f"training entry point {spec} returned nothing: it must return a dict with \"weights\" "
                            "(the path of the new serialized model) or a TrainResult")
    if isinstance(value, TrainResult):
        res = value
    elif isinstance(value, (str, os.PathLike)):
        res = TrainResult(weights=Path(value))
    elif isinstance(value, Mapping):
        if "weights" not in value:
            raise TrainingError(f"training entry point {spec} returned a dict without \"weights\" "
                                f"(keys: {', '.join(map(str, value)) or 'none'}); \"weights\" is the path of the "
                                "new serialized model")
        unknown = set(value) - {"weights", "config", "metrics", "reference", "files"}
        if unknown:
            raise TrainingError(f"training entry point {spec} returned unknown key {sorted(unknown)[0]!r}: "
                                "known: weights, config, metrics, reference, files")
        res = TrainResult(weights=value["weights"], config=value.get("config"), metrics=dict(value.get("metrics") or {}),
                          reference=value.get("reference"), files=_files(spec, value.get("files")))
    else:
        raise TrainingError(f"training entry point {spec} returned a {type(value).__name__}: it must return a dict "
                            "with \"weights\" (the path of the new serialized model) or a TrainResult")
    if not isinstance(res.weights, (str, os.PathLike)):
        raise TrainingError(f"training entry point {spec}: \"weights\" must be a path, got {type(res.weights).__name__}")
    res.weights = Path(res.weights)
    if not res.weights.is_file():
        raise TrainingError(f"training entry point {spec}: its weights file {res.weights} does not exist")
    if res.weights.stat().st_size == 0:
        raise TrainingError(f"training entry point {spec}: its weights file {res.weights} is empty")
    if res.config is not None and not isinstance(res.config, Mapping):
        raise TrainingError(f"training entry point {spec}: \"config\" must be a dict of model-config.yaml settings")
    if res.reference is not None:
        if not isinstance(res.reference, Mapping) or "inputs" not in res.reference:
            raise TrainingError(f"training entry point {spec}: \"reference\" must be a dict of arrays with \"inputs\"")
        res.reference = {k: np.asarray(v) for k, v in res.reference.items() if v is not None}
    return res


def _files(spec: str, files: Any) -> dict[str, Path]:
    """The entry point's other archive files, checked: plain names -> existing files."""
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise TrainingError(f"training entry point {spec}: \"files\" must map file names to paths, "
                            f"got a {type(files).__name__}")
    out = {}
    for name, path in files.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise TrainingError(f"training entry point {spec}: \"files\" key {name!r} must be a plain file name")
        if name in ("MAR-INF", "MANIFEST.json"):
            raise TrainingError(f"training entry point {spec}: \"files\" cannot replace {name}")
        if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
            raise TrainingError(f"training entry point {spec}: \"files\" {name!r}: {path} is not a file")
        out[name] = Path(path)
    return out


def _call(fn: Callable, spec: str, ctx: TrainContext) -> TrainResult:
    try:
        value = fn(ctx)
    except Exception as exc:
        tb = traceback.format_exc()
        for line in tb.rstrip().splitlines():
            ctx.log(line)
        raise TrainingError(f"training entry point {spec} raised {type(exc).__name__}: {exc}", tb) from exc
    return _result(spec, value)


def _check_and_score(archive_dir: Path, res: TrainResult, validation: list[dict], work: Path, spec: str,
                     gate_cfg: Any = None) -> dict:
    """Load the new weights through the archive's handler (a model that cannot load is an
    error naming why) and score them on the validation rows ({} without any)."""
    from .gate import score_rows
    from .package import PackageError, stage
    from .serving import LoadedModel

    folder = Path(tempfile.mkdtemp(prefix="stage-", dir=work))
    try:
        try:
            stage(archive_dir, res.weights, folder, config_overrides=res.config, files=res.files)
        except PackageError as exc:
            raise TrainingError(f"training entry point {spec}: {exc}") from None
        try:
            with LoadedModel(folder) as m:
                m.runner  # loads the handler and the weights
        except Exception as exc:
            raise TrainingError(f"training entry point {spec}: the archive's handler cannot load the new weights "
                                f"{res.weights.name}: {type(exc).__name__}: {exc}") from None
        if not validation:
            return {}
        return score_rows(folder, validation, gate_cfg)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_training(archive_dir: str | os.PathLike, rows: Sequence[dict], out_dir: str | os.PathLike, *,
                 config: Any = None, entry_point: str | None = None, hyperparameters: Mapping | None = None,
                 search: Any = None, metric: str | None = None, validation_share: float = VALIDATION_SHARE,
                 seed: int = 0, progress: Callable[[float, str], Any] | None = None,
                 log: Callable[[str], Any] | logging.Logger | None = None) -> TrainResult:
    """Run the archive's training entry point on labelled ``rows`` (the gate's holdout already
    removed); returns the kept :class:`TrainResult` (its weights under ``out_dir``).

    ``config``: the retraining section (the lead's ``RetrainingConfig`` or a dict with
    ``entry_point``, ``hyperparameters``, ``search``, ``gate.metric``); the keyword arguments
    win over it. ``rows`` are split (seeded) into training rows and a validation split of
    ``validation_share`` (none under :data:`MIN_VALIDATION_ROWS` rows). With a search
    (``trials`` > 0), each draw is trained into ``out_dir/trial-<n>`` and scored through the
    handler on the validation split by ``metric`` (default: accuracy / mse); the best is kept.
    Raises :class:`TrainingError` (naming the entry point, with its traceback when it raised)."""
    from server.core.archive import open_archive
    from server.core.errors import OspreyError
    from server.core.model_config import parse_model_config

    from .gate import default_metric, improvement

    t0 = time.monotonic()
    say = log.info if isinstance(log, logging.Logger) else (log or (lambda m: logger.info("%s", m)))
    report = progress or (lambda f, m="": None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        opened = open_archive(archive_dir)
    except OspreyError as exc:
        raise TrainingError(f"archive {archive_dir}: {exc.message}") from None
    try:
        adir = Path(opened.model_dir)
        try:
            training = json.loads((adir / "training.json").read_text()) if (adir / "training.json").is_file() else {}
        except ValueError as exc:
            raise TrainingError(f"archive {archive_dir}: training.json is not valid JSON ({exc})") from None
        spec = entry_point_of(training, entry_point or _get(config, "entry_point"))
        try:
            fn = resolve_entry_point(adir, spec)
        except TrainingError:
            raise
        except Exception as exc:  # the module exists but importing it failed
            tb = traceback.format_exc()
            for line in tb.rstrip().splitlines():
                say(line)
            raise TrainingError(f"training entry point {spec}: importing it raised {type(exc).__name__}: {exc}", tb) from exc
        try:
            model_config = parse_model_config(opened.config)
        except OspreyError as exc:
            raise TrainingError(f"archive {archive_dir}: model-config.yaml: {exc.message}") from None
        base_hp = dict(_get(config, "hyperparameters", None) or {})
        base_hp.update(hyperparameters or {})
        try:
            trial_hps = draws(search if search is not None else _get(config, "search"))
        except ValueError as exc:
            raise TrainingError(f"retraining.{exc}") from None
        metric = metric or _get(_get(config, "gate"), "metric")
        rows = list(rows)
        share = validation_share if len(rows) >= MIN_VALIDATION_ROWS else 0.0
        train_rows, val_rows = split_rows(rows, share, seed)
        reference = read_reference(adir)
        say(f"training {opened.name} {opened.version} with {spec}: {len(train_rows)} rows, "
            f"{len(val_rows)} validation rows, {len(reference.get('inputs', ()))} reference rows"
            + (f", {len(trial_hps)} search trials" if trial_hps else ""))
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
        runs = trial_hps or [{}]
        results: list[tuple[TrainResult, dict]] = []
        ctx_model = None
        gate_cfg = _get(config, "gate")
        try:
            if scorer_spec(training, _get(gate_cfg, "scorer")) is None:
                # a model only a scorer can judge (a generator) and none named: say so before training
                from .serving import LoadedModel

                ctx_model = LoadedModel(adir)
                missing_scorer(opened.name, ctx_model.task)
            for n, hp in enumerate(runs):
                trial_dir = out / f"trial-{n}" if trial_hps else out
                trial_dir.mkdir(parents=True, exist_ok=True)
                lo, hi = n / len(runs), (n + 1) / len(runs)

                def part(f: float, m: str = "", lo=lo, hi=hi, n=n) -> None:
                    prefix = f"trial {n + 1}/{len(runs)}: " if trial_hps else ""
                    report(lo + (hi - lo) * 0.9 * min(1.0, max(0.0, f)), prefix + m)

                ctx = TrainContext(archive_dir=adir, manifest=opened.manifest, config=model_config, training=training,
                                   reference=reference, rows=train_rows, validation=val_rows, out_dir=trial_dir,
                                   hyperparameters={**base_hp, **hp}, seed=seed, trial=n if trial_hps else None,
                                   _progress=part, _log=say, _model=ctx_model)
                try:
                    res = _call(fn, spec, ctx)
                finally:
                    ctx_model = ctx._model  # the loaded champion is shared by the trials
                res.validation = _check_and_score(adir, res, val_rows, work, spec, gate_cfg)
                res.hyperparameters = {**base_hp, **hp}
                results.append((res, hp))
                task = res.validation.get("task")
                m = metric or res.validation.get("metric") or default_metric(task)  # a scorer's, or by task
                value = res.validation.get(m, res.metrics.get(m))
                shown = f"{m}={value:.4f}" if isinstance(value, (int, float)) else "no validation score"
                say(f"{'trial ' + str(n + 1) + '/' + str(len(runs)) + ' ' + str(hp) + ': ' if trial_hps else ''}{shown}")
                report(hi, (f"trial {n + 1}/{len(runs)}: " if trial_hps else "trained: ") + shown)
        finally:
            if ctx_model is not None:
                ctx_model.close()
            shutil.rmtree(work, ignore_errors=True)
        best = 0
        if len(results) > 1:
            task = next((r.validation.get("task") for r, _ in results if r.validation.get("task")), None)
            scored = next((r.validation for r, _ in results if r.validation.get("metric")), {})
            m = metric or scored.get("metric") or default_metric(task)
            higher = scored.get("higher_is_better") if m == scored.get("metric") else None
            values = [r.validation.get(m, r.metrics.get(m)) for r, _ in results]
            if all(v is None for v in values):
                raise TrainingError(f"search: no trial has a validation {m} (no validation rows, and the entry "
                                    f"point reports no \"{m}\" in its metrics)")
            for i, v in enumerate(values):
                if v is not None and (values[best] is None or improvement(m, values[best], v, higher) > 0):
                    best = i
            say(f"search: kept trial {best + 1} {results[best][1]} ({m}={values[best]:.4f})")
        kept = results[best][0]
        kept.trials = [{"trial": i + 1, "hyperparameters": hp, "validation": r.validation, "metrics": r.metrics}
                       for i, (r, hp) in enumerate(results)] if trial_hps else []
        kept.entry_point, kept.rows, kept.validation_rows = spec, len(train_rows), len(val_rows)
        kept.seconds = round(time.monotonic() - t0, 3)
        return kept
    finally:
        opened.cleanup()
