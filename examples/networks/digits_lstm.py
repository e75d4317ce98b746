"""An LSTM that reads an 8x8 digit image row by row (8 steps of 8 pixels) -> 10 logits."""

import torch
from torch import nn


class DigitsLSTM(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], 8, 8)  # N x 1 x 8 x 8 -> N x steps x features
        _, (h, _) = self.lstm(rows)
        return self.head(h[-1])
