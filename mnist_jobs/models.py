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


class CNN(nn.Module):
    """The tutorials' small CNN (two conv blocks, dropout, two linear layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training)
        return self.fc2(x)


MODELS = {"logreg": LogReg, "cnn": CNN}


def build_model(name: str) -> nn.Module:
    return MODELS[name]()
