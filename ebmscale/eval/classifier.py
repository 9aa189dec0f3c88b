"""A small CNN classifier of the real images: its penultimate layer is the feature space of a FID-style distance
and its logits give an IS-style score and the accuracy of conditional samples. Trained here on scikit-learn's
digits, made exactly as `tools/make_shards.py digits` makes the shards (same source, same resize, PNG)."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ebmscale.data.sources import digits
from ebmscale.data.writer import encode


class Classifier(nn.Module):
    def __init__(self, in_channels: int = 1, resolution: int = 16, num_classes: int = 10, width: int = 32,
                 features: int = 128):
        super().__init__()
        self.config = dict(in_channels=in_channels, resolution=resolution, num_classes=num_classes, width=width,
                           features=features)
        self.in_channels, self.resolution, self.key = in_channels, resolution, "classifier"
        conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*conv(in_channels, width), *conv(width, width), nn.MaxPool2d(2),
                                  *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(2 * width * (resolution // 4) ** 2, features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C, H, W] in [0, 1] -> (penultimate features [N, features], logits [N, num_classes])."""
        f = self.body(x)
        return f, self.head(f)


def digits_as_shards(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as the shard writer stores them: (x float32 [N, 1, size, size] in [0, 1], labels)."""
    items = digits().items
    x = [np.asarray(Image.open(io.BytesIO(encode(it, size, 1, "png", 95)[0]))) for it in items]
    return np.stack(x)[:, None].astype(np.float32) / 255, np.asarray([y for _, y in items], np.int64)


def _shift(x: torch.Tensor, g: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Random translations of up to `pixels` (zero fill), so the classifier does not hinge on exact placement."""
    n, _, h, w = x.shape
    p = F.pad(x, [pixels] * 4)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=g)
    return torch.stack([p[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0, held_out: float = 0.2,
                     log=print) -> tuple[Classifier, float]:
    """Adam on a seeded (1 - held_out) split with shifts and a little noise; returns (model, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    order = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * held_out)
    test, train = order[:n_test], order[n_test:]
    model = Classifier(x.shape[1], x.shape[2], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(64):
            xb = (_shift(x[idx], g) + 0.03 * torch.randn(x[idx].shape, generator=g)).clamp(0, 1)
            loss = F.cross_entropy(model(xb)[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            acc = accuracy(model, x[test], y[test]) if n_test else float("nan")
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    return model.eval(), acc


@torch.no_grad()
def predict(model: nn.Module, x, batch: int = 512) -> np.ndarray:
    model.eval()
    dev = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(x, np.float32))
    return torch.cat([model(b.to(dev))[1].argmax(1).cpu() for b in x.split(batch)]).numpy()


def accuracy(model: nn.Module, x, y) -> float:
    return float((predict(model, x) == np.asarray(y)).mean())


def save_classifier(model: Classifier, path, **info) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "ebmscale-classifier", "config": model.config, "state_dict": model.state_dict(), **info}, path)
    return path


def load_classifier(path, device: str | torch.device = "cpu") -> Classifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--classifier {path}: no such file; make one with "
                                f"`python tools/evaluate.py digits-classifier {path}`")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("kind") != "ebmscale-classifier":
        raise ValueError(f"--classifier {path}: not a classifier written by tools/evaluate.py digits-classifier")
    model = Classifier(**ck["config"])
    model.load_state_dict(ck["state_dict"])
    model.key = "classifier-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # names its cached statistics
    return model.to(device).eval()
