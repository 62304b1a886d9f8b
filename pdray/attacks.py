"""The paper's attacks (Appendix A) in integer pixel space.

Every attack takes uint8 NHWC images and returns uint8 NHWC images inside the L-inf
eps_attack ball (eps_attack in 0..255 units). FGSM, BIM, DeepFool and CW run through
foolbox on a [0, 1] view of the classifier (DeepFool in a cheaper loop of our own, step
for step foolbox's), so foolbox's default step sizes and CW constants keep their meaning;
DeepFool and CW are minimal-perturbation attacks, so their result is clipped to the eps
ball as the paper does, and rounded away from the original pixel so that sub-level changes
survive the move to integer pixels. Where they find no adversarial example, the result is
the original image. RAND is the integer uniform noise of Appendix A.

The adaptive attacks go beyond the paper. They attack the classifier *behind* one defense:
BPDA (Athalye et al. 2018) with the defense's backward pass approximated by the identity,
BPDA-soft with the gradient of a smooth stand-in for it (for PixelDefend, soft Algorithm
1: pdray.purify.soft_batch), both with a step-size schedule and the per-image worst case
over random restarts.

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

from pdray.config import Attack, EvalConfig, Schedule, check_eps, defaults, parse_attack
from pdray.errors import PdrayError, parse_choice
from pdray.pixels import check_images, to_nchw

_EVAL = defaults(EvalConfig)  # the adaptive attacks' defaults, as the pipeline's


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
            torch.tensor(labels, dtype=torch.long, device=device))


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


def _uniform_noise(shape, eps: int, seed: int, image_ids, *key: int) -> np.ndarray:
    """Integers U{-eps, ..., eps}, one per sub-pixel of ``shape`` (N, H, W, C). With
    ``image_ids`` each image's draw depends only on (seed, image id, eps, *key), not on its
    batch."""
    if image_ids is None:
        return np.random.default_rng([seed, eps, *key]).integers(-eps, eps, size=shape,
                                                                  endpoint=True)
    return np.stack([np.random.default_rng([seed, int(i), eps, *key]).integers(
        -eps, eps, size=shape[1:], endpoint=True) for i in image_ids])


def rand(model, images, labels, eps_list, *, seed=0, image_ids=None) -> list[np.ndarray]:
    """X + U{-eps, ..., eps} per sub-pixel, clipped to valid pixels. With ``image_ids``
    each image's noise depends only on (seed, image id, eps), not on its batch."""
    return [project(images, images.astype(np.int64)
                    + _uniform_noise(images.shape, eps, seed, image_ids), eps)
            for eps in eps_list]


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
    raw, found = l2_deepfool(model, images, labels, steps=deepfool_steps)
    raw = _found_or_original(images, raw, found)
    return [project(images, raw, e, outward=True) for e in eps_list]


