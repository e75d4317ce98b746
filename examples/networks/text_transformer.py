"""A small Transformer encoder text classifier: token ids + attention mask -> class logits."""

import math

import torch
from torch import nn


class TextTransformer(nn.Module):
    def __init__(self, vocab_size: int = 2048, d_model: int = 64, heads: int = 4, layers: int = 2,
                 classes: int = 4, max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)
        self.scale = math.sqrt(d_model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.to(torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) * self.scale + self.pos(positions)[None]
        x = self.encoder(x, src_key_padding_mask=~keep)
        m = keep.unsqueeze(-1).to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))
