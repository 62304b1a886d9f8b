"""The paper's classifiers (Appendix G): a 62-layer ResNet and a 16-layer VGG.

Both take float pixels in 0..255, NCHW, and normalise inside, so attacks, defenses and
the PixelCNN all share the one integer pixel space.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pdray.config import Arch
from pdray.errors import parse_choice
from pdray.pixels import to_nchw


class Normalize(nn.Module):
    """0..255 pixels -> zero mean, unit variance, with per-channel statistics."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):  # (B, C, H, W) in 0..255
        return (x - self.mean) / self.std


class ResidualUnit(nn.Module):
    """Pre-activation unit; a strided unit halves the map and pads the shortcut's channels
    with zeros after average pooling, as in Appendix G ("average pooling & padding")."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        h = self.conv1(F.leaky_relu(self.bn1(x), 0.1))
        h = self.conv2(F.leaky_relu(self.bn2(h), 0.1))
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x + h


class ResNet(nn.Module):
    """1 conv + 3 stages x 10 units x 2 convs + 1 fc = 62 layers, 16/32/64 filters."""

    def __init__(self, channels: int, mean: list[float], std: list[float], units: int = 10,
                 num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(units):
                layers.append(ResidualUnit(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.units = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):  # (B, C, H, W) in 0..255 -> (B, classes) logits
        h = self.units(self.stem(self.normalize(x)))
        h = F.leaky_relu(self.bn(h), 0.1).mean(dim=(2, 3))  # (B, 64)
        return self.fc(h)


class VGG(nn.Module):
    """Appendix G.2 as listed (9 convs and 2 fc layers): conv16 | conv128 x2 | conv512 x3 | conv512 x3, each block followed by
    max pooling, then dropout-fc512-dropout-fc10 (the dropout is what makes it more robust)."""

    def __init__(self, channels: int, mean: list[float], std: list[float], image_size: int,
                 num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers, c_in, size = [], channels, image_size
        for c_out, n in ((16, 1), (128, 2), (512, 3), (512, 3)):
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(512 * size * size, 512),
            nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(512, num_classes))

    def forward(self, x):  # (B, C, H, W) in 0..255 -> (B, classes) logits
        return self.classifier(self.features(self.normalize(x)))


def build(arch: str | Arch, shape: tuple[int, int, int], mean: list[float],
          std: list[float], **options) -> nn.Module:
    """A classifier for images of ``shape`` (H, W, C) whose pixels have these channel
    stats; ``options`` shrink the network for tests (ResNet ``units``)."""
    arch = parse_choice(Arch, arch, "classifier architecture")
    h, _, c = shape
    if arch is Arch.RESNET:
        return ResNet(c, mean, std, **options)
    return VGG(c, mean, std, image_size=h, **options)


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Class predictions for uint8 NHWC images."""
    device = next(model.parameters()).device
    out = [model(to_nchw(images[i:i + batch_size], device).float()).argmax(1).cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
