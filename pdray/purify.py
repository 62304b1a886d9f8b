"""Purification: PixelDefend (Algorithm 1) and the feature-squeezing baseline.

PixelDefend walks the sub-pixels in raster order, then channels, and sets each to the
most likely value under the PixelCNN within [x - eps_defend, x + eps_defend] of the
input. Two implementations make the same decisions:

- ``reference``: Algorithm 1 literally, one full PixelCNN pass per sub-pixel. Slow;
  the ground truth for tests.
- ``fast``: the decision at a pixel depends only on the (already final) pixels before
  it, so each layer's output is computed once per position from cached inputs, as in
  fast PixelCNN++ generation (Ramachandran et al. 2017): the ``u`` stream one row at a
  time, the ``ul`` stream one pixel at a time, then the channel head for each channel.
  Caches hold two rows per convolution, whatever the image size or step count.

Both take and return uint8 NHWC arrays; eps_defend is one value or one per image (0
leaves an image untouched, which is how adaptive PixelDefend skips likely images). Each
decision reads the conditional of a sub-pixel whose prefix is final, so the likelihood of
the purified image comes with it, without another forward pass.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pdray.errors import PdrayError, parse_choice
from pdray.evaluate import bits_per_dim
from pdray.pixelcnn import PixelCNN, concat_elu


class Method(str, Enum):
    FAST = "fast"
    REFERENCE = "reference"


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


def _bounds(x: torch.Tensor, eps: torch.Tensor):
    """Feasible range [max(x - eps, 0), min(x + eps, 255)] in int64: no uint8 wrap-around."""
    e = eps.view(-1, *([1] * (x.dim() - 1)))
    return (x - e).clamp(min=0), (x + e).clamp(max=255)


def _masked_argmax(logits, lo, hi):  # logits (B, 256); lo, hi (B,)
    z = torch.arange(256, device=logits.device)
    feasible = (z >= lo[:, None]) & (z <= hi[:, None])
    return logits.masked_fill(~feasible, float("-inf")).argmax(-1)


def _log_prob_of(logits, v):  # logits (B, 256), v (B,) -> (B,) log p(v) in nats
    return F.log_softmax(logits.double(), -1).gather(-1, v[:, None])[:, 0]


# ---- reference: Algorithm 1, one full forward pass per sub-pixel -----------------------------

@torch.no_grad()
def reference_batch(model: PixelCNN, x: torch.Tensor, eps: torch.Tensor,
                    steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) int64; eps (B,) int64 -> (purified x, its log-likelihood (B,) in
    nats). ``steps`` stops after that many sub-pixels (for timing); the rest are left as
    they are and the log-likelihood covers only the decided ones."""
    b, c, h, w = x.shape
    xs = x.clone()
    lo, hi = _bounds(x, eps)
    logp = torch.zeros(b, dtype=torch.float64, device=x.device)
    order = [(i, j, k) for i in range(h) for j in range(w) for k in range(c)]
    for i, j, k in order[:steps]:
        logits = model(xs)[:, k, i, j]  # Compute the 256-way softmax p_CNN(X*) (line 7)
        xs[:, k, i, j] = v = _masked_argmax(logits, lo[:, k, i, j], hi[:, k, i, j])
        logp += _log_prob_of(logits, v)
    return xs, logp


# ---- fast: the same decisions with cached activations ---------------------------------------

class _ConvCache:
    """A (2 x kw) down-right-shifted convolution evaluated one position at a time.

    Output (i, j) = bias + (row i-1, columns j-kw+1..j) + (row i, the same columns). The
    row-above part is one batched matmul per row. Within the row each new input is
    multiplied once: that gives its own output's term and, for kw == 2, its right
    neighbour's, kept in ``pending``. Memory: two rows of inputs, whatever the step count.
    """

    def __init__(self, conv: torch.nn.Conv2d, batch: int, width: int, like: torch.Tensor):
        c_out, c_in, kh, kw = conv.weight.shape
        w = conv.weight
        self.kw, self.c_out, self.width = kw, c_out, width
        self.w_above = w[:, :, 0, :].permute(2, 1, 0).reshape(kw * c_in, c_out)  # rows (dx, c_in)
        # Columns: this position's term (dx = kw-1), then, for kw == 2, the next one's (dx = 0).
        self.w_row = torch.cat([w[:, :, 1, kw - 1 - k].t() for k in range(kw)], dim=1)
        self.bias = conv.bias
        self.row = like.new_zeros(width + kw - 1, batch, c_in)  # this row's inputs, left-padded
        self.spare = torch.zeros_like(self.row)
        self.pending = like.new_zeros(batch, c_out)
        self.above = None

    def next_row(self):
        """Start the next row: the finished row becomes the row above."""
        win = torch.cat([self.row[k:k + self.width] for k in range(self.kw)], dim=-1)
        self.above = torch.addmm(self.bias, win.reshape(-1, win.shape[-1]),
                                 self.w_above).view(self.width, -1, self.c_out)  # (W, B, C_out)
        self.row, self.spare = self.spare, self.row  # the padding column stays zero
        self.pending = torch.zeros_like(self.pending)

    def step(self, j: int, value):  # value (B, C_in): the input at (i, j) -> output (B, C_out)
        self.row[j + self.kw - 1] = value
        z = value @ self.w_row
        out = self.above[j] + z[:, :self.c_out]
        if self.kw == 2:
            out = out + self.pending
            self.pending = z[:, self.c_out:]
        return out


