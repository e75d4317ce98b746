"""Loading model files and handler modules from a model folder.

Model formats: TorchScript (``torch.jit.load``), eager (model file + state_dict through
``torch.load(weights_only=True)`` or safetensors), ``torch.export`` programs (``.pt2``).
Handler modules are imported per instance under a unique name, so module-level state is
per instance as it is per worker process under TorchServe; sibling modules of the model
folder (``model.py``...) are importable, and a name another model folder already put in
``sys.modules`` is replaced while this folder loads.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["import_handler_module", "load_model", "model_class_from_file", "list_classes"]

_IMPORT_LOCK = threading.RLock()
_counter = itertools.count()


def list_classes(module: ModuleType) -> list[type]:
    """Classes defined in ``module`` itself (not imported into it)."""
    return [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]


def _claim_folder(model_dir: str) -> None:
    """Make ``model_dir`` first on sys.path and drop same-named modules of other folders."""
    if model_dir in sys.path:
        sys.path.remove(model_dir)
    sys.path.insert(0, model_dir)
    local = {p.stem for p in Path(model_dir).glob("*.py")} | {p.name for p in Path(model_dir).iterdir() if (p / "__init__.py").exists()}
    for name in local:
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None) if mod is not None else None
        if mod is not None and (file is None or not os.path.abspath(file).startswith(os.path.abspath(model_dir) + os.sep)):
            del sys.modules[name]


def import_handler_module(model_dir: str, module_name: str) -> ModuleType:
    """Import ``module_name`` (a .py file in model_dir, or an installed module) afresh."""
    with _IMPORT_LOCK:
        _claim_folder(model_dir)
        path = Path(model_dir) / f"{module_name.replace('.', os.sep)}.py"
        if not path.is_file():
            return importlib.import_module(module_name)
        unique = f"{module_name}__osprey{next(_counter)}"
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(unique, None)
            raise
        return module


def model_class_from_file(model_dir: str, model_file: str) -> type:
    import torch

    with _IMPORT_LOCK:
        _claim_folder(model_dir)
        module = import_handler_module(model_dir, Path(model_file).stem)
    classes = [c for c in list_classes(module) if issubclass(c, torch.nn.Module)]
    if len(classes) != 1:
        raise ValueError(f"model file {model_file} must define exactly one torch.nn.Module class, found {len(classes)}")
    return classes[0]


def load_model(model_dir: str, serialized_file: str | None, model_file: str | None, device: Any) -> Any:
    """Load the model an archive carries; raise ValueError saying why it can't."""
    import torch

    if not serialized_file:
        if model_file:
            return model_class_from_file(model_dir, model_file)().to(device).eval()
        raise ValueError("the archive has no serialized file (--serialized-file) and no model file")
    path = os.path.join(model_dir, serialized_file)
    if not os.path.isfile(path):
        raise ValueError(f"serialized file {serialized_file} is missing")
    suffix = Path(serialized_file).suffix.lower()
    if suffix == ".pt2":
        program = torch.export.load(path)
        return program.module().to(device)
    if model_file:
        cls = model_class_from_file(model_dir, model_file)
        model = cls()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pickled code is refused on purpose
                raise ValueError(f"{serialized_file} is not a state_dict loadable with weights_only=True ({exc})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{serialized_file} holds a {type(state).__name__}, not a state_dict")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{serialized_file} does not fit {cls.__name__}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        return model.to(device).eval()
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as exc:
        raise ValueError(f"{serialized_file} is not a TorchScript file and the archive has no model file ({exc})") from None
