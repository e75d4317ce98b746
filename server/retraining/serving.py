"""An archive's handler run in this process, the serving code path: preprocess labelled rows
into model tensors, predict rows (outputs as the quality monitor joins them), time batches.

Everything goes through :func:`server.instances.runner.load_runner` (the code an instance
runs) and :func:`server.instances.capture.run_reference` (what ``osprey profile`` runs),
never around them, so a challenger is judged on exactly what serving would answer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from server.core.archive import ModelArchive, open_archive
from server.core.errors import OspreyError
from server.core.model_config import ModelConfig, parse_model_config

from .data import RowError, handler_row, request_body

__all__ = ["LoadedModel", "Predictions", "predict_rows", "score_answers", "archive_size", "time_batches",
           "request_for"]


def _open(path: str | Path) -> ModelArchive:
    try:
        return open_archive(path)
    except OspreyError as exc:
        raise ValueError(f"{path}: {exc.message}") from None


def archive_size(path: str | Path) -> int:
    """Bytes of an archive file, or of every file under an archive folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class LoadedModel:
    """An archive (folder or file) with its handler loaded in this thread, monitoring off."""

    def __init__(self, archive: str | Path):
        self.archive = _open(archive)
        try:
            self.config: ModelConfig = parse_model_config(self.archive.config)
        except OspreyError as exc:
            self.archive.cleanup()
            raise ValueError(f"{archive}: model-config.yaml: {exc.message}") from None
        self._runner = None

    @property
    def model_dir(self) -> Path:
        return Path(self.archive.model_dir)

    @property
    def runner(self):
        if self._runner is None:
            from server.instances.runner import load_runner

            cfg = dataclasses.replace(self.config, monitoring=dataclasses.replace(self.config.monitoring, enabled=False))
            a = self.archive
            self._runner = load_runner(a.name, a.version, str(a.model_dir), a.handler, a.manifest, cfg, None, None)
        return self._runner

    @property
    def handler(self) -> Any:
        """The handler object (a class instance; the module for a function handler)."""
        return self.runner.service.target

    @property
    def task(self) -> str | None:
        """``classification`` / ``regression`` (or another monitoring task) as the handler says."""
        task = getattr(self.handler, "monitor_task", None)
        if task is not None:
            return str(task)
        return "classification" if self.classes else None

    @property
    def classes(self) -> list[str] | None:
        labels = getattr(self.handler, "labels", None)
        if isinstance(labels, dict) and labels:
            return [labels[i] for i in sorted(labels)]
        if isinstance(labels, (list, tuple)) and labels:
            return [str(x) for x in labels]
        return None

    def example_counts(self, rows: Sequence[dict]) -> list[int | None] | None:
        """How many examples each row's request holds (a request of several records, texts or
        images holds several), for a built-in handler; None for a handler that cannot tell,
        and for a row whose inputs it refuses (that row is named when the inputs are read)."""
        target = self.handler
        if not callable(getattr(target, "_examples", None)):
            return None
        counts: list[int | None] = []
        for i, r in enumerate(rows):
            try:
                counts.append(len(target._examples(handler_row(r, i))[0]))
            except Exception:
                counts.append(None)
        return counts

    def preprocess(self, rows: Sequence[dict], chunk: int = 1024) -> Any:
        """The handler's preprocessing of the rows' inputs: the model input tensor (float32
        on the CPU; one example per row unless a row's request held several); a tuple of
        tensors for a model of several inputs (a conditional generator: latents, classes)."""
        import torch

        target = self.handler
        data = [handler_row(r, i) for i, r in enumerate(rows)]
        if not data:
            raise RowError("no rows to preprocess")
        parts = []
        if callable(getattr(target, "collate", None)) and callable(getattr(target, "_examples", None)):
            examples = []
            for i, row in enumerate(data):
                try:
                    got, _ = target._examples(row)
                except Exception as exc:
                    raise RowError(f"row {rows[i].get('rid', i)}: the handler refused its inputs: {exc}") from None
                examples.extend(got)
            for start in range(0, len(examples), chunk):
                parts.append(target.collate(examples[start:start + chunk]))
        elif callable(getattr(target, "preprocess", None)):
            for start in range(0, len(data), chunk):
                try:
                    parts.append(target.preprocess(data[start:start + chunk]))
                except Exception as exc:
                    raise RowError(f"rows {start}..{min(start + chunk, len(data)) - 1}: the handler's preprocess "
                                   f"refused them: {exc}") from None
        else:
            raise RowError(f"handler {self.archive.handler!r} has no preprocess (a function handler): decode the "
                           "rows' inputs in the training code instead of ctx.preprocess")
        if all(isinstance(p, tuple) and all(isinstance(t, torch.Tensor) for t in p) for p in parts):
            # a model of several inputs (a conditional generator's z and classes): each joined
            cols = [torch.cat(c) if len(parts) > 1 else c[0] for c in zip(*parts)]
            return tuple(c.detach().cpu().float() if c.is_floating_point() else c.detach().cpu() for c in cols)
        if not all(isinstance(p, torch.Tensor) for p in parts):
            return parts[0] if len(parts) == 1 else parts
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        x = x.detach().cpu()
        return x.float() if x.is_floating_point() else x

    def run(self, bodies: Sequence[Any]) -> float:
        """Run ``bodies`` as one batch through the runner; the seconds it took."""
        batch = [request_for(i, b, self.archive.name) for i, b in enumerate(bodies)]
        t0 = time.perf_counter()
        outcomes = self.runner.run(batch)
        took = time.perf_counter() - t0
        bad = [o for o in outcomes if isinstance(o, OspreyError)]
        if bad:
            raise ValueError(f"{self.archive.name}: {len(bad)} of {len(batch)} timing requests failed: {bad[0].message}")
        return took

    def answer(self, rows: Sequence[dict], batch_size: int = 32) -> tuple[list[Any], dict[int, str]]:
        """The rows' requests run through the runner, in batches: (each row's
        :class:`~server.core.types.InferenceResponse` as a client gets it, None where refused;
        row index -> why it was refused)."""
        answers: list[Any] = [None] * len(rows)
        errors: dict[int, str] = {}
        size = max(1, int(batch_size))
        for start in range(0, len(rows), size):
            idx = range(start, min(start + size, len(rows)))
            batch = [request_for(i, request_body(rows[i], i), self.archive.name) for i in idx]
            for i, outcome in zip(idx, self.runner.run(batch)):
                if isinstance(outcome, OspreyError):
                    errors[i] = outcome.message
                else:
                    answers[i] = outcome
        return answers, errors

    def close(self) -> None:
        self._runner = None
        self.archive.cleanup()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request_for(i: int, body: Any, model: str):
    """A ticket holding ``body`` as a client would send it (as ``run_reference`` builds them)."""
    from server.instances.capture import reference_ticket

    return reference_ticket(f"gate-{i}", body, model)


