"""A conditional VAE for 8x8 digits: the encoder is for training, the decoder is served."""

import torch
from torch import nn


class DigitsEncoder(nn.Module):
    """x (N x 64, values 0..1) and class ids -> mean and log-variance of z."""

    def __init__(self, latent: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.label = nn.Embedding(classes, 16)
        self.net = nn.Sequential(nn.Linear(64 + 16, 128), nn.ReLU(), nn.Linear(128, 2 * latent))

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(torch.cat([x, self.label(cls)], dim=1)).chunk(2, dim=1)
        return mu, logvar


class DigitsDecoder(nn.Module):
    """z (N x latent) and class ids (N) -> images N x 8 x 8 with values in 0..1."""

    def __init__(self, latent: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.label = nn.Embedding(classes, 16)
        self.net = nn.Sequential(nn.Linear(latent + 16, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid())

    def forward(self, z: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.label(cls)], dim=1)).reshape(-1, 8, 8)
