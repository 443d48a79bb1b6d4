"""Regularize a model you already have with droptune.apply, then train it for a few epochs.

Run: python examples/apply_to_your_model.py
Uses scikit-learn's 8x8 digits (ships with scikit-learn; nothing is downloaded).
"""

from __future__ import annotations

from sklearn.datasets import load_digits
import torch
from torch import nn

import droptune
from droptune.layers import max_norm_
from droptune.layers import mc_predict


class MyNet(nn.Module):
    """A user's own small CNN, with dropout placeholders where regularization should be tuned."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Dropout2d(0.0),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(0.0),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(32 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_val, y_val = x[:1400], y[:1400], x[1400:], y[1400:]

    regularization = droptune.RegularizationConfig.from_dict(
        {
            "dropout": {"kind": "spatial", "conv_rate": 0.1, "hidden_rate": 0.3},
            "l2": {"strength": 1e-4, "mode": "decoupled"},
            "max_norm": 3.0,
        }
    )
    model, report = droptune.apply(MyNet(), regularization, example_input=x[:2])
    print(report)

    optimizer = torch.optim.AdamW(droptune.param_groups(model, regularization.l2), lr=3e-3)
    for epoch in range(5):
        model.train()
        for idx in torch.randperm(len(x_train)).split(64):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert regularization.max_norm is not None
            max_norm_(model, regularization.max_norm)
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        print(f"epoch {epoch}: val_acc={accuracy:.3f}")

    mean, var = mc_predict(model, x_val[:5], samples=30, transform=lambda z: z.softmax(-1))
    std = var.gather(1, mean.argmax(1, keepdim=True)).sqrt().flatten()
    print("MC-dropout predictive std of the predicted class:", [round(v, 3) for v in std.tolist()])


if __name__ == "__main__":
    main()
