"""Scoring models on test images: classifier predictions and PixelCNN bits/dim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pdray import data, zoo
from pdray.cluster import torch_device
from pdray.errors import PdrayError


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 NHWC -> int64 NCHW on ``device`` (the PixelCNN's input; the classifiers
    take it as float)."""
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).long().to(device)


@torch.inference_mode()
def predict(model, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Class predictions for uint8 NHWC images."""
    device = next(model.parameters()).device
    out = [model(to_tensor(images[i:i + batch_size], device).float()).argmax(1).cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def bits_per_dim(model, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """PixelCNN bits/dim of each uint8 NHWC image."""
    device = next(model.parameters()).device
    out = [model.bpd(to_tensor(images[i:i + batch_size], device)).double().cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def model_metric(name: str, n_images: int, data_dir: str | Path | None = None) -> dict:
    """A shipped model's metric recomputed on the first ``n_images`` test images:
    accuracy for a classifier, bits/dim for a PixelCNN."""
    e = zoo.entry(name)
    d = data.load(e["dataset"], data_dir)
    if not 1 <= n_images <= len(d.test.labels):
        raise PdrayError(f"--n-images must be between 1 and {len(d.test.labels)}; got {n_images}.")
    model, _ = zoo.load(name, torch_device())
    images, labels = d.test.images[:n_images], d.test.labels[:n_images]
    if e["kind"] == "classifier":
        metric, value = "accuracy", float((predict(model, images) == labels).mean())
    else:
        metric, value = "bpd", float(bits_per_dim(model, images).mean())
    return {"name": name, "metric": metric, "value": value, "n_images": n_images,
            "data": d.name}
