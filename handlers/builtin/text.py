"""Text in, padded token batches out: what ``text_classifier`` and ``text_embedding`` share.

The tokenizer comes from the archive: ``tokenizer.json`` (read with the ``tokenizers``
library) or a plain vocabulary file (one token per line; text is lowercased and split into
words and punctuation; unknown words map to ``[UNK]``). A batch of texts becomes
``input_ids`` padded to the longest text in the batch, plus ``attention_mask`` (1 for real
tokens), ``lengths`` and ``token_type_ids``; the model is called with the ones
``handler.model_inputs`` names, in that order.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ..errors import InvalidInput

__all__ = ["TextInputs", "TextTokenizer", "texts_from_body", "texts_from_tensors", "require_text", "model_inputs_from", "text_statistics", "first_output", "MODEL_INPUTS"]

MODEL_INPUTS = ("input_ids", "attention_mask", "lengths", "token_type_ids")
_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def texts_from_body(body: Any, keys: tuple[str, ...] = ("text", "texts", "data", "inputs", "instances")) -> tuple[list[str], bool]:
    """The texts of one request and whether it sent a list (so the answer is a list)."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("text input is not valid UTF-8") from None
    if isinstance(body, dict):
        for key in keys:
            if key in body:
                inner = body[key]
                if isinstance(inner, dict):  # one level only: {"text": {"text": ...}} is no text
                    raise InvalidInput(f"JSON input: {key!r} must hold text or a list of strings")
                return texts_from_body(inner, keys)
        raise InvalidInput(f"JSON input needs one of the keys {', '.join(keys)} holding text")
    if isinstance(body, str):
        return [body], False
    if isinstance(body, list) and body and all(isinstance(t, str) for t in body):
        return list(body), True
    raise InvalidInput("input must be text, a JSON string, a list of strings, or {\"text\": ...}")


