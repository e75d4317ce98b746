"""Training entry points: ``"module:function"`` resolved in the archive's folder, then installed packages.

A module is looked for first as a file (``pkg/mod.py``) or package (``pkg/mod/__init__.py``)
inside the archive's folder, so an archive can carry its own training code beside its
handler; otherwise it is imported the usual way (``examples.digits_cnn``). An archive's module
is imported under a private name (``osprey_archive_<n>.<module>``) with the archive's folder on
``sys.path`` meanwhile (so it can import the files it ships with), so two archives that both
ship a ``train.py`` never share a module.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

__all__ = ["TrainingError", "EntryPointError", "split_entry_point", "load_module", "resolve_entry_point",
           "entry_point_of", "reference_encoder"]

_counter = itertools.count()


class TrainingError(Exception):
    """Training failed: the message says why; ``traceback`` holds the entry point's own
    traceback when it raised."""

    def __init__(self, message: str, traceback: str | None = None):
        super().__init__(message)
        self.message = message
        self.traceback = traceback


class EntryPointError(TrainingError):
    """The entry point cannot be used: the message names it and why."""


def split_entry_point(spec: Any) -> tuple[str, str]:
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(p.strip() for p in spec.split(":")):
        raise EntryPointError(f"training entry point {spec!r} must be 'module:function' (e.g. examples.digits_cnn:retrain)")
    module, func = (p.strip() for p in spec.split(":"))
    return module, func


def _archive_file(archive_dir: Path, module: str) -> Path | None:
    rel = Path(*module.split("."))
    for candidate in (archive_dir / rel.with_suffix(".py"), archive_dir / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def load_module(archive_dir: str | Path | None, module: str) -> ModuleType:
    """``module`` from the archive's folder if it has it, else from installed packages."""
    path = _archive_file(Path(archive_dir), module) if archive_dir is not None else None
    if path is None:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name) and (module == exc.name or module.startswith(exc.name + ".")):
                where = f"in the archive folder {archive_dir} or " if archive_dir is not None else ""
                raise EntryPointError(f"training entry point module {module!r} was not found {where}"
                                      "among installed packages") from None
            raise  # the module exists but one of its own imports is missing: the traceback says which
    name = f"osprey_archive_{next(_counter)}_{module.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    root = str(archive_dir)
    sys.path.insert(0, root)
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        try:
            sys.path.remove(root)
        except ValueError:
            pass
    return mod


def resolve_entry_point(archive_dir: str | Path | None, spec: Any) -> Callable:
    """The function ``spec`` names; :class:`EntryPointError` naming it when there is none."""
    module, func = split_entry_point(spec)
    mod = load_module(archive_dir, module)
    fn = getattr(mod, func, None)
    if fn is None:
        raise EntryPointError(f"training entry point {spec!r}: module {module!r} ({getattr(mod, '__file__', '?')}) "
                              f"has no {func!r}")
    if not callable(fn):
        raise EntryPointError(f"training entry point {spec!r}: {func!r} is a {type(fn).__name__}, not a function")
    return fn


def entry_point_of(training: dict, configured: str | None = None) -> str:
    """The entry point to run: the retraining section's, else training.json's ``entry_point``."""
    spec = configured or (training or {}).get("entry_point")
    if not spec:
        raise EntryPointError("the model has no training entry point: set retraining.entry_point in "
                              "model-config.yaml or \"entry_point\" in the archive's training.json")
    return spec


def reference_encoder(archive_dir: str | Path | None, training: dict, configured: str | None = None) -> Callable | None:
    """The training module's ``reference_request(row)`` (a reference.npz input row -> the
    request body a client sends), or None when there is no entry point or it has none."""
    try:
        module, _ = split_entry_point(entry_point_of(training, configured))
        fn = getattr(load_module(archive_dir, module), "reference_request", None)
    except Exception:  # no entry point, or it cannot be imported: rows are sent as JSON
        return None
    return fn if callable(fn) else None
