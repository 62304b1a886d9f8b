"""Pixel space: uint8 0..255 NHWC numpy arrays at every boundary of pdray, NCHW tensors
inside the models. The one place that converts between the two."""

from __future__ import annotations

import numpy as np
import torch

from pdray.errors import PdrayError


def to_nchw(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> int64 (N, C, H, W) on ``device``; ``.float()`` it for a
    classifier, which takes 0..255 floats."""
    return torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.long, device=device)


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    """Integer (N, C, H, W) in 0..255 -> uint8 (N, H, W, C) numpy."""
    return x.cpu().numpy().transpose(0, 2, 3, 1).astype(np.uint8)


def check_images(images: np.ndarray, channels: int | None = None) -> np.ndarray:
    """``images`` if they are uint8 (N, H, W, C) (with ``channels`` channels), else a
    PdrayError that says what they are."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
            else type(images).__name__
        raise PdrayError(f"Images must be a uint8 array shaped (N, H, W, C); got {got}.")
    if channels is not None and images.shape[-1] != channels:
        raise PdrayError(f"The model expects {channels}-channel images; these have "
                         f"{images.shape[-1]} channels (shape {images.shape}).")
    return images
