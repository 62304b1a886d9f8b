"""Training steps without Ray: the Table 1 classifier recipes (Appendix C) and the
PixelCNN's maximum likelihood with averaged weights. pdray.train's Ray Train worker loops
are a shell around these; tests run them on the CPU as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from pdray import attacks
from pdray.config import ClassifierConfig, PixelCNNConfig, Recipe


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """Worker ``rank`` of ``world``'s share of a seeded per-epoch permutation of n images:
    (step in the epoch, image indices), ``batch_size // world`` images a step."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    local = max(1, batch_size // world)
    for s in range(n // batch_size):
        yield s, perm[s * batch_size:(s + 1) * batch_size][rank * local:(rank + 1) * local]


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random shifts (reflect padding + crop) and horizontal flips, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        out[mask] = out[mask].flip(3)
    return out


def noisy(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Integer pixels plus Gaussian noise of ``std`` levels, rounded and clipped to 0..255
    (the CIFAR-10 ablation's texture control; pdray.ablation)."""
    n = torch.randn(x.shape, generator=gen).to(x.device) * std
    return (x + n).round().clamp(0, 255).to(x.dtype)


# ---- classifiers ---------------------------------------------------------------------------

def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against targets 1 - smoothing on the label and smoothing / (n - 1) on
    every other class (Warde-Farley & Goodfellow's label smoothing)."""
    n = logits.shape[1]
    target = torch.full_like(logits, smoothing / (n - 1))
    target.scatter_(1, y[:, None], 1 - smoothing)
    return torch.sum(-target * F.log_softmax(logits, 1), 1).mean()


def classifier_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ClassifierConfig,
                    gen: torch.Generator, core: nn.Module | None = None) -> torch.Tensor:
    """One batch's loss under ``cfg.recipe``: float 0..255 NCHW pixels ``x``, labels ``y``.
    Adversarial training replaces the first ``adv_fraction`` of the batch with FGSM or BIM
    images of ``core`` (the model itself, unwrapped from DistributedDataParallel), each at
    its own eps; label smoothing softens the targets."""
    recipe = Recipe(cfg.recipe)
    if recipe in (Recipe.ADV_FGSM, Recipe.ADV_BIM):
        k = int(len(x) * cfg.adv_fraction)
        eps = attacks.sample_eps(k, gen)
        x = x.clone()
        x[:k] = attacks.adversarial_batch(core or model, x[:k], eps, recipe is Recipe.ADV_BIM)
    logits = model(x)
    if recipe is Recipe.LABEL_SMOOTHING:
        return smoothed_cross_entropy(logits, y, cfg.smoothing)
    return F.cross_entropy(logits, y)


def sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def classifier_optimizer(model: nn.Module, cfg: ClassifierConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                           weight_decay=cfg.weight_decay)


# ---- the PixelCNN --------------------------------------------------------------------------

class BitsPerDim(nn.Module):
    """The PixelCNN's training objective as a module: DDP syncs gradients through a
    module's forward, and the head's ``log_prob`` is far cheaper than its 256-way logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, context=None):  # (B, C, H, W) 0..255 -> (B,) bits per dimension
        return self.model.bpd(x, context)


def averaged(model: nn.Module, cfg: PixelCNNConfig) -> AveragedModel:
    """Polyak averaging of ``model``'s weights with decay min(cfg.ema, (1 + n) / (10 + n))
    after n updates: early weights fade fast."""
    def ema_avg(average, current, n):
        decay = min(cfg.ema, (1.0 + float(n)) / (10.0 + float(n)))
        return decay * average + (1 - decay) * current

    return AveragedModel(model, avg_fn=ema_avg, use_buffers=True)


def pixelcnn_step(objective: nn.Module, core: nn.Module, ema: AveragedModel,
                  opt: torch.optim.Optimizer, x: torch.Tensor, step: int,
                  cfg: PixelCNNConfig, context: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One maximum-likelihood step on pixels ``x`` (each conditioned on ``context`` if
    given, else on ``x``): Adam at cfg.lr * cfg.lr_decay ** step,
    the gradient clipped to cfg.grad_clip (0: off), then the average updated. ``objective``
    is BitsPerDim around ``core`` (wrapped for DDP, compiled, or neither). Returns the
    batch's mean bits/dim and the gradient norm before clipping."""
    core.train()
    for g in opt.param_groups:
        g["lr"] = cfg.lr * cfg.lr_decay ** step
    loss = objective(x, context).mean()  # through the wrapped module, so DDP syncs
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    ema.update_parameters(core)
    return loss, grad_norm