def _row_conv(conv: torch.nn.Conv2d, prev, cur):
    """A down-shifted (2 x kw) convolution evaluated for one whole row: prev and cur are
    the input's rows i-1 and i, (B, C, W); the output row is (B, C_out, W)."""
    kw = conv.kernel_size[1]
    strip = torch.stack([prev, cur], dim=2)  # (B, C, 2, W)
    return F.conv2d(F.pad(strip, (kw // 2, kw // 2, 0, 0)), conv.weight, conv.bias)[:, :, 0]


@torch.no_grad()
def fast_batch(model: PixelCNN, x: torch.Tensor,
               eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decisions of ``reference_batch``, computing each layer once per position."""
    b, c, h, w = x.shape
    dt = model.u_init.weight.dtype
    xs = x.clone()
    lo, hi = _bounds(x, eps)
    logp = torch.zeros(b, dtype=torch.float64, device=x.device)
    enc = lambda v: PixelCNN.encode(v).to(dt)  # noqa: E731  (B, C, ...) -> (B, C+1, ...)
    zeros_row = torch.zeros(b, c + 1, w, dtype=dt, device=x.device)
    f = model.config.filters
    # u stream: the previous row of every convolution's input, (B, 2F, W).
    u_prev = [[torch.zeros(b, 2 * f, w, dtype=dt, device=x.device) for _ in range(2)]
              for _ in model.u_blocks]
    # ul stream: position-by-position caches of every convolution.
    left = _ConvCache(model.ul_init_left, b, w, zeros_row)
    ul_caches = [(_ConvCache(blk.conv1, b, w, zeros_row), _ConvCache(blk.conv2, b, w, zeros_row))
                 for blk in model.ul_blocks]
    x_rows = [zeros_row, zeros_row]  # encoded input rows i-2 and i-1, (B, C+1, W)
    for i in range(h):
        # --- the u stream for row i, and everything of the ul stream that only looks up.
        if i == 0:
            u = torch.zeros(b, f, w, dtype=dt, device=x.device)
            up = torch.zeros(w, b, f, dtype=dt, device=x.device)
        else:
            u = _row_conv(model.u_init, x_rows[0], x_rows[1])  # down_shift(u_init)(i)
            up = F.conv2d(F.pad(x_rows[1][:, :, None], (1, 1, 0, 0)), model.ul_init_up.weight,
                          model.ul_init_up.bias)[:, :, 0].permute(2, 0, 1)  # (W, B, F)
        aux = []
        for blk, ul_blk, cache in zip(model.u_blocks, model.ul_blocks, u_prev):
            cu = concat_elu(u)
            c1 = _row_conv(blk.conv1, cache[0], cu)
            cache[0] = cu
            c1 = concat_elu(c1)
            c2 = _row_conv(blk.conv2, cache[1], c1)
            cache[1] = c1
            ga, gb = c2.chunk(2, dim=1)
            u = u + ga * torch.sigmoid(gb)
            aux.append(F.conv1d(concat_elu(u), ul_blk.aux.weight[..., 0],
                                ul_blk.aux.bias).permute(2, 0, 1))  # (W, B, F)
        for cache in (left, *[c for pair in ul_caches for c in pair]):
            cache.next_row()
        # --- the ul stream and the head, pixel by pixel.
        from_left = 0.0  # right_shift(ul_init_left(x))(i, j): the conv's output at (i, j-1)
        for j in range(w):
            ul = up[j] + from_left
            for (cache1, cache2), a in zip(ul_caches, aux):
                c1 = concat_elu(cache1.step(j, concat_elu(ul)) + a[j])
                ga, gb = cache2.step(j, c1).chunk(2, dim=1)
                ul = ul + ga * torch.sigmoid(gb)
            hj = F.elu(ul)
            decided = []
            for k in range(c):
                logits = model.head.channel(hj, k, decided)
                v = _masked_argmax(logits, lo[:, k, i, j], hi[:, k, i, j])
                xs[:, k, i, j] = v
                logp += _log_prob_of(logits, v)
                decided.append(v)
            from_left = left.step(j, enc(xs[:, :, i, j]))
        x_rows = [x_rows[1], enc(xs[:, :, i])]
    return xs, logp


# ---- the public entry point ----------------------------------------------------------------

def check_images(images: np.ndarray, channels: int | None = None) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) \
            else type(images).__name__
        raise PdrayError(f"Images must be a uint8 array shaped (N, H, W, C); got {got}.")
    if channels is not None and images.shape[-1] != channels:
        raise PdrayError(f"The model expects {channels}-channel images; these have "
                         f"{images.shape[-1]} channels (shape {images.shape}).")
    return images


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
            x = torch.from_numpy(images[todo].transpose(0, 3, 1, 2).copy()).long().to(device)
            xs, logp_x = run(model, x, torch.from_numpy(eps[todo]).to(device))
            out[todo] = xs.cpu().numpy().transpose(0, 2, 3, 1).astype(np.uint8)
            logp[todo] = logp_x.cpu().numpy()
        if on_batch:
            on_batch(stop - start)
    if not return_bpd:
        return out
    bpd = -logp / (np.prod(images.shape[1:]) * np.log(2))
    untouched = eps == 0
    if untouched.any():
        bpd[untouched] = bits_per_dim(model, images[untouched])
    return out, bpd


def adaptive_eps(bpd: np.ndarray, threshold: float, eps_defend: int) -> np.ndarray:
    """Adaptive PixelDefend (Section 4.1): leave images below the bits/dim threshold
    alone, purify the rest with the fixed eps_defend."""
    return np.where(np.asarray(bpd) < threshold, 0, eps_defend).astype(np.int64)
