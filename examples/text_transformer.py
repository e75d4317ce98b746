"""``text_transformer``: a small Transformer text classifier, served by ``text_classifier``.

Trains a WordPiece tokenizer (``tokenizers``) and the classifier on a generated topic text
set (:mod:`examples.textgen`). Format: eager -- model file + safetensors weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import ExampleResult, classification_metrics, fit, package_example, seed_everything, write_reference
from .networks import text_transformer as network
from .textgen import generate

__all__ = ["NAME", "train_tokenizer", "train", "retrain", "build", "HANDLER_CONFIG"]

NAME = "text_transformer"
SEED = 0
EPOCHS = 6
N_TEXTS = 3000
HANDLER_CONFIG = {"model_inputs": ["input_ids", "attention_mask"], "max_length": 128, "topk": 4}


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A lowercasing WordPiece tokenizer trained on ``texts``; ids 0 and 1 are [PAD] and [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"]))
    return tok


def _encode(tok, texts: list[str]):
    import torch

    encs = tok.encode_batch(texts)
    longest = max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def train(texts: list[str], labels: list[int], tokenizer, *, seed: int = SEED, epochs: int = EPOCHS):
    """Training entry point: texts, topic ids and a trained tokenizer -> a TextTransformer."""
    import torch

    seed_everything(seed)
    model = network.TextTransformer(vocab_size=2048, classes=max(labels) + 1)
    ids, mask = _encode(tokenizer, texts)
    return fit(model, (ids, mask), torch.tensor(labels), torch.nn.functional.cross_entropy, epochs=epochs,
               batch_size=64, lr=2e-3, seed=seed)


def _row_text(row: dict) -> str:
    """A production row's text, as a client sent it: plain text (bytes or str), a JSON string
    or ``{"text": ...}``."""
    inputs = row["inputs"]
    body = inputs.get("data", inputs.get("body"))
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8")
    if isinstance(body, dict):
        body = body.get("text", "")
    return str(body)


def retrain(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``): a fresh TextTransformer on the
    reference texts plus the labelled production rows (``row_weight`` times each), tokenized
    with the archive's own tokenizer.json (kept, so the handler reads the new weights as it
    is); hyperparameters ``epochs`` (6), ``lr`` (2e-3), ``row_weight`` (2). Writes safetensors."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    hp = ctx.hyperparameters
    tok = Tokenizer.from_file(str(ctx.archive_dir / "tokenizer.json"))
    texts = [str(t) for t in ctx.reference["inputs"]]
    labels = [int(y) for y in ctx.reference["targets"]]
    n_ref = len(texts)
    if ctx.rows:
        texts += [_row_text(r) for r in ctx.rows]
        labels += [int(y) for y in ctx.labels(ctx.rows)]
    weight, seed = max(1, int(hp.get("row_weight", 2))), int(hp.get("seed", ctx.seed))
    order = list(range(n_ref)) + list(range(n_ref, len(texts))) * weight
    epochs = int(hp.get("epochs", EPOCHS))
    ctx.log(f"text_transformer: training on {n_ref} reference texts and {len(texts) - n_ref} production rows "
            f"(x{weight}), {epochs} epochs")
    seed_everything(seed)
    model = network.TextTransformer(vocab_size=2048, classes=len(ctx.classes or []) or max(labels) + 1)
    ids, mask = _encode(tok, [texts[i] for i in order])
    model = fit(model, (ids, mask), torch.tensor([labels[i] for i in order]), torch.nn.functional.cross_entropy,
                epochs=epochs, batch_size=64, lr=float(hp.get("lr", 2e-3)), seed=seed,
                on_epoch=lambda done, total: ctx.progress(done / total, f"epoch {done}/{total}"))
    path = ctx.out_dir / "text_transformer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with torch.inference_mode():
        probs = torch.softmax(model(*_encode(tok, texts)), 1).numpy()
    from .common import reference_sample

    return {"weights": path, "reference": reference_sample(np.asarray(texts), np.asarray(labels), probs, seed=seed)}


def build(out: Path, work: Path) -> ExampleResult:
    import torch
    from safetensors.torch import save_file

    texts, labels, names = generate(N_TEXTS, seed=SEED)
    n_train = int(0.8 * len(texts))
    tr_x, te_x, tr_y, te_y = texts[:n_train], texts[n_train:], labels[:n_train], labels[n_train:]
    tokenizer = train_tokenizer(tr_x)
    model = train(tr_x, tr_y, tokenizer)
    with torch.inference_mode():
        pred = model(*_encode(tokenizer, te_x)).argmax(1).numpy()
        probs_tr = torch.softmax(model(*_encode(tokenizer, tr_x)), 1).numpy()
    metrics = classification_metrics(np.asarray(te_y), pred)

    tokenizer.save(str(work / "tokenizer.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "text_transformer.safetensors"))
    (work / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    write_reference(work, np.asarray(tr_x), probs_tr, np.asarray(tr_y))
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "samples" / "texts_heldout.json").write_text(json.dumps({"texts": te_x, "labels": [names[y] for y in te_y]}))
    archive = package_example(
        name=NAME, out=out, work=work, handler="text_classifier",
        serialized_file=work / "text_transformer.safetensors", model_file=Path(network.__file__),
        extra_files=[work / "tokenizer.json", work / "index_to_name.json", work / "reference.npz"],
        config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG}, metrics=metrics,
        training={"entry_point": "examples.text_transformer:retrain", "data": "examples.textgen:generate",
                  "seed": SEED, "epochs": EPOCHS, "n_texts": N_TEXTS, "heldout_fraction": 0.2,
                  "format": "eager safetensors", "tokenizer": "WordPiece (tokenizers), trained on the training texts"})
    return ExampleResult(archive, metrics)
