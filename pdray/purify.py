"""Purification: PixelDefend (Algorithm 1), the feature-squeezing baseline, and L-BFGS-B on
the same likelihood (``lbfgsb``: Appendix E's alternative, the ablation's control).

PixelDefend walks the sub-pixels in raster order, then channels, and sets each to the
most likely value under the PixelCNN within [x - eps_defend, x + eps_defend] of the
input. Two implementations make the same decisions:

- ``reference``: Algorithm 1 literally, one full PixelCNN pass per sub-pixel. Slow;
  the ground truth for tests.
- ``fast``: the decision at a pixel depends only on the (already final) pixels before
  it, so the model's incremental ``Decoder`` computes each layer once per position from
  cached inputs (fast PixelCNN++ generation, Ramachandran et al. 2017), then the head
  gives each channel's 256-way distribution in turn.

Both take and return uint8 NHWC arrays; eps_defend is one value or one per image (0
leaves an image untouched, which is how adaptive PixelDefend skips likely images). Each
decision reads the conditional of a sub-pixel whose prefix is final, so the likelihood of
the purified image comes with it, without another forward pass.

Adaptive attacks (pdray.attacks: bpda, bpda-soft) aim through one defense at a time:
``defender`` gives it as a function of images, ``surrogate`` as a torch function whose
output is the defense's and whose gradient is a smooth stand-in's; for PixelDefend that is
``soft_batch``, Algorithm 1 with a softmax in place of the argmax.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pdray.config import Defense, Method
from pdray.errors import PdrayError, parse_choice
from pdray.pixelcnn import PixelCNN, bits_per_dim, bpd_from_log_prob
from pdray.pixels import check_images, to_nchw, to_nhwc


def feature_squeeze(images: np.ndarray, levels: int = 32) -> np.ndarray:
    """Xu et al.'s squeezing as Appendix C sets it up: ``levels`` colour levels, then a 2x2
    median filter with reflective padding. uint8 NHWC in and out.

    Both steps are their published code's (EvadeML-Zoo, utils/squeeze.py):
    ``reduce_precision_py`` rounds x in [0, 1] to rint(x (levels - 1)) / (levels - 1), and
    ``median_filter_py`` is ``scipy.ndimage.median_filter(x, size=(1, 2, 2, 1),
    mode="reflect")``. For a 2x2 window scipy takes the upper of the two middle values (not
    their mean), so the output stays on the reduced grid; the window is the pixel and its
    neighbours above and to the left, mirrored at the border."""
    x = images.astype(np.float64) / 255.0
    x = np.rint(x * (levels - 1)) / (levels - 1)
    x = ndimage.median_filter(x, size=(1, 2, 2, 1), mode="reflect")
    return np.rint(x * 255.0).astype(np.uint8)


def bounds(x: torch.Tensor, eps: torch.Tensor):
    """Feasible range [max(x - eps, 0), min(x + eps, 255)] in int64: no uint8 wrap-around."""
    e = eps.view(-1, *([1] * (x.dim() - 1)))
    return (x - e).clamp(min=0), (x + e).clamp(max=255)


def _decide(logits, lo, hi):
    """Algorithm 1's bounded argmax: logits (B, 256); lo, hi (B,) -> the most likely value
    in [lo, hi] (B,) and its log-probability (B,) in nats."""
    z = torch.arange(256, device=logits.device)
    feasible = (z >= lo[:, None]) & (z <= hi[:, None])
    v = logits.masked_fill(~feasible, float("-inf")).argmax(-1)
    return v, F.log_softmax(logits.double(), -1).gather(-1, v[:, None])[:, 0]


# ---- reference: Algorithm 1, one full forward pass per sub-pixel -----------------------------

@torch.no_grad()
def reference_batch(model: PixelCNN, x: torch.Tensor, eps: torch.Tensor,
                    steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) int64; eps (B,) int64 -> (purified x, its log-likelihood (B,) in
    nats). ``steps`` stops after that many sub-pixels (for timing); the rest are left as
    they are and the log-likelihood covers only the decided ones."""
    b, c, h, w = x.shape
    xs = x.clone()
    lo, hi = bounds(x, eps)
    logp = torch.zeros(b, dtype=torch.float64, device=x.device)
    order = [(i, j, k) for i in range(h) for j in range(w) for k in range(c)]
    for i, j, k in order[:steps]:
        logits = model(xs)[:, k, i, j]  # Compute the 256-way softmax p_CNN(X*) (line 7)
        xs[:, k, i, j], logp_v = _decide(logits, lo[:, k, i, j], hi[:, k, i, j])
        logp += logp_v
    return xs, logp


# ---- fast: the same decisions with cached activations ---------------------------------------

