"""The handler of the small archives that stand in for the model-zoo models TorchServe's
Postman collections name (build_models.py packs it into each one).

A module-level ``handle(data, context)`` with no ``ts`` import, so that the same archive runs
unchanged on TorchServe 0.12 and on Osprey. Each archive holds a TorchScript ``model.pt`` and
``postman_model.json`` (its task and labels); the answers come from running that model on the
decoded request:

- ``classify``: an image (raw bytes, or base64 text) -> softmax -> top 5 ``{label: probability}``.
- ``digit``: a 28x28 grayscale digit (PNG bytes, base64 PNG in a KServe v1 instance, or a
  KServe v2 tensor) -> the predicted digit; on an explanation request (header
  ``explain: True``, as TorchServe sets it for /explanations and :explain) the
  gradient x input attribution of the predicted class, shaped [1, 1, 28, 28].
- ``text_label``: UTF-8 text -> the predicted label as text.
"""

import base64
import io
import json
import os

import torch

_loaded = {}


def _load(context):
    if "model" not in _loaded:
        model_dir = context.system_properties["model_dir"]
        _loaded["model"] = torch.jit.load(os.path.join(model_dir, "model.pt"), map_location="cpu")
        with open(os.path.join(model_dir, "postman_model.json")) as fh:
            _loaded["spec"] = json.load(fh)
    return _loaded["model"], _loaded["spec"]


def _is_explain(context):
    try:
        return context.get_request_header(0, "explain") == "True"
    except Exception:  # a context without request headers: not an explanation
        return False


def _payload(row):
    if isinstance(row, dict):
        body = row.get("data")
        if body is None:
            body = row.get("body")
        return body
    return row


def _image_bytes(body):
    if isinstance(body, str):
        return base64.b64decode(body)
    return bytes(body)


def _image(body, mode, size):
    from PIL import Image

    img = Image.open(io.BytesIO(_image_bytes(body))).convert(mode).resize(size)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).to(torch.float32) / 255.0
    channels = 1 if mode == "L" else 3
    return x.reshape(size[1], size[0], channels).permute(2, 0, 1)


def _digit_input(body):
    if isinstance(body, list):  # a KServe v2 tensor, already shaped by the envelope
        return torch.tensor(body, dtype=torch.float32).reshape(1, 28, 28)
    return _image(body, "L", (28, 28))


def handle(data, context):
    if data is None:  # TorchServe calls the entry point once at load time without data
        _load(context)
        return None
    model, spec = _load(context)
    task = spec["task"]
    labels = spec["labels"]
    out = []
    for row in data:
        body = _payload(row)
        if task == "classify":
            with torch.no_grad():
                probs = torch.softmax(model(_image(body, "RGB", (16, 16)).unsqueeze(0)), dim=1)[0]
            top = torch.topk(probs, 5)
            out.append({labels[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())})
        elif task == "digit":
            x = _digit_input(body).unsqueeze(0)
            if _is_explain(context):
                x.requires_grad_(True)
                logits = model(x)
                logits[0, int(logits.argmax())].backward()
                out.append((x.grad * x).detach().tolist())
            else:
                with torch.no_grad():
                    out.append(int(model(x).argmax()))
        elif task == "text_label":
            text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else str(body)
            with torch.no_grad():
                logits = model(torch.tensor([[float(len(text))]]))
            out.append(labels[int(logits.argmax())])
        else:
            raise ValueError(f"postman_model.json names an unknown task {task!r}")
    return out
