"""The tutorials' own pipeline, kept as the baseline every benchmark compares against.

torchvision MNIST with `transforms.ToTensor()` per sample, a shuffling DataLoader (batch 100), the model,
CrossEntropyLoss, SGD, and a test-set evaluation through a DataLoader every 500 iterations — as written
in the logistic-regression / CNN tutorials (with their typos fixed).
"""

from __future__ import annotations

import time

import torch
import torchvision.datasets as dsets
import torchvision.transforms as transforms
from torch import nn
from torch.utils.data import DataLoader

from mnist_jobs.data import prepare
from mnist_jobs.models import build_model


def tutorial_train(
    *,
    model: str = "logreg",
    lr: float = 0.001,
    momentum: float = 0.0,
    seed: int = 0,
    iters: int = 3000,
    batch_size: int = 100,
    eval_every: int = 500,
) -> dict:
    """Train like the tutorial; return test accuracy (%), loop seconds and data-setup seconds."""
    t0 = time.perf_counter()
    root = str(prepare())
    torch.manual_seed(seed)
    train_dataset = dsets.MNIST(root=root, train=True, transform=transforms.ToTensor(), download=False)
    test_dataset = dsets.MNIST(root=root, train=False, transform=transforms.ToTensor(), download=False)
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(test_dataset, batch_size=batch_size, shuffle=False)
    net = build_model(model)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    setup_s = time.perf_counter() - t0

    def test_accuracy() -> float:
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                outputs = net(images)
                predicted = outputs.argmax(1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        net.train()
        return 100.0 * correct / total

    t1 = time.perf_counter()
    it = 0
    accuracy = None
    num_epochs = -(-iters // len(train_loader))
    for _epoch in range(num_epochs):
        for images, labels in train_loader:
            if it == iters:
                break
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            it += 1
            if it % eval_every == 0 or it == iters:
                accuracy = test_accuracy()
    loop_s = time.perf_counter() - t1
    return {"test_accuracy": accuracy, "loop_s": loop_s, "setup_s": setup_s, "iters": it}