def time_batches(models: Sequence[LoadedModel], bodies: Sequence[Any], sizes: Sequence[int] = (1, 32),
                 repeats: int = 7, min_seconds: float = 0.25,
                 max_runs: int = 400) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
    """Seconds per batch of each size, for each model: the fastest of at least ``repeats`` runs
    (after a warm-up run each), more while the runs of that size have taken under ``min_seconds``
    in all (at most ``max_runs`` each). The models take turns, in alternating order, so load on
    the machine falls on them alike; the fastest run is what the model itself costs, which a
    busy machine can only add to (a median of 5 on a loaded 2-core machine once put the same
    model at 1.5x itself). The time floor matters for fast models: 7 turns of a 2 ms batch last
    30 ms, and one burst of other work that long can cover every run of one model but not the
    other's first (the fastest of 7 once put the same digits_cnn at 3.2x itself).

    Returned as ``(times, ratios)``: ``ratios`` is each model's median ratio to the first over
    the turns (each run against the first model's run of the same turn, a few milliseconds
    apart): load that lasts the whole timing (another process on every core, torch's threads
    waiting on each other) slows both runs of a turn alike and cancels out of the ratio, where
    each model's fastest run can fall in a quiet moment for one and not the other (the same
    digits_cnn once timed at 1.7x itself by the fastest runs, twice in a row, beside a test run
    on both cores)."""
    if not bodies:
        return [{} for _ in models], [{} for _ in models]
    out: list[dict[int, float]] = [{} for _ in models]
    ratios: list[dict[int, float]] = [{} for _ in models]
    for size in sizes:
        batch = [bodies[i % len(bodies)] for i in range(size)]
        for m in models:
            m.run(batch)  # warm-up
        runs: list[list[float]] = [[] for _ in models]
        t0 = time.perf_counter()
        r = 0
        while r < repeats or (time.perf_counter() - t0 < min_seconds and r < max_runs):
            order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
            for j in order:
                runs[j].append(models[j].run(batch))
            r += 1
        for j in range(len(models)):
            out[j][size] = min(runs[j])
        for j in range(len(models)):  # each model's runs against the first's of the same turn
            ratios[j][size] = float(np.median([b / a for a, b in zip(runs[0], runs[j]) if a > 0] or [np.inf]))
    return out, ratios