def l2_deepfool(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int = 50,
                candidates: int = 10, overshoot: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """foolbox's ``L2DeepFoolAttack`` (logits loss), step for step on the same [0, 1] view,
    without the two costs of its batch loop: it runs one forward pass per candidate class
    (eagerpy cannot repeat only the backward pass, its comment says), and it steps every
    image until all are adversarial. Here one forward pass serves every candidate's
    backward pass, and an image leaves the batch once it is adversarial, where foolbox
    freezes it. So an image's iterates are foolbox's up to the float noise of the batch it
    is in, which foolbox's own results carry too (``pdray bench deepfool`` measures both
    loops and their difference). Returns what ``_foolbox`` does."""
    model.eval()
    net = _UnitScale(model).eval()
    x0, y = _to_unit(model, images, labels)
    with torch.no_grad():
        classes = net(x0).argsort(dim=-1).flip(-1)[:, :candidates]
    x, p_total = x0.clone(), torch.zeros_like(x0)
    todo = torch.arange(len(x0), device=x0.device)
    for _ in range(steps):
        xa = x[todo].requires_grad_(True)
        logits = net(xa)
        going = logits.argmax(-1) == y[todo]
        if not going.any():
            break
        rows, top = torch.arange(len(todo), device=x0.device), classes[todo]
        losses, grads = [], []
        for k in range(1, top.shape[1]):
            up = torch.zeros_like(logits)
            up[rows, top[:, k]], up[rows, top[:, 0]] = 1.0, -1.0
            losses.append(logits[rows, top[:, k]] - logits[rows, top[:, 0]])
            grads.append(torch.autograd.grad(logits, xa, up, retain_graph=k + 1 < top.shape[1])[0])
        losses, grads = torch.stack(losses, 1)[going].detach(), torch.stack(grads, 1)[going]
        distances = losses.abs() / (grads.flatten(2).square().sum(-1).sqrt() + 1e-8)
        best = distances.argmin(1)
        pick = torch.arange(len(best), device=x0.device)
        grad = grads[pick, best]
        scale = (distances[pick, best] + 1e-4) / (grad.flatten(1).square().sum(-1).sqrt() + 1e-8)
        todo = todo[going]
        p_total[todo] += scale[:, None, None, None] * grad
        x[todo] = (x0[todo] + (1.0 + overshoot) * p_total[todo]).clamp(0.0, 1.0)
    with torch.no_grad():
        success = net(x).argmax(-1) != y
    return (x.cpu().numpy().transpose(0, 2, 3, 1) * 255.0, success.cpu().numpy())


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


# ---- adaptive attacks: through a defense -------------------------------------------------

# What an adaptive attack reads from one evaluation of the defended classifiers: given the
# rows it evaluates (indices into the attack's batch, which say each row's classifier and
# label) and their images, per row the loss, whether it is misclassified, and (when asked)
# the loss's gradient by the input pixels, (n, H, W, C).
Evaluate = Callable[[np.ndarray, np.ndarray, bool],
                    tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _loss(models: list[nn.Module], owner: np.ndarray, x: torch.Tensor, defended: torch.Tensor,
          labels: np.ndarray, grad: bool):
    """Cross-entropy of each row's classifier (``models[owner]``) on ``defended`` (float
    NCHW 0..255), whether it is wrong, and the loss's gradient by ``x`` as NHWC numpy (None
    unless ``grad``)."""
    y = torch.tensor(labels, dtype=torch.long, device=x.device)
    loss = torch.zeros(len(y), device=x.device)
    wrong = np.zeros(len(y), bool)
    for k in np.unique(owner):
        rows = np.nonzero(owner == k)[0]
        at = torch.from_numpy(rows).to(x.device)
        models[k].eval()
        logits = models[k](defended[at].float())
        loss = loss.index_put((at,), F.cross_entropy(logits, y[at], reduction="none"))
        wrong[rows] = (logits.argmax(1) != y[at]).cpu().numpy()
    g = torch.autograd.grad(loss.sum(), x)[0].cpu().numpy().transpose(0, 2, 3, 1) if grad else None
    return loss.detach().double().cpu().numpy(), wrong, g


def _through(models: list[nn.Module], owner: np.ndarray, labels: np.ndarray,
             defend: Callable[[np.ndarray], np.ndarray]) -> Evaluate:
    """The classifiers behind ``defend``, its backward pass taken as the identity (BPDA)."""
    def evaluate(rows, adv, grad):
        x = to_nchw(defend(adv.astype(np.uint8)), _device(models[0])).float().requires_grad_(grad)
        return _loss(models, owner[rows], x, x, labels[rows], grad)
    return evaluate


def _through_surrogate(models: list[nn.Module], owner: np.ndarray, labels: np.ndarray,
                       surrogate: Callable[[torch.Tensor], torch.Tensor]) -> Evaluate:
    """The classifiers behind ``surrogate``: the defense's output, a smooth stand-in's gradient."""
    def evaluate(rows, adv, grad):
        x = to_nchw(adv.astype(np.uint8), _device(models[0])).float().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            return _loss(models, owner[rows], x, surrogate(x), labels[rows], grad)
    return evaluate


def _ascend(evaluate: Evaluate, rows: np.ndarray, x: np.ndarray, start: np.ndarray,
            eps: np.ndarray, steps: int, schedule: Schedule):
    """One run of sign-gradient ascent on the loss of the defended classifier, from
    ``start`` (int64 NHWC) inside each row's eps ball (``eps``, one per row) around ``x``:
    per row the first iterate that is misclassified, else the one with the highest loss;
    and whether it was misclassified, and its loss. ``steps`` steps, so steps + 1
    evaluations; ``rows`` are the rows' indices for ``evaluate``.

    Schedules, in whole levels (the defenses see integer pixels, so a step below one level
    is rounded away): CONSTANT is BIM's, one level per step. HALVING follows APGD (Croce &
    Hein 2020) without its momentum: it starts at eps_attack / 4 (sign steps cross the ball
    in four) and at every tenth of the steps, where the best loss has not risen since the
    last check, it halves the step and goes back to the best iterate. A purifier snaps
    nearby inputs to one output, so small steps early rarely change what the classifier
    sees; large steps first, then fine ones. An image that stalls at one level stops: from
    the same point the same step repeats the same path."""
    ball = eps[:, None, None, None]
    lo, hi = np.maximum(x - ball, 0), np.minimum(x + ball, 255)
    n = len(x)
    adv, best, best_grad = start.copy(), start.copy(), np.zeros(x.shape)
    best_loss, checked = np.full(n, -np.inf), np.full(n, -np.inf)
    fooled, active = np.zeros(n, bool), np.ones(n, bool)
    alpha = np.ones(n, np.int64) if schedule is Schedule.CONSTANT else np.maximum(1, eps // 4)
    grad = np.zeros(x.shape)
    check_every = max(1, steps // 10)
    for t in range(steps + 1):
        idx = np.nonzero(active)[0]
        if not len(idx):
            break
        loss, wrong, g = evaluate(rows[idx], adv[idx], t < steps)
        better = wrong | (loss > best_loss[idx])
        best[idx[better]], best_loss[idx[better]] = adv[idx[better]], loss[better]
        if g is not None:
            grad[idx] = g
            best_grad[idx[better]] = g[better]
        fooled[idx[wrong]] = True
        active[idx[wrong]] = False
        if t == steps:
            break
        if schedule is Schedule.HALVING and t > 0 and t % check_every == 0:
            stalled = active & (best_loss <= checked)
            active &= ~(stalled & (alpha == 1))
            back = stalled & active
            alpha[back] = np.maximum(alpha[back] // 2, 1)
            adv[back], grad[back] = best[back], best_grad[back]
            checked = best_loss.copy()
        m = np.nonzero(active)[0]
        step = alpha[m, None, None, None] * np.sign(grad[m]).astype(np.int64)
        adv[m] = np.clip(adv[m] + step, lo[m], hi[m])
    return best, fooled, best_loss


def _restarts(evaluate: Evaluate, images: np.ndarray, eps: np.ndarray, steps: int,
              restarts: int, schedule: Schedule, seed: int, image_ids: np.ndarray) -> np.ndarray:
    """The per-row worst case over ``restarts`` runs of ``_ascend`` (row r: ``images[r]``
    in its ball ``eps[r]``): the first run from the clean image (plain BPDA), the others
    from uniform points of the eps ball, seeded by (seed, image id, eps, restart) as RAND
    is. A row keeps the first run whose defended image is misclassified, else the run with
    the highest loss; once fooled it is not attacked again."""
    x = images.astype(np.int64)
    ball = eps[:, None, None, None]
    lo, hi = np.maximum(x - ball, 0), np.minimum(x + ball, 255)
    out, loss, fooled = x.copy(), np.full(len(x), -np.inf), np.zeros(len(x), bool)
    for r in range(restarts):
        todo = np.nonzero(~fooled)[0]
        if not len(todo):
            break
        start = x.copy()
        if r:
            for e in np.unique(eps):
                sel = np.nonzero(eps == e)[0]
                start[sel] = np.clip(x[sel] + _uniform_noise(x[sel].shape, int(e), seed,
                                                             image_ids[sel], r), lo[sel], hi[sel])
        adv, wrong, adv_loss = _ascend(evaluate, todo, x[todo], start[todo], eps[todo], steps,
                                       schedule)
        keep = wrong | (adv_loss > loss[todo])
        out[todo[keep]], loss[todo[keep]] = adv[keep], adv_loss[keep]
        fooled[todo[wrong]] = True
    return out.astype(np.uint8)


def through_defense(name: str | Attack, models: list[nn.Module], images: np.ndarray,
                    labels: np.ndarray, eps_list: list[int], *,
                    defend: Callable[[np.ndarray], np.ndarray] | None = None,
                    surrogate: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    bpda_steps: int = _EVAL["bpda_steps"],
                    bpda_restarts: int = _EVAL["bpda_restarts"],
                    bpda_schedule: str = _EVAL["bpda_schedule"], seed: int = 0,
                    image_ids=None) -> list[list[np.ndarray]]:
    """An adaptive attack (``bpda`` or ``bpda-soft``) on every classifier of ``models`` at
    every eps_attack of ``eps_list`` at once: result[model][eps], uint8 NHWC. Each
    (classifier, eps_attack, image) is its own row of one batch, so every step runs the
    defense once for all of them: the purifier's per-pixel steps cost about as much for
    one image as for dozens, and this is where the adaptive attacks spend their time.
    A row's result is what attacking that classifier alone at that eps_attack gives, up
    to the float noise of the batch it is in."""
    name = parse_attack(name)
    schedule = parse_choice(Schedule, bpda_schedule, "BPDA schedule")
    if bpda_steps < 1 or bpda_restarts < 1:
        raise PdrayError(f"bpda_steps and bpda_restarts must be at least 1; got {bpda_steps} "
                         f"and {bpda_restarts}.")
    if name is Attack.BPDA and defend is None:
        raise PdrayError("The bpda attack needs a defense to attack through; run it in the "
                         "evaluation pipeline (pdray eval --attacks bpda).")
    if name is Attack.BPDA_SOFT and surrogate is None:
        raise PdrayError("The bpda-soft attack needs a defense's surrogate to attack through; "
                         "run it in the evaluation pipeline (pdray eval --attacks bpda-soft).")
    eps_list = [check_eps(e) for e in eps_list]
    check_images(images)
    todo = sorted({e for e in eps_list if e > 0})
    n, k, m = len(images), len(todo), len(models)
    if not (n and k):
        return [[images.copy() for _ in eps_list] for _ in models]
    ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
    owner = np.repeat(np.arange(m), k * n)  # rows: classifier, then eps_attack, then image
    rows_labels = np.tile(np.asarray(labels), k * m)
    evaluate = _through(models, owner, rows_labels, defend) if name is Attack.BPDA else \
        _through_surrogate(models, owner, rows_labels, surrogate)
    out = _restarts(evaluate, np.tile(images, (k * m, 1, 1, 1)),
                    np.tile(np.repeat(np.asarray(todo, np.int64), n), m), bpda_steps,
                    bpda_restarts, schedule, seed, np.tile(ids, k * m)).reshape(m, k, *images.shape)
    return [[out[i, todo.index(e)] if e > 0 else images.copy() for e in eps_list]
            for i in range(m)]


def bpda(model, images, labels, eps_list, *, defend: Callable[[np.ndarray], np.ndarray] | None = None,
         bpda_steps: int = _EVAL["bpda_steps"], bpda_restarts: int = _EVAL["bpda_restarts"],
         bpda_schedule: str = _EVAL["bpda_schedule"], seed: int = 0,
         image_ids=None) -> list[np.ndarray]:
    """BPDA (Athalye et al. 2018) on ``defend`` (uint8 NHWC -> uint8 NHWC, one defense)
    followed by the classifier: each step's gradient is taken at the defended image, as if
    the defense were the identity. Sign steps on the schedule ``bpda_schedule`` (see
    ``_ascend``), and the per-image worst case over ``bpda_restarts`` starts
    (``_restarts``). An image stops moving once its defended version is misclassified, so
    it is not purified again. PixelDefend and feature squeezing are deterministic, so one
    sample per step is exact and EOT (averaging gradients over the defense's randomness)
    has nothing to average. ``through_defense`` attacks several classifiers at once."""
    return through_defense(Attack.BPDA, [model], images, labels, eps_list, defend=defend,
                           bpda_steps=bpda_steps, bpda_restarts=bpda_restarts,
                           bpda_schedule=bpda_schedule, seed=seed, image_ids=image_ids)[0]


def bpda_soft(model, images, labels, eps_list, *,
              surrogate: Callable[[torch.Tensor], torch.Tensor] | None = None,
              bpda_steps: int = _EVAL["bpda_steps"], bpda_restarts: int = _EVAL["bpda_restarts"],
              bpda_schedule: str = _EVAL["bpda_schedule"], seed: int = 0,
              image_ids=None) -> list[np.ndarray]:
    """BPDA with a better g: the steps, schedule and restarts of ``bpda``, with each
    gradient taken through ``surrogate`` (float NCHW -> float NCHW, forward the exact
    defense; ``pdray.purify.surrogate``) instead of the identity. For PixelDefend that is
    the gradient of soft Algorithm 1 through the PixelCNN's context."""
    return through_defense(Attack.BPDA_SOFT, [model], images, labels, eps_list,
                           surrogate=surrogate, bpda_steps=bpda_steps,
                           bpda_restarts=bpda_restarts, bpda_schedule=bpda_schedule, seed=seed,
                           image_ids=image_ids)[0]


ATTACKS = {Attack.RAND: rand, Attack.FGSM: fgsm, Attack.BIM: bim, Attack.DEEPFOOL: deepfool,
           Attack.CW: cw, Attack.BPDA: bpda, Attack.BPDA_SOFT: bpda_soft}
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
    integers like every image the classifiers see at test time. Each step attacks only the
    images whose step count is not used up (in eval mode images do not interact): with eps
    drawn by ``sample_eps`` that is ~6.7 steps an image against the batch's ~18."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # predicted labels: no label leaking
    e = eps.view(-1, 1, 1, 1).to(x)
    lo, hi = (x - e).clamp(min=0), (x + e).clamp(max=255)
    steps = torch.tensor([bim_steps(float(v)) if iterative else 1 for v in eps], device=x.device)
    step_size = torch.ones_like(e) if iterative else e
    adv = x.clone().detach()
    for i in range(int(steps.max()) if len(steps) else 0):
        active = (steps > i).nonzero().flatten()
        a = adv[active].requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(a), y[active], reduction="sum"), a)
        stepped = a.detach() + step_size[active] * grad.sign()
        adv[active] = torch.max(torch.min(stepped, hi[active]), lo[active])
    model.train(was_training)
    return adv.round()
