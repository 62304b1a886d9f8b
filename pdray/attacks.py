"""The paper's attacks (Appendix A) in integer pixel space.

Every attack takes uint8 NHWC images and returns uint8 NHWC images inside the L-inf
eps_attack ball (eps_attack in 0..255 units). FGSM, BIM, DeepFool and CW run through
foolbox on a [0, 1] view of the classifier, so foolbox's default step sizes and CW
constants keep their meaning; DeepFool and CW are minimal-perturbation attacks, so
their result is clipped to the eps ball as the paper does, and rounded away from the
original pixel so that sub-level changes survive the move to integer pixels. Where they find
no adversarial example, the result is the original image. RAND is the integer uniform noise
of Appendix A.

BPDA (Athalye et al. 2018) goes beyond the paper: BIM against the classifier *behind* a
defense, with the defense's backward pass approximated by the identity.

``adversarial_batch`` is the training-time generator for adversarial training: it
draws one eps per image (foolbox takes one eps per call) and attacks the model's own
predictions (Appendix C), so it is written directly in torch.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import foolbox as fb
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pdray.config import Attack, check_eps, parse_attack
from pdray.errors import PdrayError
from pdray.pixels import check_images, to_nchw


def bim_steps(eps_attack: int) -> int:
    """Kurakin et al.'s iteration count, floor(min(eps + 4, 1.25 eps)), with alpha = 1."""
    return int(math.floor(min(eps_attack + 4, 1.25 * eps_attack)))


# Changes up to this many levels are float noise, not perturbations, when rounding outward.
# Measured: foolbox's CW maps images through tanh space (x -> arctanh(0.999999 (2x - 1)) and
# back, in float32), which moves an unchanged pixel by up to 1.37e-4 of a level (at value
# 254; 6.4e-5 on average over 0..255); the float32 [0, 1] view alone moves it by up to 7.6e-6.
# 1e-3 is seven times the largest of these, and a thousandth of a level.
ROUNDING_TOLERANCE = 1e-3


def project(images: np.ndarray, adversarial: np.ndarray, eps_attack: int,
            outward: bool = False) -> np.ndarray:
    """Round float pixels to integers inside the eps ball around ``images`` and in 0..255.

    ``outward`` rounds each change away from the original pixel instead of to the nearest
    integer: minimal-perturbation attacks (DeepFool, CW) change many sub-pixels by less
    than half a level, which nearest rounding would undo. A change within
    ``ROUNDING_TOLERANCE`` of a whole number of levels counts as that number, so float
    noise on an unchanged pixel stays no change. Arithmetic is in int64 so ``x - eps``
    never wraps around as it does in uint8.
    """
    x = images.astype(np.int64)
    adv = np.asarray(adversarial, dtype=np.float64)
    if outward:
        delta = adv - x
        adv = x + np.sign(delta) * np.ceil(np.abs(delta) - ROUNDING_TOLERANCE)
    adv = np.rint(adv).astype(np.int64)
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
    device = _device(model)
    return (to_nchw(images, device).float() / 255.0,
            torch.as_tensor(labels, dtype=torch.long, device=device))


def _foolbox(attack: fb.Attack, model: nn.Module, images: np.ndarray, labels: np.ndarray,
             eps: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Float 0..255 NHWC adversarial images and foolbox's success flag per image (is the
    returned image misclassified); eps None runs a minimisation attack unbounded."""
    model.eval()
    fmodel = fb.PyTorchModel(_UnitScale(model).eval(), bounds=(0, 1), device=_device(model))
    x, y = _to_unit(model, images, labels)
    raw, _, success = attack(fmodel, x, y, epsilons=None if eps is None else eps / 255.0)
    return (raw.detach().cpu().numpy().transpose(0, 2, 3, 1) * 255.0,
            success.detach().cpu().numpy().astype(bool))


def _found_or_original(images: np.ndarray, raw: np.ndarray, found: np.ndarray) -> np.ndarray:
    """A minimisation attack's result where it found an adversarial example, else the
    original image: its output there is its starting point or a failed last iterate."""
    return np.where(found[:, None, None, None], raw, images.astype(np.float64))


def rand(model, images, labels, eps_list, *, seed=0, image_ids=None) -> list[np.ndarray]:
    """X + U{-eps, ..., eps} per sub-pixel, clipped to valid pixels. With ``image_ids``
    each image's noise depends only on (seed, image id, eps), not on its batch."""
    out = []
    for eps in eps_list:
        if image_ids is None:
            noise = np.random.default_rng([seed, eps]).integers(
                -eps, eps, size=images.shape, endpoint=True)
        else:
            noise = np.stack([np.random.default_rng([seed, int(i), eps]).integers(
                -eps, eps, size=images.shape[1:], endpoint=True) for i in image_ids])
        out.append(project(images, images.astype(np.int64) + noise, eps))
    return out


def fgsm(model, images, labels, eps_list) -> list[np.ndarray]:
    attack = fb.attacks.LinfFastGradientAttack(random_start=False)
    return [project(images, _foolbox(attack, model, images, labels, e)[0], e) for e in eps_list]


def bim(model, images, labels, eps_list) -> list[np.ndarray]:
    return [project(images, _foolbox(fb.attacks.LinfBasicIterativeAttack(
        abs_stepsize=1 / 255.0, steps=bim_steps(e), random_start=False),
        model, images, labels, e)[0], e) for e in eps_list]


