"""The tutorials' two models, written correctly: both return logits for CrossEntropyLoss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LogReg(nn.Module):
    """Multinomial logistic regression: Linear(784, 10) on flattened pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


DROPOUT_P = 0.5  # nn.Dropout2d() and F.dropout(), both p = 0.5


class CNN(nn.Module):
    """The tutorials' small CNN (two conv blocks, dropout, two linear layers).

    `forward(x, masks=noise)` applies given dropout noise instead of drawing it (see `cnn_noise`): a DDP
    rank passes its shard's slice of the global batch's noise, so that it drops what the one-process
    run drops for those samples.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = self.conv2(x)
        x = self.conv2_drop(x) if masks is None or not self.training else x * masks[0]
        x = F.relu(F.max_pool2d(x, 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training) if masks is None or not self.training else x * masks[1]
        return self.fc2(x)


def cnn_noise(batch: int, device: torch.device) -> list[torch.Tensor]:
    """The CNN's dropout noise for one training step of `batch` samples, drawn by the very calls its
    forward makes, in its order, from the default generator: `F.dropout2d` on (B, 20, 8, 8) draws
    (B, 20, 1, 1), then `F.dropout` on (B, 50) (the fused kernel on CUDA). Applied to ones, each
    returns its noise: 0 or 1 / (1 - p). Row i is sample i's: a shard takes its rows."""
    return [
        F.dropout2d(torch.ones(batch, 20, 1, 1, device=device), DROPOUT_P, True),
        F.dropout(torch.ones(batch, 50, device=device), DROPOUT_P, True),
    ]


MODELS = {"logreg": LogReg, "cnn": CNN}


def build_model(name: str) -> nn.Module:
    return MODELS[name]()
