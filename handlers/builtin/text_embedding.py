"""``text_embedding``: text -> ``{"embedding": [...]}`` from a Transformer encoder.

The encoder (e.g. the BERT of all-MiniLM-L6-v2, as model file + safetensors) is called
with ``handler.model_inputs`` (default ``[input_ids, attention_mask, token_type_ids]``)
and returns token states (N x L x H; a tuple's or dict's first/``last_hidden_state``).
Token states are pooled over the attention mask (``pooling: mean`` -- the default --,
``cls`` or ``max``) and L2-normalized unless ``normalize: false``: the sentence-transformers
recipe, so embeddings match it.

A body is plain text, a JSON string or ``{"text": "..."}`` (answered ``{"embedding": [...]}``),
or a list of strings (answered ``{"embeddings": [[...], ...]}``). Open Inference Protocol:
input ``text`` (BYTES), output ``embedding`` (FP32, N x H).
"""

from __future__ import annotations

from typing import Any

from .common import BuiltinHandler, tensor
from .text import TextInputs, TextTokenizer, first_output, model_inputs_from, text_statistics

__all__ = ["TextEmbedding", "pool"]

POOLINGS = ("mean", "cls", "max")


def pool(states: Any, mask: Any, how: str) -> Any:
    """Sentence vectors from token states (N x L x H) and the attention mask (N x L)."""
    import torch

    if how == "cls":
        return states[:, 0]
    m = mask.unsqueeze(-1).to(states.dtype)
    if how == "max":
        return states.masked_fill(m == 0, torch.finfo(states.dtype).min).max(dim=1).values
    return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextEmbedding(TextInputs, BuiltinHandler):
    def initialize(self, context: Any) -> None:
        super().initialize(context)
        self.tokenizer = TextTokenizer(context.system_properties["model_dir"], self.config)
        self.model_inputs = model_inputs_from(self.config, ("input_ids", "attention_mask", "token_type_ids"))
        self.pooling = str(self.config.get("pooling", "mean")).lower()
        if self.pooling not in POOLINGS:
            raise ValueError(f"model-config.yaml handler.pooling must be one of {', '.join(POOLINGS)}")
        self.normalize = bool(self.config.get("normalize", True))
        self.dim = int(self.config.get("dimension", -1))

    def tensor_metadata(self) -> dict:
        return {"inputs": [tensor("text", "BYTES", [-1])], "outputs": [tensor("embedding", "FP32", [-1, self.dim])]}

    def collate(self, examples: list) -> Any:
        import torch

        padded = self.tokenizer.pad(self.tokenizer.ids([t for t, _ in examples]))
        mask = torch.from_numpy(padded["attention_mask"]).to(self.device)
        args = [torch.from_numpy(padded[n]) if n == "lengths" else torch.from_numpy(padded[n]).to(self.device)
                for n in self.model_inputs]
        return args, mask

    def forward(self, batch: Any) -> dict:
        import torch

        args, mask = batch
        states = first_output(self.inference(*args)).float()
        vectors = pool(states, mask, self.pooling)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return {"embedding": vectors.cpu().numpy()}

    # --- monitoring (handlers/monitoring.py) ------------------------------------------------
    monitor_task = "embedding"
    monitor_layer = False  # the sentence embedding is given below, no hook inside the encoder

    def monitor_features(self, inputs: Any, outputs: Any) -> dict:
        """``length``, ``unknown_rate`` and the sentence ``embedding`` as answered (pooled)."""
        import torch

        out = text_statistics(self.tokenizer, self.model_inputs, inputs)
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        named = dict(zip(self.model_inputs, args))
        states = first_output(outputs).float()
        if "attention_mask" in named:
            mask = named["attention_mask"]
        else:
            mask = (named["input_ids"] != self.tokenizer.pad_id).to(torch.int64)
        vectors = pool(states, mask.to(states.device), self.pooling)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        out["embedding"] = vectors
        return out

    def answer(self, outputs: dict, examples: list, idx: int) -> Any:
        vectors = outputs["embedding"]
        if examples[0][1]:
            return {"embeddings": vectors.tolist()}
        return {"embedding": vectors[0].tolist()}