@torch.no_grad()
def fast_batch(model: PixelCNN, x: torch.Tensor,
               eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decisions of ``reference_batch``, with the model's incremental decoder: one
    network step per pixel, then the head once per channel."""
    b, c, h, w = x.shape
    xs = x.clone()
    lo, hi = bounds(x, eps)
    logp = torch.zeros(b, dtype=torch.float64, device=x.device)
    decoder = model.decoder(b, w, x.device)
    for i in range(h):
        decoder.next_row()
        for j in range(w):
            hj = decoder.features(j)
            decided = []
            for k in range(c):
                v, logp_v = _decide(decoder.channel(hj, k, decided), lo[:, k, i, j], hi[:, k, i, j])
                xs[:, k, i, j] = v
                logp += logp_v
                decided.append(v)
            decoder.feed(j, xs[:, :, i, j])
    return xs, logp


# ---- one pass: every choice from a fixed past (not Algorithm 1) -----------------------------

@torch.no_grad()
def one_pass(model: PixelCNN, images: np.ndarray, eps_defend: int, *,
             past: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray:
    """Every sub-pixel of uint8 NHWC ``images`` becomes the most likely value in its
    eps_defend box under the model's conditionals given ``past`` (default: the images
    themselves), all from one forward pass. Algorithm 1's past is its own purified prefix
    instead; with the images as past this is IBM ART's PixelDefend rule. Scored on float32
    probabilities as ART reads them, so ties fall as in ART (the first of equal ones)."""
    device = next(model.parameters()).device
    past = images if past is None else past
    z = torch.arange(256, device=device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_nchw(images[start:start + batch_size], device)
        lo, hi = bounds(x, torch.full((len(x),), eps_defend, device=device))
        probs = torch.softmax(model(to_nchw(past[start:start + batch_size], device)), -1)
        feasible = (z >= lo[..., None]) & (z <= hi[..., None])
        out.append(to_nhwc(probs.masked_fill(~feasible, -1.0).argmax(-1)))
    return np.concatenate(out)


# ---- the public entry point ----------------------------------------------------------------

def eps_per_image(eps_defend, n: int) -> np.ndarray:
    eps = np.broadcast_to(np.asarray(eps_defend), (n,))
    if not np.all((eps >= 0) & (eps <= 255)) or not np.all(np.equal(np.mod(eps, 1), 0)):
        raise PdrayError(f"eps_defend must be whole pixel levels in 0..255; got {eps_defend}.")
    return eps.astype(np.int64)


def pixeldefend(model: PixelCNN, images: np.ndarray, eps_defend, *,
                method: str | Method = Method.FAST, batch_size: int = 64,
                on_batch: Callable[[int], None] | None = None, return_bpd: bool = False):
    """Purify uint8 NHWC ``images`` with Algorithm 1; ``eps_defend`` is one value or one
    per image. ``on_batch(n)`` is called after each batch of n images (progress bars).
    ``return_bpd`` also returns the purified images' bits/dim: from the decoding itself,
    and from a forward pass for images left alone (eps 0)."""
    check_images(images, model.config.channels)
    eps = eps_per_image(eps_defend, len(images))
    run = fast_batch if parse_choice(Method, method, "method") is Method.FAST else reference_batch
    device = next(model.parameters()).device
    out, logp = images.copy(), np.zeros(len(images))
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        todo = np.nonzero(eps[start:stop] > 0)[0] + start  # eps 0: nothing to decide
        if len(todo):
            xs, logp_x = run(model, to_nchw(images[todo], device),
                             torch.from_numpy(eps[todo]).to(device))
            out[todo] = to_nhwc(xs)
            logp[todo] = logp_x.cpu().numpy()
        if on_batch:
            on_batch(stop - start)
    if not return_bpd:
        return out
    bpd = bpd_from_log_prob(logp, np.prod(images.shape[1:]))
    untouched = eps == 0
    if untouched.any():
        bpd[untouched] = bits_per_dim(model, images[untouched])
    return out, bpd


def lbfgsb(model: PixelCNN, images: np.ndarray, eps_defend: int, *, maxiter: int,
           starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maximise the PixelCNN's likelihood inside the eps_defend box around each uint8 NHWC
    image with scipy's L-BFGS-B on ``PixelCNN.log_prob_continuous``, from the image itself
    or from ``starts`` (float NHWC, inside the boxes); returns the results rounded to whole
    levels (uint8 NHWC) and each run's iteration count. Appendix E's alternative to
    Algorithm 1's greedy decoding: it asks what the likelihood's best image near the input
    is, where Algorithm 1 asks it one sub-pixel at a time."""
    import scipy.optimize  # only this purifier needs it

    check_images(images, model.config.channels)
    eps = int(eps_per_image(eps_defend, 1)[0])
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    starts = images if starts is None else starts
    out, iterations = images.copy(), np.zeros(len(images), dtype=np.int64)
    for i, image in enumerate(images if eps > 0 else []):  # eps 0: nothing to decide
        x = image.transpose(2, 0, 1).astype(np.float64)  # CHW, the model's layout
        lo, hi = np.maximum(x - eps, 0).ravel(), np.minimum(x + eps, 255).ravel()

        def bpd_and_grad(z):
            t = torch.tensor(z.reshape(1, *x.shape), dtype=dtype, device=device,
                             requires_grad=True)
            bpd = bpd_from_log_prob(model.log_prob_continuous(t).sum(), x.size)
            grad, = torch.autograd.grad(bpd, t)
            return bpd.item(), grad.double().cpu().numpy().ravel()

        start = np.asarray(starts[i], dtype=np.float64).transpose(2, 0, 1).ravel()
        res = scipy.optimize.minimize(bpd_and_grad, start, jac=True, method="L-BFGS-B",
                                      bounds=scipy.optimize.Bounds(lo, hi),
                                      options={"maxiter": maxiter})
        out[i] = np.clip(np.rint(res.x), lo, hi).reshape(x.shape).transpose(1, 2, 0)
        iterations[i] = res.nit
    return out, iterations


