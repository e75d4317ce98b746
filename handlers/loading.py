"""Loading model files and handler modules from a model folder.

Model formats: TorchScript (``torch.jit.load``), eager (model file + state_dict through
``torch.load(weights_only=True)`` or safetensors), ``torch.export`` programs (``.pt2``),
and ONNX (``.onnx``, run by onnxruntime when the ``onnx`` extra is installed). A file that
cannot load raises ValueError saying why (the registration answers 400 with it).

Optimization switches (model-config.yaml, top level): ``precision: fp32|fp16|bf16``,
``quantize: dynamic-int8``, ``compile: true`` (or ``{backend: inductor, mode: ...}``),
``channels_last: true`` -- see
:func:`optimizations_from` and :func:`optimize`.
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
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["import_handler_module", "forget_folder", "add_package_folder", "load_model", "model_class_from_file", "list_classes",
           "Optimizations", "optimizations_from", "optimize", "OnnxModel", "CompiledModel"]

log = logging.getLogger("osprey.loading")

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


def add_package_folder(folder: str, first: bool) -> None:
    """Put a folder of installed packages (a model's requirements, pip --target) on the import
    path: ``first`` (a model's own process) ahead of the interpreter's own packages, else last
    (one interpreter shared by every model: it may add packages, never replace any)."""
    with _IMPORT_LOCK:
        if folder in sys.path:
            return
        if first:
            sys.path.insert(0, folder)
        else:
            sys.path.append(folder)
        importlib.invalidate_caches()


def forget_folder(model_dir: str) -> None:
    """A model folder is unloaded (its instances have ended): take it off ``sys.path`` and
    drop the modules imported from it, so registering and unregistering a model over and
    over leaves neither a longer import path nor a module per registration behind."""
    prefix = os.path.abspath(model_dir) + os.sep
    with _IMPORT_LOCK:
        while model_dir in sys.path:
            sys.path.remove(model_dir)
        sys.path_importer_cache.pop(model_dir, None)
        for name, mod in list(sys.modules.items()):
            file = getattr(mod, "__file__", None)
            if isinstance(file, str) and os.path.abspath(file).startswith(prefix):
                sys.modules.pop(name, None)


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
    if len(classes) > 1:  # helper modules may be private (_Block): the one public class is the model
        classes = [c for c in classes if not c.__name__.startswith("_")]
    if len(classes) != 1:
        raise ValueError(f"model file {model_file} must define exactly one (public) torch.nn.Module class, "
                         f"found {len(classes)}")
    return classes[0]


def _why(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of an exception, short enough for an error message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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
    if suffix == ".onnx":
        return OnnxModel(path, device)
    if suffix == ".pt2":
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise ValueError(f"{serialized_file} is not a torch.export program ({_why(exc)})") from None
        return program.module().to(device)
    if model_file:
        cls = model_class_from_file(model_dir, model_file)
        model = cls()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state = load_file(path, device="cpu")
            except Exception as exc:
                raise ValueError(f"{serialized_file} is not a readable safetensors file ({_why(exc)})") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pickled code is refused on purpose
                raise ValueError(f"{serialized_file} is not a state_dict loadable with weights_only=True ({_why(exc)})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{serialized_file} holds a {type(state).__name__}, not a state_dict")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensors of the wrong shape
            raise ValueError(f"{serialized_file} does not fit {cls.__name__}: {str(exc).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{serialized_file} does not fit {cls.__name__}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        return model.to(device).eval()
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as exc:
        raise ValueError(f"{serialized_file} is not a TorchScript file and the archive has no model file ({_why(exc)})") from None


class OnnxModel:
    """An ONNX model run by onnxruntime, called like a torch module (tensors in and out)."""

    def __init__(self, path: str, device: Any):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{os.path.basename(path)} is an ONNX model but onnxruntime is not installed "
                             "(pip install 'osprey[onnx]')") from None
        providers = ["CPUExecutionProvider"]
        if getattr(device, "type", "cpu") == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, (os.cpu_count() or 1))
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:
            raise ValueError(f"{os.path.basename(path)} is not a loadable ONNX model ({_why(exc)})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = device

    def eval(self) -> "OnnxModel":
        return self

    def __call__(self, *args: Any) -> Any:
        import torch

        if len(args) != len(self.input_names):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(args)}")
        feeds = {n: (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a) for n, a in zip(self.input_names, args)}
        outs = [torch.from_numpy(o).to(self.device) for o in self.session.run(self.output_names, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)


PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("dynamic-int8",)


@dataclass(frozen=True)
class Optimizations:
    """The optimization switches of one model (model-config.yaml, top level)."""

    precision: str = "fp32"
    quantize: str | None = None
    compile: bool = False
    channels_last: bool = False
    compile_options: tuple = ()  # (("backend", "inductor"), ("mode", "max-autotune")) from compile: {...}


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"model-config.yaml: {key} must be true or false, got {value!r}")


def optimizations_from(config: dict | None) -> Optimizations:
    """Read and check the switches; raise ValueError naming a bad one."""
    cfg = config or {}
    precision = str(cfg.get("precision", "fp32")).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"model-config.yaml: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    quantize = cfg.get("quantize")
    if quantize in (None, False, "none", "None"):
        quantize = None
    elif str(quantize).lower() not in QUANTIZATIONS:
        raise ValueError(f"model-config.yaml: quantize must be {' or '.join(QUANTIZATIONS)}, got {quantize!r}")
    else:
        quantize = str(quantize).lower()
    if quantize and precision != "fp32":
        raise ValueError("model-config.yaml: quantize: dynamic-int8 works on fp32 models; drop precision or quantize")
    compile_cfg = cfg.get("compile", False)
    if isinstance(compile_cfg, dict):
        unknown = set(compile_cfg) - {"backend", "mode"}
        if unknown:
            raise ValueError(f"model-config.yaml: compile takes backend and mode, not {', '.join(sorted(unknown))}")
        compile_opts = tuple(sorted((k, str(v)) for k, v in compile_cfg.items()))
        compiled = True
    else:
        compiled, compile_opts = _flag("compile", compile_cfg), ()
    return Optimizations(precision, quantize, compiled, _flag("channels_last", cfg.get("channels_last", False)),
                         compile_opts)


class CompiledModel:
    """``torch.compile(model)`` that falls back to the eager model, with a warning, where it fails."""

    def __init__(self, model: Any, **options: Any):
        import torch

        self.eager = model
        self.compiled = torch.compile(model, **options)
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("torch.compile failed (%s); running the model eagerly", self.failed)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.eager, name)


def _quantize_dynamic_int8(model: Any) -> Any:
    """Dynamic int8 quantization of Linear, LSTM and GRU layers.

    Linear layers inside ``nn.TransformerEncoderLayer``/``DecoderLayer`` stay in float:
    those layers read ``linear.weight`` as a tensor on their fast path, which quantized
    layers do not provide.
    """
    import torch
    from torch import nn

    kept: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            kept.update(f"{name}.{child}" if name else child for child, m in module.named_modules()
                        if isinstance(m, nn.Linear))
    targets = {name for name, m in model.named_modules()
               if name and isinstance(m, (nn.Linear, nn.LSTM, nn.GRU)) and name not in kept}
    if kept:
        log.warning("quantize: %d Linear layers inside Transformer layers stay in float", len(kept))
    if not targets:
        raise ValueError("quantize: dynamic-int8 found no Linear, LSTM or GRU layers to quantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, targets, dtype=torch.qint8)


def optimize(model: Any, opts: Optimizations, device: Any) -> Any:
    """Apply the switches to a loaded model; raise ValueError where one cannot apply."""
    import torch

    if opts.quantize == "dynamic-int8":
        if getattr(device, "type", "cpu") != "cpu":
            raise ValueError("quantize: dynamic-int8 runs on the CPU only; set deviceType: cpu")
        if not isinstance(model, torch.nn.Module) or isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise ValueError("quantize: dynamic-int8 needs an eager model (model file + state_dict), "
                             f"not a {type(model).__name__}")
        model = _quantize_dynamic_int8(model)
    if opts.precision != "fp32" and getattr(device, "type", "cpu") == "cpu":
        if isinstance(model, OnnxModel):
            raise ValueError(f"precision: {opts.precision} is not available for ONNX models; export them in that precision")
        if opts.precision == "fp16":
            log.warning("precision fp16 on the CPU: using bf16 (autocast fp16 needs a GPU)")
        model = model.to(torch.bfloat16)
    if opts.channels_last:
        if isinstance(model, torch.nn.Module):
            model = model.to(memory_format=torch.channels_last)
    if opts.compile:
        if isinstance(model, OnnxModel):
            log.warning("compile: true has no effect on an ONNX model")
        else:
            try:
                model = CompiledModel(model, **dict(opts.compile_options))
            except Exception as exc:  # torch.compile unavailable on this platform
                log.warning("torch.compile is not available (%s); running the model eagerly", exc)
    return model
