"""The paper's attacks (Appendix A) in integer pixel space.

Every attack takes uint8 NHWC images and returns uint8 NHWC images inside the L-inf
eps_attack ball (eps_attack in 0..255 units). FGSM, BIM, DeepFool and CW run through
foolbox on a [0, 1] view of the classifier, so foolbox's default step sizes and CW
constants keep their meaning; DeepFool and CW are minimal-perturbation attacks, so
their result is clipped to the eps ball as the paper does. RAND is the integer uniform
noise of Appendix A.

``adversarial_batch`` is the training-time generator for adversarial training: it
draws one eps per image (foolbox takes one eps per call) and attacks the model's own
predictions (Appendix C), so it is written directly in torch.
"""

from __future__ import annotations

import math
from enum import Enum

import foolbox as fb
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pdray.errors import PdrayError


class Attack(str, Enum):
    RAND = "rand"
    FGSM = "fgsm"
    BIM = "bim"
    DEEPFOOL = "deepfool"
    CW = "cw"


def parse_attack(name: str | Attack) -> Attack:
    try:
        return Attack(name)
    except ValueError:
        raise PdrayError(f"Unknown attack {name!r}: choose from "
                         f"{', '.join(a.value for a in Attack)}.") from None


def check_eps(eps: int, what: str = "eps_attack") -> int:
    if isinstance(eps, float) and not eps.is_integer() or not 0 <= eps <= 255:
        raise PdrayError(f"{what} must be a whole number of pixel levels in 0..255; got {eps}.")
    return int(eps)


def bim_steps(eps_attack: int) -> int:
    """Kurakin et al.'s iteration count, floor(min(eps + 4, 1.25 eps)), with alpha = 1."""
    return int(math.floor(min(eps_attack + 4, 1.25 * eps_attack)))


def project(images: np.ndarray, adversarial: np.ndarray, eps_attack: int) -> np.ndarray:
    """Round float pixels to integers inside the eps ball around ``images`` and in 0..255.

    Arithmetic is in int16 so ``x - eps`` never wraps around as it does in uint8.
    """
    x = images.astype(np.int16)
    adv = np.rint(np.asarray(adversarial, dtype=np.float64)).astype(np.int64)
    lo, hi = np.maximum(x - eps_attack, 0), np.minimum(x + eps_attack, 255)
    return np.clip(adv, lo, hi).astype(np.uint8)


class _UnitScale(nn.Module):
    """The classifier seen on [0, 1] inputs, the range foolbox's defaults assume."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x * 255.0)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_unit(model: nn.Module, images: np.ndarray, labels: np.ndarray):
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0
    return x.to(_device(model)), torch.as_tensor(labels, dtype=torch.long, device=_device(model))


def _foolbox(attack: fb.Attack, model: nn.Module, images: np.ndarray, labels: np.ndarray,
             eps_attack: int, minimal: bool) -> np.ndarray:
    model.eval()
    fmodel = fb.PyTorchModel(_UnitScale(model).eval(), bounds=(0, 1), device=_device(model))
    x, y = _to_unit(model, images, labels)
    # A minimisation attack runs unbounded; its result is clipped below (Appendix A).
    raw, _, _ = attack(fmodel, x, y, epsilons=None if minimal else eps_attack / 255.0)
    adv = raw.detach().cpu().numpy().transpose(0, 2, 3, 1) * 255.0
    return project(images, adv, eps_attack)


def rand(model, images, labels, eps_attack, *, seed=0, **_) -> np.ndarray:
    """X + U{-eps, ..., eps} per sub-pixel, clipped to valid pixels."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-eps_attack, eps_attack, size=images.shape, endpoint=True)
    return project(images, images.astype(np.int16) + noise, eps_attack)


def fgsm(model, images, labels, eps_attack, **_) -> np.ndarray:
    return _foolbox(fb.attacks.LinfFastGradientAttack(random_start=False),
                    model, images, labels, eps_attack, minimal=False)


def bim(model, images, labels, eps_attack, **_) -> np.ndarray:
    attack = fb.attacks.LinfBasicIterativeAttack(
        abs_stepsize=1 / 255.0, steps=bim_steps(eps_attack), random_start=False)
    return _foolbox(attack, model, images, labels, eps_attack, minimal=False)


def deepfool(model, images, labels, eps_attack, *, deepfool_steps=50, **_) -> np.ndarray:
    """L2 DeepFool (the original formulation), then clipped to the L-inf eps ball."""
    return _foolbox(fb.attacks.L2DeepFoolAttack(steps=deepfool_steps, candidates=10),
                    model, images, labels, eps_attack, minimal=True)


def cw(model, images, labels, eps_attack, *, cw_steps=100, cw_binary_search_steps=5,
       **_) -> np.ndarray:
    """L2 Carlini-Wagner, then clipped to the L-inf eps ball. Fewer steps than the CW
    paper's 10,000 x 9: the clip to a small eps ball makes long optimisation moot."""
    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=cw_binary_search_steps, steps=cw_steps, stepsize=0.01,
        initial_const=1e-2)
    return _foolbox(attack, model, images, labels, eps_attack, minimal=True)


ATTACKS = {Attack.RAND: rand, Attack.FGSM: fgsm, Attack.BIM: bim,
           Attack.DEEPFOOL: deepfool, Attack.CW: cw}


def attack(name: str | Attack, model: nn.Module, images: np.ndarray, labels: np.ndarray,
           eps_attack: int, **options) -> np.ndarray:
    """Run one attack on a uint8 NHWC batch; the result is uint8 in the eps_attack ball."""
    name, eps_attack = parse_attack(name), check_eps(eps_attack)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise PdrayError(f"Images must be uint8 NHWC; got {images.dtype} {images.shape}.")
    if eps_attack == 0 or len(images) == 0:
        return images.copy()
    return ATTACKS[name](model, images, labels, eps_attack, **options)


# ---- training-time adversarial examples (Appendix C) --------------------------------------

def sample_eps(n: int, generator: torch.Generator | None = None, delta: float = 8.0) -> torch.Tensor:
    """|N(0, delta)| truncated to [0, 2 delta] (redrawn, not clipped), one eps per image."""
    eps = torch.randn(n, generator=generator).abs() * delta
    while (bad := eps > 2 * delta).any():
        eps[bad] = torch.randn(int(bad.sum()), generator=generator).abs() * delta
    return eps


def adversarial_batch(model: nn.Module, x: torch.Tensor, eps: torch.Tensor,
                      iterative: bool) -> torch.Tensor:
    """FGSM (or BIM with alpha = 1 and Kurakin's step count) against the model's own
    predictions, on float 0..255 NCHW pixels, each image with its own eps; rounded to
    integers like every image the classifiers see at test time."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # predicted labels: no label leaking
    e = eps.view(-1, 1, 1, 1).to(x)
    lo, hi = (x - e).clamp(min=0), (x + e).clamp(max=255)
    steps = torch.tensor([bim_steps(float(v)) if iterative else 1 for v in eps], device=x.device)
    step_size = torch.ones_like(e) if iterative else e
    adv = x.clone()
    for i in range(int(steps.max()) if len(steps) else 0):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        active = (steps > i).view(-1, 1, 1, 1)
        adv = torch.where(active, adv.detach() + step_size * grad.sign(), adv.detach())
        adv = torch.max(torch.min(adv, hi), lo)
    model.train(was_training)
    return adv.round().detach()