def adaptive_eps(bpd: np.ndarray, threshold: float, eps_defend: int) -> np.ndarray:
    """Adaptive PixelDefend (Section 4.1): leave images below the bits/dim threshold
    alone, purify the rest with the fixed eps_defend."""
    return np.where(np.asarray(bpd) < threshold, 0, eps_defend).astype(np.int64)


# ---- the defenses of Table 1 ---------------------------------------------------------------

class Defended(NamedTuple):
    images: np.ndarray      # uint8 NHWC, what the classifier sees
    bpd: np.ndarray         # their bits/dim
    eps_defend: np.ndarray  # per image; 0 where the image was left as it is


def defend(model: PixelCNN, images: np.ndarray, defenses, eps_defend: int, *,
           threshold: float | None = None, bpd: np.ndarray | None = None,
           batch_size: int = 64) -> dict[str, Defended]:
    """Every defense of ``defenses`` (Defense values) applied to uint8 NHWC ``images``:
    defense -> Defended. ``model`` purifies and scores; ``threshold`` is adaptive
    PixelDefend's bits/dim threshold; ``bpd`` the inputs' bits/dim, if known. Each image is
    purified once for PixelDefend and its adaptive variant together, and adaptive alone
    purifies only the images at or above its threshold."""
    defenses = [parse_choice(Defense, d, "defense") for d in defenses]
    n = len(images)
    bpd = bits_per_dim(model, images) if bpd is None else bpd
    if Defense.ADAPTIVE in defenses and threshold is None:
        raise PdrayError("Adaptive PixelDefend needs its bits/dim threshold.")
    if {Defense.PIXELDEFEND, Defense.ADAPTIVE} & set(defenses):
        eps = eps_defend if Defense.PIXELDEFEND in defenses else \
            adaptive_eps(bpd, threshold, eps_defend)
        purified, bpd_purified = pixeldefend(model, images, eps, batch_size=batch_size,
                                             return_bpd=True)
    out = {}
    for d in defenses:
        if d is Defense.NONE:
            out[d.value] = Defended(images, bpd, np.zeros(n, int))
        elif d is Defense.SQUEEZE:
            squeezed = feature_squeeze(images)
            out[d.value] = Defended(squeezed, bits_per_dim(model, squeezed), np.zeros(n, int))
        elif d is Defense.PIXELDEFEND:
            out[d.value] = Defended(purified, bpd_purified, np.full(n, eps_defend))
        else:  # adaptive: images below the threshold keep eps_defend 0, i.e. stay as they are
            eps = adaptive_eps(bpd, threshold, eps_defend)
            keep = eps == 0
            out[d.value] = Defended(np.where(keep[:, None, None, None], images, purified),
                                    np.where(keep, bpd, bpd_purified), eps)
    return out


# ---- what adaptive attacks aim through: each defense, exact and with a smooth gradient -------

