"""``generator``: a GAN generator or VAE decoder -> PNG images; the same seed, the same image.

The model maps latent vectors (N x latent_dim) -- and, for a conditional model, class ids
(N, int64) -- to images (N x H x W or N x C x H x W) whose values lie in ``output_range``.

model-config.yaml::

    handler:
      latent_dim: 8
      num_classes: 10       # 0 (default): unconditional, the model takes only z
      output_range: [0, 1]  # mapped to 0..255
      image_shape: [8, 8]   # optional, for the declared output tensor: [H, W] or [C, H, W]
      upscale: 4            # nearest-neighbour enlargement of the PNGs
      max_samples: 64       # images per request
      latent_limit: 1000    # the largest |value| a latent vector may hold

A body is JSON ``{"seed": 7, "num_samples": 1, "latent": [[...]]?, "class": 3?}`` (all
optional; the latent vectors are drawn from a normal distribution seeded with ``seed``,
and missing classes are drawn with it too). One image is answered as ``image/png``; several
(or ``"format": "json"``) as ``{"images": [base64 PNG, ...], "seed", "classes"}``. More than
``max_samples`` images, or latent values that are not finite or beyond ``latent_limit`` (a
decoder answers those with a blank image), are a 400 before anything is drawn. The seed
used is in the ``x-osprey-seed`` header (and, for one image of a conditional model, its
class in ``x-osprey-class``). Open Inference Protocol: inputs ``latent`` (FP32,
N x latent_dim) and, if conditional, ``class`` (INT64, N); output ``image`` (FP32, pixels in 0..1).
"""

from __future__ import annotations

import base64
import io
import secrets
from typing import Any

import numpy as np

from ..errors import InvalidInput
from .common import BuiltinHandler, numeric_tensor, parse_json, tensor

__all__ = ["GeneratorHandler"]