def texts_from_tensors(arr: np.ndarray, name: str = "text") -> list[str]:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "OSU":
        raise InvalidInput(f"input '{name}' must be BYTES (UTF-8 text), got a numeric tensor ({arr.dtype})")
    out = []
    for v in arr.reshape(-1):
        if isinstance(v, (bytes, bytearray, np.bytes_)):
            try:
                out.append(bytes(v).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput("text tensor element is not valid UTF-8") from None
        else:
            out.append(str(v))
    return out


class TextTokenizer:
    """tokenizer.json or a plain vocabulary file, with truncation and batch padding."""

    def __init__(self, model_dir: str, cfg: dict):
        self.max_length = int(cfg.get("max_length", 256))
        tok_file = os.path.join(model_dir, str(cfg.get("tokenizer", "tokenizer.json")))
        vocab_file = os.path.join(model_dir, str(cfg.get("vocab_file", "vocab.txt")))
        self.fast = None
        if os.path.isfile(tok_file):
            from tokenizers import Tokenizer

            self.fast = Tokenizer.from_file(tok_file)
            self.fast.no_padding()
            self.fast.enable_truncation(self.max_length)
            pad = cfg.get("pad_token", "[PAD]")
            pad_id = self.fast.token_to_id(pad) if isinstance(pad, str) else None
            self.pad_id = int(cfg.get("pad_id", pad_id if pad_id is not None else 0))
            unk = cfg.get("unk_token", "[UNK]")
            self.unk_id = self.fast.token_to_id(unk) if isinstance(unk, str) else None  # None: no unknown token
        elif os.path.isfile(vocab_file):
            with open(vocab_file, encoding="utf-8") as fh:
                tokens = [line.rstrip("\n") for line in fh if line.strip()]
            self.vocab = {t: i for i, t in enumerate(tokens)}
            self.lowercase = bool(cfg.get("lowercase", True))
            unk = cfg.get("unk_token", "[UNK]")
            if unk not in self.vocab:
                raise ValueError(f"vocabulary file {os.path.basename(vocab_file)} has no {unk!r} token")
            self.unk_id = self.vocab[unk]
            self.pad_id = int(cfg.get("pad_id", self.vocab.get(cfg.get("pad_token", "[PAD]"), 0)))
        else:
            raise ValueError(f"the archive has neither {os.path.basename(tok_file)} nor {os.path.basename(vocab_file)}")

    def ids(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Token ids and token type ids of each text (truncated to max_length, at least one token)."""
        if self.fast is not None:
            encs = self.fast.encode_batch(texts)
            out = [(e.ids, e.type_ids) for e in encs]
        else:
            out = []
            for t in texts:
                words = _WORDS.findall(t.lower() if self.lowercase else t)[: self.max_length]
                ids = [self.vocab.get(w, self.unk_id) for w in words]
                out.append((ids, [0] * len(ids)))
        return [(ids, types) if ids else ([self.pad_id], [0]) for ids, types in out]

    def pad(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        """Padded ``input_ids``, ``token_type_ids``, ``attention_mask`` and ``lengths``."""
        n = len(encoded)
        longest = max(len(ids) for ids, _ in encoded)
        input_ids = np.full((n, longest), self.pad_id, dtype=np.int64)
        types = np.zeros((n, longest), dtype=np.int64)
        mask = np.zeros((n, longest), dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        for i, (ids, tt) in enumerate(encoded):
            input_ids[i, :len(ids)] = ids
            types[i, :len(tt)] = tt
            mask[i, :len(ids)] = 1
            lengths[i] = len(ids)
        return {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask, "lengths": lengths}


def model_inputs_from(cfg: dict, default: tuple[str, ...]) -> tuple[str, ...]:
    names = cfg.get("model_inputs", list(default))
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    bad = [n for n in names if n not in MODEL_INPUTS]
    if bad or not names:
        raise ValueError(f"model-config.yaml handler.model_inputs must list some of {', '.join(MODEL_INPUTS)}, got {names!r}")
    return tuple(names)


def first_output(out: Any) -> Any:
    """The main tensor of a model's output (a tensor, the first of a tuple, or a dict's first)."""
    if isinstance(out, dict):
        return out.get("last_hidden_state", out.get("logits", next(iter(out.values()))))
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def text_statistics(tokenizer: TextTokenizer, names: tuple[str, ...], inputs: Any) -> dict[str, np.ndarray]:
    """Monitoring features of a batch of token tensors (the model's inputs, named by
    ``names``): ``length`` in tokens and ``unknown_rate`` (share of them that are the unknown
    token; absent when the tokenizer has none)."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    named = dict(zip(names, args))
    ids = named["input_ids"].detach().cpu().numpy()
    if "lengths" in named:
        lengths = named["lengths"].detach().cpu().numpy().astype(np.float64)
        real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    elif "attention_mask" in named:
        real = named["attention_mask"].detach().cpu().numpy() > 0
        lengths = real.sum(axis=1).astype(np.float64)
    else:
        real = ids != tokenizer.pad_id
        lengths = real.sum(axis=1).astype(np.float64)
    out = {"length": lengths}
    unk = getattr(tokenizer, "unk_id", None)
    if unk is not None:
        out["unknown_rate"] = ((ids == unk) & real).sum(axis=1) / np.maximum(lengths, 1.0)
    return out


def require_text(texts: list[str]) -> list[str]:
    """A 400 for an empty (or whitespace-only) text: the model would answer padding alone."""
    for i, t in enumerate(texts):
        if not t.strip():
            raise InvalidInput("text is empty" if len(texts) == 1 else f"text {i} of {len(texts)} is empty")
    return texts


class TextInputs:
    """Mixin for text handlers: one example per text, from a body or a BYTES ``text`` tensor;
    an empty text is a 400."""

    example_noun = "texts"

    def examples_from_body(self, body: Any) -> list:
        texts, as_list = texts_from_body(body)
        return [(t, as_list) for t in require_text(texts)]

    def examples_from_tensors(self, tensors: dict) -> list:
        name, arr = self.input_tensor(tensors, ("text",))
        return [(t, True) for t in require_text(texts_from_tensors(arr, name))]
