"""An autoencoder for 8x8 digits (N x 64, values 0..1) with an 8-dimensional bottleneck."""

import torch
from torch import nn


class DigitsAutoencoder(nn.Module):
    def __init__(self, bottleneck: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, bottleneck))
        self.decoder = nn.Sequential(nn.Linear(bottleneck, 32), nn.ReLU(), nn.Linear(32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.reshape(x.shape[0], -1))).reshape(x.shape)