def deepfool(model, images, labels, eps_list, *, deepfool_steps=50) -> list[np.ndarray]:
    """L2 DeepFool (the original formulation), run once, then clipped to each L-inf ball.
    An image it does not fool within its steps stays as it is, not its last iterate."""
    raw, found = _foolbox(fb.attacks.L2DeepFoolAttack(steps=deepfool_steps, candidates=10),
                          model, images, labels, None)
    raw = _found_or_original(images, raw, found)
    return [project(images, raw, e, outward=True) for e in eps_list]


def cw(model, images, labels, eps_list, *, cw_steps=50,
       cw_binary_search_steps=3) -> list[np.ndarray]:
    """L2 Carlini-Wagner, run once, then clipped to each L-inf ball. Far fewer steps than
    the CW paper's 10,000 x 9, with a larger step size and initial constant to make up:
    the clip to a small eps ball makes long optimisation moot.

    foolbox's CW starts its result as a black image and returns that where it finds no
    adversarial example; its success flag then only says whether the black image is
    misclassified. So a result that is still exactly black also counts as not found (a
    found one would need every sub-pixel's tanh to saturate to -1 in float32), and the
    image stays as it is instead of being darkened to max(x - eps, 0)."""
    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=cw_binary_search_steps, steps=cw_steps, stepsize=0.05,
        initial_const=1.0)
    raw, success = _foolbox(attack, model, images, labels, None)
    found = success & raw.reshape(len(raw), -1).any(axis=1)
    raw = _found_or_original(images, raw, found)
    return [project(images, raw, e, outward=True) for e in eps_list]


def bpda(model, images, labels, eps_list, *, defend: Callable[[np.ndarray], np.ndarray] | None = None,
         bpda_steps: int | None = None) -> list[np.ndarray]:
    """BPDA on ``defend`` (uint8 NHWC -> uint8 NHWC) followed by the classifier: BIM's
    schedule (alpha = 1, Kurakin's step count unless ``bpda_steps`` is given) with each
    step's gradient taken at the defended image, as if the defense were the identity
    (Athalye et al. 2018); more steps check that the attack has converged. An image
    stops moving once its defended version is misclassified, so it is not purified again.
    PixelDefend and feature squeezing are deterministic, so one sample per step is exact
    and EOT (averaging gradients over the defense's randomness) has nothing to average."""
    if defend is None:
        raise PdrayError("The bpda attack needs a defense to attack through; run it in the "
                         "evaluation pipeline (pdray eval --attacks bpda).")
    out = []
    for eps in eps_list:
        x = images.astype(np.int64)
        lo, hi = np.maximum(x - eps, 0), np.minimum(x + eps, 255)
        adv, active = x.copy(), np.ones(len(x), bool)
        for _ in range(bpda_steps or bim_steps(eps)):
            idx = np.nonzero(active)[0]
            if not len(idx):
                break
            defended, y = _to_unit(model, defend(adv[idx].astype(np.uint8)), labels[idx])
            defended.requires_grad_(True)
            model.eval()
            logits = _UnitScale(model)(defended)
            grad, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), defended)
            fooled = (logits.argmax(1) != y).cpu().numpy()
            active[idx[fooled]] = False
            step = grad.sign().cpu().numpy().transpose(0, 2, 3, 1).astype(np.int64)
            moving = idx[~fooled]
            adv[moving] = np.clip(adv[moving] + step[~fooled], lo[moving], hi[moving])
        out.append(adv.astype(np.uint8))
    return out


ATTACKS = {Attack.RAND: rand, Attack.FGSM: fgsm, Attack.BIM: bim,
           Attack.DEEPFOOL: deepfool, Attack.CW: cw, Attack.BPDA: bpda}
# Each attack's keyword options (seed, cw_steps, ...), read from its signature.
OPTIONS = {a: [p.name for p in inspect.signature(fn).parameters.values()
               if p.kind is p.KEYWORD_ONLY] for a, fn in ATTACKS.items()}


def attack_many(name: str | Attack, model: nn.Module, images: np.ndarray, labels: np.ndarray,
                eps_list: list[int], **options) -> list[np.ndarray]:
    """One attack at several eps_attack on a uint8 NHWC batch; each result is uint8 inside
    its eps ball. Minimisation attacks run once and are clipped to each eps. ``options``
    may hold any attack's options, so one set serves every attack: each gets those it
    takes, and a name that no attack takes is an error."""
    name = parse_attack(name)
    unknown = set(options) - {o for names in OPTIONS.values() for o in names}
    if unknown:
        raise TypeError(f"unknown attack option(s) {', '.join(sorted(unknown))}; the attacks "
                        f"take {', '.join(sorted({o for v in OPTIONS.values() for o in v}))}")
    eps_list = [check_eps(e) for e in eps_list]
    check_images(images)
    todo = sorted({e for e in eps_list if e > 0})
    mine = {k: v for k, v in options.items() if k in OPTIONS[name]}
    done = dict(zip(todo, ATTACKS[name](model, images, labels, todo, **mine))) \
        if todo and len(images) else {}
    return [done.get(e, images.copy()) for e in eps_list]


def attack(name: str | Attack, model: nn.Module, images: np.ndarray, labels: np.ndarray,
           eps_attack: int, **options) -> np.ndarray:
    """Run one attack at one eps_attack on a uint8 NHWC batch."""
    return attack_many(name, model, images, labels, [eps_attack], **options)[0]


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
