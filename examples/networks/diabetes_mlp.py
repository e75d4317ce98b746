"""An MLP for the 10 diabetes features (standardized) -> disease progression (standardized)."""

import torch
from torch import nn


class DiabetesMLP(nn.Module):
    def __init__(self, features: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
