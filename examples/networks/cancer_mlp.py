"""An MLP for the 30 breast-cancer features (standardized) -> 2 class logits."""

import torch
from torch import nn


class CancerMLP(nn.Module):
    def __init__(self, features: int = 30, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU(),
                                 nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
