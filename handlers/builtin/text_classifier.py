"""``text_classifier``: text -> ``{label: probability}`` (RNN/LSTM/GRU or Transformer models).

Every request of a batch is tokenized with the archive's tokenizer (see :mod:`.text`),
the batch is padded to its longest text and run in one forward pass. The model is called
with the tensors ``handler.model_inputs`` names, in order: ``[input_ids, lengths]`` (the
default; RNNs pack with the lengths) or ``[input_ids, attention_mask]`` (Transformers),
and returns one row of logits per text. Labels come from ``index_to_name.json``.

model-config.yaml::

    handler:
      model_inputs: [input_ids, attention_mask]
      max_length: 128
      topk: 3          # default: every class

A body is plain text, a JSON string, ``{"text": "..."}``, or a list of strings (answered
with a list). Open Inference Protocol: input ``text`` (BYTES), output ``probabilities``.
"""

from __future__ import annotations

from typing import Any

from .common import BuiltinHandler, read_labels, tensor, topk_labels
from .text import TextInputs, TextTokenizer, first_output, model_inputs_from, text_statistics

__all__ = ["TextClassifier"]


class TextClassifier(TextInputs, BuiltinHandler):
    default_inputs = ("input_ids", "lengths")

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        model_dir = context.system_properties["model_dir"]
        self.tokenizer = TextTokenizer(model_dir, self.config)
        self.model_inputs = model_inputs_from(self.config, self.default_inputs)
        self.labels = read_labels(model_dir)
        self.topk = int(self.config.get("topk", len(self.labels) if self.labels else 5))

    def tensor_metadata(self) -> dict:
        n = len(self.labels) if self.labels else -1
        return {"inputs": [tensor("text", "BYTES", [-1])], "outputs": [tensor("probabilities", "FP32", [-1, n])]}

    def collate(self, examples: list) -> Any:
        import torch

        padded = self.tokenizer.pad(self.tokenizer.ids([t for t, _ in examples]))
        return [torch.from_numpy(padded[n]) if n == "lengths" else self.prepare(torch.from_numpy(padded[n]))
                for n in self.model_inputs]

    def forward(self, batch: Any) -> dict:
        import torch

        logits = first_output(self.inference(*batch))
        return {"probabilities": torch.softmax(logits.float(), dim=-1).cpu().numpy()}

    # --- monitoring (handlers/monitoring.py): logits -> softmax; the embedding is the input of
    # the classifier's last Linear layer (the pooled / final hidden state)
    monitor_task = "classification"
    monitor_logits = True

    def monitor_features(self, inputs: Any, outputs: Any) -> dict:
        """``length`` in tokens and ``unknown_rate``."""
        return text_statistics(self.tokenizer, self.model_inputs, inputs)

    def answer(self, outputs: dict, examples: list, idx: int) -> Any:
        probs = outputs["probabilities"]
        answers = [topk_labels(p, self.labels, self.topk) for p in probs]
        return answers if examples[0][1] else answers[0]