class GeneratorHandler(BuiltinHandler):
    def initialize(self, context: Any) -> None:
        super().initialize(context)
        cfg = self.config
        if "latent_dim" not in cfg:
            raise ValueError("model-config.yaml handler.latent_dim is required for the generator handler")
        self.latent_dim = int(cfg["latent_dim"])
        self.num_classes = int(cfg.get("num_classes", 0))
        lo, hi = cfg.get("output_range", [0.0, 1.0])
        self.lo, self.hi = float(lo), float(hi)
        self.upscale = max(1, int(cfg.get("upscale", 1)))
        self.max_samples = int(cfg.get("max_samples", 64))
        self.latent_limit = float(cfg.get("latent_limit", 1000.0))
        self.image_shape = [int(d) for d in cfg.get("image_shape", [-1, -1])]

    def tensor_metadata(self) -> dict:
        inputs = [tensor("latent", "FP32", [-1, self.latent_dim])]
        if self.num_classes:
            inputs.append(tensor("class", "INT64", [-1]))
        return {"inputs": inputs, "outputs": [tensor("image", "FP32", [-1, *self.image_shape])]}

    # --- input ----------------------------------------------------------------------
    def _int(self, body: dict, key: str, default: Any) -> Any:
        value = body.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{key} must be an integer, got {value!r}")
        return value

    def _latent(self, z: np.ndarray, what: str) -> np.ndarray:
        """Latent vectors (N x latent_dim) checked: at most max_samples, finite, within latent_limit."""
        z = z[None] if z.ndim == 1 else z
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise InvalidInput(f"{what} vectors must have {self.latent_dim} values, got shape {list(z.shape)}")
        if len(z) > self.max_samples:
            raise InvalidInput(f"at most {self.max_samples} samples per request, asked for {len(z)}")
        if not np.isfinite(z).all():
            raise InvalidInput(f"{what} holds values that are not finite numbers in float32 (NaN, infinity "
                               "or beyond +-3.4e38)")
        if np.abs(z).max(initial=0.0) > self.latent_limit:
            raise InvalidInput(f"{what} values must lie within +-{self.latent_limit:g}, got "
                               f"{float(np.abs(z).max()):g}")
        return z

    def examples_from_body(self, body: Any) -> list:
        import torch

        if isinstance(body, (bytes, bytearray, str)):
            text = bytes(body).decode("utf-8", "replace") if not isinstance(body, str) else body
            body = parse_json(text, expect='{"seed": 7, "num_samples": 1}') if text.strip() else {}
        if not isinstance(body, dict):
            raise InvalidInput('body must be a JSON object like {"seed": 7, "num_samples": 1, "class": 3}')
        seed = self._int(body, "seed", None)
        if seed is None:
            seed = secrets.randbelow(2**31)
        fmt = str(body.get("format", "auto"))
        if fmt not in ("auto", "png", "json"):
            raise InvalidInput("format must be png or json")
        gen = torch.Generator().manual_seed(seed)
        latent = body.get("latent")
        if latent is not None:
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    z = np.asarray(latent, dtype=np.float32)
            except (TypeError, ValueError, RecursionError):
                raise InvalidInput("latent must be a list of numbers or a list of such lists") from None
            z = self._latent(z, "latent")
            n = len(z)
        else:
            n = self._int(body, "num_samples", 1)
            if n < 1:
                raise InvalidInput("num_samples must be at least 1")
            if n > self.max_samples:  # before drawing: 1e9 samples would be 32 GB of latents
                raise InvalidInput(f"at most {self.max_samples} samples per request, asked for {n}")
            z = torch.randn(n, self.latent_dim, generator=gen).numpy()
        classes = self._classes(body.get("class"), n, gen)
        many = n > 1 or fmt == "json"
        if fmt == "png" and n > 1:
            raise InvalidInput("format png returns one image; ask for num_samples 1 or format json")
        return [{"z": z[i], "cls": classes[i], "seed": seed, "many": many} for i in range(n)]

    def _classes(self, value: Any, n: int, gen: Any) -> list[int]:
        import torch

        if not self.num_classes:
            if value is not None:
                raise InvalidInput("this generator is not conditional: it takes no class")
            return [0] * n
        if value is None:
            return torch.randint(0, self.num_classes, (n,), generator=gen).tolist()
        values = value if isinstance(value, list) else [value] * n
        if len(values) != n:
            raise InvalidInput(f"class must be one integer or {n} of them")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.num_classes:
                raise InvalidInput(f"class must be an integer in 0..{self.num_classes - 1}, got {v!r}")
        return list(values)

    def examples_from_tensors(self, tensors: dict) -> list:
        name, raw = self.input_tensor(tensors, ("latent",), also=("class",) if self.num_classes else ())
        with np.errstate(over="ignore", invalid="ignore"):
            z = numeric_tensor(name, raw).astype(np.float32, copy=False)
        z = self._latent(z, f"input '{name}'")
        if self.num_classes:
            if "class" not in tensors:
                raise InvalidInput("this generator is conditional: send a class tensor (INT64, N)")
            cls = numeric_tensor("class", tensors["class"], "INT64").reshape(-1)
            if cls.dtype.kind == "f" and not np.all(np.isfinite(cls) & (cls == np.round(cls))):
                raise InvalidInput(f"class must hold {len(z)} integers in 0..{self.num_classes - 1}")
            if len(cls) != len(z) or np.any((cls < 0) | (cls >= self.num_classes)):
                raise InvalidInput(f"class must hold {len(z)} integers in 0..{self.num_classes - 1}")
            cls = cls.astype(np.int64)
        else:
            cls = np.zeros(len(z), dtype=np.int64)
        return [{"z": z[i], "cls": int(cls[i]), "seed": None, "many": True} for i in range(len(z))]

    # --- model ----------------------------------------------------------------------
    def collate(self, examples: list) -> Any:
        import torch

        z = self.prepare(torch.from_numpy(np.stack([e["z"] for e in examples])))
        if not self.num_classes:
            return (z,)
        return z, torch.tensor([e["cls"] for e in examples], dtype=torch.int64, device=self.device)

    def forward(self, batch: Any) -> dict:
        img = self.inference(*batch).float()
        img = ((img - self.lo) / (self.hi - self.lo)).clamp(0, 1)
        return {"image": img.cpu().numpy()}

    # --- monitoring (handlers/monitoring.py): what was asked for; a generated image has no
    # prediction to drift on. A conditional generator's "prediction" for feedback is the class
    # it was asked to draw: a label is the class a viewer recognised in the sample, and live
    # quality is how often the two agree (monitoring.quality, task "generator").
    monitor_layer = False  # the decoder's hidden layer is a function of the latent: nothing more to watch

    @property
    def monitor_task(self) -> str | None:
        return "generator" if getattr(self, "num_classes", 0) else None

    def monitor_outputs(self, outputs: Any, inputs: Any) -> Any:
        """The asked classes as one-hot rows (n, num_classes); None for an unconditional model."""
        if not self.num_classes or not isinstance(inputs, tuple) or len(inputs) < 2:
            return None
        cls = inputs[1].detach().cpu().numpy().astype(np.int64)
        out = np.zeros((len(cls), self.num_classes), dtype=np.float32)
        out[np.arange(len(cls)), cls] = 1.0
        return out

    def monitor_features(self, inputs: Any, outputs: Any) -> dict:
        """``latent_norm`` (the latent vector's RMS: 1 for standard normal draws) and, for a
        conditional model, ``class`` (categorical)."""
        z = inputs[0] if isinstance(inputs, tuple) else inputs
        zn = z.detach().float().cpu().numpy()
        out = {"latent_norm": np.sqrt((zn.reshape(len(zn), -1) ** 2).mean(axis=1))}
        if isinstance(inputs, tuple) and len(inputs) > 1:
            out["class"] = inputs[1].detach().cpu().numpy().astype(str)
        return out

    # --- output ---------------------------------------------------------------------
    def _png(self, img: np.ndarray) -> bytes:
        from PIL import Image

        if img.ndim == 3 and img.shape[0] in (1, 3):
            img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        pixels = np.rint(img * 255).astype(np.uint8)
        pil = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
        if self.upscale > 1:
            pil = pil.resize((pil.width * self.upscale, pil.height * self.upscale), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return buf.getvalue()

    def answer(self, outputs: dict, examples: list, idx: int) -> Any:
        seed = examples[0]["seed"]
        if self.context is not None and self.context.request_processor is not None:
            self.context.set_response_header(idx, "x-osprey-seed", str(seed))
            if self.num_classes and not examples[0]["many"]:  # one PNG: which class was drawn
                self.context.set_response_header(idx, "x-osprey-class", str(examples[0]["cls"]))
        pngs = [self._png(img) for img in outputs["image"]]
        if not examples[0]["many"]:
            self.context.set_response_content_type(idx, "image/png")
            return pngs[0]
        return {"images": [base64.b64encode(p).decode("ascii") for p in pngs], "seed": seed,
                "classes": [e["cls"] for e in examples] if self.num_classes else None}