@dataclass
class Predictions:
    """One model's answers to labelled rows, as the quality monitor joins them."""

    task: str | None = None
    classes: tuple[str, ...] | None = None
    outputs: dict[int, np.ndarray] = field(default_factory=dict)  # row index -> output rows (k, ...) of that request
    # (class probabilities, values, reconstruction errors, or an embedding model's embeddings)
    errors: dict[int, str] = field(default_factory=dict)  # row index -> why the handler refused it
    scores: Any = None  # scoring.Scores: a scorer's value per row (generators), else None


def score_answers(model: LoadedModel, rows: Sequence[dict], scorer: Any, batch_size: int = 32) -> Predictions:
    """The model's answers to the rows judged by ``scorer`` (:class:`~.scoring.Scorer`): a
    row it answered and the scorer scored has ``outputs[i] = [value]``."""
    answers, errors = model.answer(rows, batch_size)
    scores = scorer(rows, answers)
    pred = Predictions(task=model.task, errors=errors, scores=scores)
    pred.outputs = {i: np.asarray([v], dtype=np.float64) for i, v in enumerate(scores.values)
                    if v is not None and answers[i] is not None}
    return pred


def predict_rows(archive: str | Path | ModelArchive, rows: Sequence[dict], batch_size: int = 32) -> Predictions:
    """Run the rows' inputs through the archive's handler (monitoring capture on, as
    ``osprey profile`` does) and collect each row's outputs (class probabilities, or values)."""
    from server.instances.capture import run_reference

    opened = archive if isinstance(archive, ModelArchive) else _open(archive)
    try:
        bodies = [request_body(r, i) for i, r in enumerate(rows)]
        names = [f"{i}|{r.get('rid', i)}" for i, r in enumerate(rows)]
        try:
            run = run_reference(opened, bodies, names=names, batch_size=batch_size)
        except OspreyError as exc:
            raise ValueError(f"{opened.source}: the handler could not be loaded: {exc.message}") from None
        pred = Predictions()
        for err in run.errors:
            pred.errors[err.index] = err.message
        collected: dict[int, list[np.ndarray]] = {}
        for obs in run.observations:
            if obs.error:
                raise ValueError(f"{opened.source}: the handler's monitoring hook failed: {obs.error}")
            # an embedding model's answer is its embedding (the quality monitor keeps no outputs for it)
            answer = obs.embedding if obs.task == "embedding" else obs.outputs
            if answer is None:
                continue
            pred.task = pred.task or obs.task
            pred.classes = pred.classes or obs.classes
            outs = np.asarray(answer)
            for j, name in enumerate(obs.request_ids):
                collected.setdefault(int(name.split("|", 1)[0]), []).append(outs[j])
        pred.outputs = {i: np.stack(v) for i, v in collected.items()}
        return pred
    finally:
        if not isinstance(archive, ModelArchive):
            opened.cleanup()