def soft_batch(model: PixelCNN, x: torch.Tensor, eps: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 made smooth, for gradients: each sub-pixel becomes the softmax-weighted
    mean (temperature ``tau``) of its feasible values, and that soft value is the context
    of the sub-pixels after it, through the same cached decoder steps as ``fast_batch``,
    under autograd. x (B, C, H, W) float pixels on whole levels; eps (B,) int64 -> the soft
    purified (B, C, H, W), differentiable in x.

    The feasible values are x + d, d in -eps..eps (inside 0..255): they move with x. As
    fixed numbers they would make the output constant between whole levels (zero
    gradient), so each sub-pixel's derivative by its own input is one, as in BPDA, and the
    rest of the gradient is how the later soft choices follow it through the PixelCNN's
    context. As tau -> 0 the output tends to ``fast_batch``'s (ties aside); at tau = 1 each
    sub-pixel is the mean of the model's conditional restricted to the ball."""
    b, c, h, w = x.shape
    base = x.detach().round()
    lo, hi = bounds(base.long(), eps)
    z = torch.arange(256, device=x.device, dtype=x.dtype)
    decoder = model.decoder(b, w, x.device)
    rows = []
    for i in range(h):
        decoder.next_row()
        row = []
        for j in range(w):
            hj = decoder.features(j)
            soft = []
            for k in range(c):
                logits = decoder.channel(hj, k, soft).to(x.dtype)  # (B, 256)
                feasible = (z >= lo[:, k, i, j, None]) & (z <= hi[:, k, i, j, None])
                p = torch.softmax(logits.masked_fill(~feasible, float("-inf")) / tau, dim=-1)
                soft.append(x[:, k, i, j] - base[:, k, i, j] + p @ z)  # (B,)
            values = torch.stack(soft, dim=1)  # (B, C)
            decoder.feed(j, values)
            row.append(values)
        rows.append(torch.stack(row, dim=-1))  # (B, C, W)
    return torch.stack(rows, dim=2)  # (B, C, H, W)


def pixeldefend_soft(model: PixelCNN, x: torch.Tensor, eps_defend, tau: float) -> torch.Tensor:
    """PixelDefend whose output is the purifier's (``fast_batch``) and whose gradient is
    ``soft_batch``'s, a straight-through estimator: exact + (soft - soft.detach()). x (B, C,
    H, W) float on whole levels; eps_defend one value or one per image (0: the image passes
    as it is, gradient one). The soft decoding runs only when x requires a gradient."""
    eps = torch.from_numpy(eps_per_image(eps_defend, len(x))).to(x.device)
    todo = torch.nonzero(eps > 0)[:, 0]
    if not len(todo):
        return x
    out = fast_batch(model, x.detach()[todo].round().long(), eps[todo])[0].to(x.dtype)
    if x.requires_grad:
        soft = soft_batch(model, x[todo], eps[todo], tau)
        out = out + (soft - soft.detach())
    return x.index_copy(0, todo, out)


def _median_2x2(x: torch.Tensor) -> torch.Tensor:
    """``feature_squeeze``'s median filter in torch, (B, C, H, W) -> (B, C, H, W): the upper
    middle of each pixel and its neighbours above and to the left, mirrored at the border."""
    p = F.pad(x, (1, 0, 1, 0), mode="replicate")
    window = torch.stack([p[..., :-1, :-1], p[..., :-1, 1:], p[..., 1:, :-1], p[..., 1:, 1:]], -1)
    return window.sort(dim=-1).values[..., 2]


def _one_defense(defense, threshold: float | None) -> Defense:
    d = parse_choice(Defense, defense, "defense")
    if d is Defense.ADAPTIVE and threshold is None:
        raise PdrayError("Adaptive PixelDefend needs its bits/dim threshold.")
    return d


def defender(model: PixelCNN, defense, eps_defend: int, *, threshold: float | None = None,
             batch_size: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """One defense as a function of uint8 NHWC images (what the classifier then sees): what
    BPDA attacks through. ``threshold``: adaptive PixelDefend's bits/dim threshold."""
    d = _one_defense(defense, threshold)
    if d is Defense.NONE:
        return lambda x: x
    if d is Defense.SQUEEZE:
        return feature_squeeze
    if d is Defense.PIXELDEFEND:
        return lambda x: pixeldefend(model, x, eps_defend, batch_size=batch_size)
    return lambda x: defend(model, x, [d], eps_defend, threshold=threshold,
                            batch_size=batch_size)[d.value].images


def surrogate(model: PixelCNN, defense, eps_defend: int, *, threshold: float | None = None,
              tau: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """One defense as a function of float NCHW pixels on whole levels, whose output is the
    defense's and whose gradient is a smooth stand-in's ("BPDA with a better g", Athalye et
    al. 2018): the identity for none; for feature squeezing the median filter's own
    gradient (the colour reduction passes it through, as BPDA would); soft Algorithm 1
    (``pixeldefend_soft``) for PixelDefend, and for adaptive PixelDefend on the images it
    purifies (its bits/dim threshold decides, and has no gradient)."""
    d = _one_defense(defense, threshold)
    if d is Defense.NONE:
        return lambda x: x

    def squeezed(x):
        exact = to_nchw(feature_squeeze(to_nhwc(x.detach().round())), x.device).to(x.dtype)
        soft = _median_2x2(x)
        return exact + (soft - soft.detach())

    def purified(x):
        eps = eps_defend if d is Defense.PIXELDEFEND else adaptive_eps(
            bits_per_dim(model, to_nhwc(x.detach().round())), threshold, eps_defend)
        return pixeldefend_soft(model, x, eps, tau)

    return squeezed if d is Defense.SQUEEZE else purified
