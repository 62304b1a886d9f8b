"""A PixelCNN++-style density model with a 256-way softmax per sub-pixel.

Read top to bottom: shifts and shifted convolutions, concat_elu, the gated residual
block, the two heads, the model and its likelihood helpers, then its exact incremental
decoder (what the fast purifier steps through).

Design, and why:
- Two streams as in PixelCNN++ (Salimans et al. 2017): ``u`` sees the rows above,
  ``ul`` the rows above and the pixels to the left. Causality comes from shifting and
  padding, not from masked weights.
- One resolution, no down/up-sampling. Every layer then advances one pixel per
  decoding step, so exact incremental decoding (``Decoder``) caches two rows per
  convolution and nothing else; depth provides the receptive field. ``dilations`` widen
  the ``u`` stream's (the rows above) instead: a block of dilation d looks d rows up and
  d columns aside, so (1, 2, 4, 8, 1, 2) sees the whole of a 32x32 image above the pixel
  for the same work per step, and the decoder keeps d rows per convolution.
- The network runs once per pixel position and produces features ``h``. A small head
  turns ``h`` into the 256-way conditional of each channel, taking the already-decided
  channel values as input (G sees R; B sees R and G), as in the authors' code. So a
  purifier pays one network step per pixel and three cheap head calls.
- Two heads, both a normalised 256-way distribution per sub-pixel, so Algorithm 1 and the
  p-values work with either:
  - ``free`` (ChannelHead): 256 free logits per channel; optionally (``logistic``) plus the
    log-density of a logistic whose mean is linear in the decided channels.
  - ``mixture`` (MixtureHead): PixelCNN++'s discretized mixture of logistics binned into
    256 intervals, as the authors' code decodes it (``mix_logistic_to_logits``): channel c's
    distribution is sum_k pi_k DLogistic(v; mu_ck + sum_{j<c} a_cjk x_j, s_ck), with the
    mixture weights shared by the channels and G's and B's means linear in the decided
    channels. Smooth and unimodal-per-component by construction, where free logits must
    learn that nearby values are alike.
- A head offers ``channel`` (the 256 log-probabilities of one channel at the positions of
  ``h``, for decoding) and ``log_prob`` (of observed values only: what training and
  bits/dim need, 256 times cheaper for the mixture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pdray.config import Head
from pdray.pixels import to_nchw


@dataclass
class Config:
    channels: int = 1        # 1 for Fashion-MNIST, 3 for CIFAR-10
    filters: int = 64        # width of both streams
    blocks: int = 6          # gated residual blocks per stream; receptive field ~2 rows each
    dropout: float = 0.0     # inside each gated block, as in PixelCNN++ (which used 0.5)
    logistic: bool = False   # the free head's logistic logit term; False for weights trained before it
    head: str = Head.FREE.value  # "free" (ChannelHead) or "mixture" (MixtureHead)
    mixtures: int = 10       # logistics in the mixture head (PixelCNN++: 10)
    dilations: tuple = ()    # per u-stream block (len == blocks); () is all 1

    def __post_init__(self):
        self.dilations = tuple(int(d) for d in self.dilations)  # a list, once saved and loaded
        if self.dilations and (len(self.dilations) != self.blocks or min(self.dilations) < 1):
            raise ValueError(f"dilations {self.dilations}: one positive integer per block "
                             f"({self.blocks}) expected")

    def dilation(self, block: int) -> int:
        return self.dilations[block] if self.dilations else 1


def down_shift(x):  # (B, C, H, W): row i takes row i-1's values, row 0 zeros
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x):  # (B, C, H, W): column j takes column j-1's values
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def concat_elu(x):  # (B, C, ...) -> (B, 2C, ...)
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv2d(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i and columns j-kw//2..j+kw//2, each step
    ``dilation`` apart."""

    def __init__(self, c_in: int, c_out: int, kernel=(2, 3), dilation: int = 1):
        super().__init__(c_in, c_out, kernel, dilation=dilation)

    def forward(self, x):
        (kh, kw), d = self.kernel_size, self.dilation[0]
        return super().forward(F.pad(x, (kw // 2 * d, kw // 2 * d, (kh - 1) * d, 0)))


class DownRightShiftedConv2d(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i and columns j-kw+1..j."""

    def __init__(self, c_in: int, c_out: int, kernel=(2, 2)):
        super().__init__(c_in, c_out, kernel)

    def forward(self, x):
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, (kw - 1, 0, kh - 1, 0)))


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), where (a, b) come from two shifted convolutions of x and,
    for the ``ul`` stream, a 1x1 projection of the ``u`` stream at the same position."""

    def __init__(self, filters: int, conv: type, aux: bool, dropout: float, **conv_args):
        super().__init__()
        self.conv1 = conv(2 * filters, filters, **conv_args)
        self.aux = nn.Conv2d(2 * filters, filters, 1) if aux else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(2 * filters, 2 * filters, **conv_args)

    def forward(self, x, a=None):  # (B, F, H, W)
        c = self.conv1(concat_elu(x))
        if self.aux is not None:
            c = c + self.aux(concat_elu(a))
        c = self.conv2(self.dropout(concat_elu(c)))  # (B, 2F, H, W)
        gate_a, gate_b = c.chunk(2, dim=1)
        return x + gate_a * torch.sigmoid(gate_b)


def _embed(table: nn.Embedding, v):
    """The embedding of integer values v, or of float values (a soft decoding's context) by
    linear interpolation between the two nearest values: exact at whole values."""
    if not v.is_floating_point():
        return table(v)
    lo = v.detach().floor().clamp(0, 254)
    frac = (v - lo).unsqueeze(-1)
    lo = lo.long()
    return table(lo) * (1 - frac) + table(lo + 1) * frac


class ChannelHead(nn.Module):
    """Features at one position -> 256 logits per channel, channel c conditioned on the
    values of channels < c through learned value embeddings and, with ``logistic``, a
    logistic term whose mean is linear in them."""

    def __init__(self, filters: int, channels: int, logistic: bool = False):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(filters, filters) for _ in range(channels))
        self.embed = nn.ModuleList(nn.Embedding(256, filters) for _ in range(channels * (channels - 1) // 2))
        self.out = nn.ModuleList(nn.Linear(filters, 256) for _ in range(channels))
        # Channel c: mean, log scale, and one mixing coefficient per earlier channel.
        self.logistic = None
        if logistic:
            self.logistic = nn.ModuleList(nn.Linear(filters, 2 + c) for c in range(channels))
            self.register_buffer("centres", torch.arange(256) / 127.5 - 1.0, persistent=False)

    def channel(self, h, c: int, previous):
        """Logits of channel c from features h (..., F) and ``previous``, a list of the
        decided integer values of channels 0..c-1 (float values in a soft decoding), each
        shaped like h without F."""
        a = self.hidden[c](h)
        first = c * (c - 1) // 2  # embeddings of channel c start here
        for k in range(c):
            a = a + _embed(self.embed[first + k], previous[k])
        logits = self.out[c](F.elu(a))  # (..., 256)
        if self.logistic is None:
            return logits
        p = self.logistic[c](h)
        mean = p[..., 0]
        for k in range(c):
            mean = mean + torch.tanh(p[..., 2 + k]) * (previous[k].to(h.dtype) / 127.5 - 1.0)
        z = (self.centres.to(h.dtype) - mean.unsqueeze(-1)) * torch.exp(-p[..., 1:2].clamp(min=-7.0))
        return logits - z - 2.0 * F.softplus(-z)  # + log of the logistic density, up to a constant

    def forward(self, h, x):  # h (B, H, W, F); x (B, C, H, W) long -> (B, C, H, W, 256)
        values = [x[:, k] for k in range(x.shape[1])]
        return torch.stack([self.channel(h, c, values[:c]) for c in range(len(self.out))], dim=1)

    def log_prob(self, h, x, context=None):  # -> (B, C, H, W) nats of each observed sub-pixel
        logp = F.log_softmax(self.forward(h, x if context is None else context), dim=-1)
        return logp.gather(-1, x.unsqueeze(-1)).squeeze(-1)


# Bin edges of the 256 values in the model's [-1, 1] scale; the end bins reach to +-infinity
# (a large finite edge, so no inf * 0 in a gradient).
_EDGE = 1.0 / 255.0
_FAR = 1e8


def _edges(v):  # integer values (any shape) -> (lower, upper) bin edges in [-1, 1] units
    centre = v.double() / 127.5 - 1.0
    lower = torch.where(v == 0, torch.full_like(centre, -_FAR), centre - _EDGE)
    upper = torch.where(v == 255, torch.full_like(centre, _FAR), centre + _EDGE)
    return lower, upper


def discretized_logistic_log_prob(lower, upper, mean, log_scale):
    """log P(lower < X < upper) for X ~ Logistic(mean, exp(log_scale)), stably:
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a))."""
    inv_s = torch.exp(-log_scale)
    a, b = (upper - mean) * inv_s, (lower - mean) * inv_s
    return F.logsigmoid(a) + F.logsigmoid(-b) + torch.log(-torch.expm1(-(upper - lower) * inv_s))


class MixtureHead(nn.Module):
    """Features at one position -> each channel's 256 log-probabilities under a binned
    mixture of ``mixtures`` logistics (PixelCNN++'s parameterisation, per-channel
    marginals as in the authors' decoder)."""

    def __init__(self, filters: int, channels: int, mixtures: int):
        super().__init__()
        self.mixtures = mixtures
        self.weights = nn.Linear(filters, mixtures)  # mixture logits, shared by the channels
        # Channel c: per component a mean, a log scale and one coefficient per earlier channel.
        self.params = nn.ModuleList(nn.Linear(filters, (2 + c) * mixtures) for c in range(channels))
        self.register_buffer("values", torch.arange(256), persistent=False)

    def _components(self, h, c: int, previous):
        """(log mixture weights, means, log scales), each (..., K)."""
        k = self.mixtures
        p = self.params[c](h)
        mean, log_scale = p[..., :k], p[..., k:2 * k].clamp(-7.0, 7.0)
        for j in range(c):
            coeff = torch.tanh(p[..., (2 + j) * k:(3 + j) * k])
            mean = mean + coeff * (previous[j].to(h.dtype) / 127.5 - 1.0).unsqueeze(-1)
        return F.log_softmax(self.weights(h), dim=-1), mean, log_scale

    def channel(self, h, c: int, previous):  # -> (..., 256) log-probabilities
        log_w, mean, log_scale = self._components(h, c, previous)
        lower, upper = (e.to(h.dtype) for e in _edges(self.values))
        logp = discretized_logistic_log_prob(lower, upper, mean.unsqueeze(-1),
                                             log_scale.unsqueeze(-1))  # (..., K, 256)
        return torch.logsumexp(log_w.unsqueeze(-1) + logp, dim=-2)

    def forward(self, h, x):  # h (B, H, W, F); x (B, C, H, W) long -> (B, C, H, W, 256)
        values = [x[:, k] for k in range(x.shape[1])]
        return torch.stack([self.channel(h, c, values[:c]) for c in range(len(self.params))], dim=1)

    def log_prob(self, h, x, context=None):  # -> (B, C, H, W) nats of each observed sub-pixel
        context = x if context is None else context
        previous = [context[:, k] for k in range(x.shape[1])]
        out = []
        for c in range(len(self.params)):
            log_w, mean, log_scale = self._components(h, c, previous[:c])
            lower, upper = (e.to(h.dtype).unsqueeze(-1) for e in _edges(x[:, c]))
            logp = discretized_logistic_log_prob(lower, upper, mean, log_scale)  # (B, H, W, K)
            out.append(torch.logsumexp(log_w + logp, dim=-1))
        return torch.stack(out, dim=1)


def bpd_from_log_prob(logp, dims: int):
    """Bits per dimension of an image of ``dims`` sub-pixels whose log-likelihood is
    ``logp`` nats (a tensor, an array or a number)."""
    return -logp / (dims * math.log(2))


def log_prob_from_bpd(bpd, dims: int):
    """The inverse of ``bpd_from_log_prob``: nats from bits per dimension."""
    return -bpd * dims * math.log(2)


class PixelCNN(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c, f = config.channels, config.filters
        self.u_init = DownShiftedConv2d(c + 1, f, (2, 3))
        self.ul_init_up = DownShiftedConv2d(c + 1, f, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(c + 1, f, (2, 1))
        self.u_blocks = nn.ModuleList(
            GatedResnet(f, DownShiftedConv2d, False, config.dropout, dilation=config.dilation(k))
            for k in range(config.blocks))
        self.ul_blocks = nn.ModuleList(
            GatedResnet(f, DownRightShiftedConv2d, True, config.dropout) for _ in range(config.blocks))
        self.head = (MixtureHead(f, c, config.mixtures) if Head(config.head) is Head.MIXTURE
                     else ChannelHead(f, c, config.logistic))

    @staticmethod
    def encode(x):  # (B, C, H, W) in 0..255 -> (B, C+1, H, W) in [-1, 1] plus a ones plane
        x = (x if x.is_floating_point() else x.float()) / 127.5 - 1.0  # float64 stays float64
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)

    def features(self, x):  # (B, C, H, W) 0..255 -> (B, F, H, W): position (i, j) sees only pixels before it
        xin = self.encode(x).to(self.u_init.weight.dtype)
        u = down_shift(self.u_init(xin))
        ul = down_shift(self.ul_init_up(xin)) + right_shift(self.ul_init_left(xin))
        for u_block, ul_block in zip(self.u_blocks, self.ul_blocks):
            u = u_block(u)
            ul = ul_block(ul, u)
        return F.elu(ul)

    def forward(self, x):  # (B, C, H, W) integers 0..255 -> logits (B, C, H, W, 256)
        x = x.long()
        h = self.features(x).permute(0, 2, 3, 1)  # (B, H, W, F)
        return self.head(h, x)

    def log_prob(self, x, context=None):  # (B, C, H, W) 0..255 -> (B,) log p(x) in nats
        """``context``: what each sub-pixel is conditioned on, if not ``x`` itself (training
        with noise on the context only: predict the clean value from a perturbed past)."""
        x = x.long()
        context = x if context is None else context.long()
        h = self.features(context).permute(0, 2, 3, 1)
        return self.head.log_prob(h, x, context).flatten(1).sum(1)

    def log_prob_continuous(self, x):  # (B, C, H, W) float in [0, 255] -> (B,) nats
        """log p at pixels between whole levels, for gradient-based purification (the
        paper's Appendix E): the network reads x as it is, and each sub-pixel's
        log-probability is interpolated linearly between its two nearest levels. At whole
        levels it is ``log_prob``."""
        h = self.features(x).permute(0, 2, 3, 1)
        logp = F.log_softmax(self.head(h, x), dim=-1)  # (B, C, H, W, 256)
        lo = x.detach().floor().clamp(0, 254)
        frac = x - lo
        lo = lo.long().unsqueeze(-1)
        below, above = logp.gather(-1, lo).squeeze(-1), logp.gather(-1, lo + 1).squeeze(-1)
        return (below * (1 - frac) + above * frac).flatten(1).sum(1)

    def bpd(self, x, context=None):  # (B, C, H, W) -> (B,) bits per dimension
        return bpd_from_log_prob(self.log_prob(x, context), x[0].numel())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decoder(self, batch: int, width: int, device=None) -> "Decoder":
        """Exact incremental decoding of ``batch`` images ``width`` pixels wide (below)."""
        return Decoder(self, batch, width, device)


@torch.inference_mode()
def bits_per_dim(model: PixelCNN, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """Bits/dim of each uint8 NHWC image, in float64."""
    device = next(model.parameters()).device
    out = [model.bpd(to_nchw(images[i:i + batch_size], device)).double().cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


# ---- exact incremental decoding ------------------------------------------------------------

class _ConvCache:
    """A (2 x kw) down-right-shifted convolution evaluated one position at a time.

    Output (i, j) = bias + (row i-1, columns j-kw+1..j) + (row i, the same columns). The
    row-above part is one batched matmul per row. Within the row each new input is
    multiplied once: that gives its own output's term and, for kw == 2, its right
    neighbour's, kept in ``pending``. Memory: two rows of inputs, whatever the step count.
    The row's inputs are kept in a list, not written into a buffer, so autograd can run
    through it (a soft decoding); the copy into one tensor happens once per row either way.
    """

    def __init__(self, conv: nn.Conv2d, batch: int, width: int, like: torch.Tensor):
        c_out, c_in, kh, kw = conv.weight.shape
        w = conv.weight
        self.kw, self.c_out, self.width = kw, c_out, width
        self.w_above = w[:, :, 0, :].permute(2, 1, 0).reshape(kw * c_in, c_out)  # rows (dx, c_in)
        # Columns: this position's term (dx = kw-1), then, for kw == 2, the next one's (dx = 0).
        self.w_row = torch.cat([w[:, :, 1, kw - 1 - k].t() for k in range(kw)], dim=1)
        self.bias = conv.bias
        self.zero = like.new_zeros(batch, c_in)
        self.inputs = [self.zero] * width  # this row's inputs; the row before the first is zeros
        self.pending = like.new_zeros(batch, c_out)
        self.above = None

    def next_row(self):
        """Start the next row: the finished row becomes the row above."""
        row = torch.stack([self.zero] * (self.kw - 1) + self.inputs)  # (W + kw - 1, B, C_in), left-padded
        win = torch.cat([row[k:k + self.width] for k in range(self.kw)], dim=-1)
        self.above = torch.addmm(self.bias, win.reshape(-1, win.shape[-1]),
                                 self.w_above).view(self.width, -1, self.c_out)  # (W, B, C_out)
        self.inputs = []
        self.pending = torch.zeros_like(self.pending)

    def step(self, j: int, value):  # value (B, C_in): the input at (i, j) -> output (B, C_out)
        self.inputs.append(value)  # positions come in order: this is column j
        z = value @ self.w_row
        out = self.above[j] + z[:, :self.c_out]
        if self.kw == 2:
            out = out + self.pending
            self.pending = z[:, self.c_out:]
        return out


def _row_conv(conv: nn.Conv2d, prev, cur):
    """A down-shifted (2 x kw) convolution evaluated for one whole row: prev and cur are
    the input's rows i-d and i (d its dilation), (B, C, W); the output row is (B, C_out, W)."""
    kw, d = conv.kernel_size[1], conv.dilation[1]
    strip = torch.stack([prev, cur], dim=2)  # (B, C, 2, W)
    return F.conv2d(F.pad(strip, (kw // 2 * d, kw // 2 * d, 0, 0)), conv.weight, conv.bias,
                    dilation=(1, d))[:, :, 0]


class Decoder:
    """The model's features position by position in raster order, exactly as ``features``
    computes them for the whole image, with each layer evaluated once per position (fast
    PixelCNN++ generation, Ramachandran et al. 2017): the ``u`` stream one row at a time,
    the ``ul`` stream one pixel at a time from cached inputs.

    Per row: ``next_row()``; then per pixel j: ``features(j)`` (which sees only the pixels
    fed so far), ``channel(h, c, decided)`` for each channel c in turn to decide the
    pixel's values, ``feed(j, values)``.

    It runs in the caller's grad mode: the purifier decodes under ``no_grad``; a soft
    decoding (``pdray.purify.soft_batch``) feeds float values and lets autograd follow the
    context through every step. Nothing is written in place, so both work.
    """

    @torch.no_grad()
    def __init__(self, model: PixelCNN, batch: int, width: int, device=None):
        self.model, self.b, self.w = model, batch, width
        self.dt = dt = model.u_init.weight.dtype
        f, c = model.config.filters, model.config.channels
        zeros_row = torch.zeros(batch, c + 1, width, dtype=dt, device=device)
        # u stream: the last d rows of every convolution's input, oldest first, (B, 2F, W).
        zeros_u = torch.zeros(batch, 2 * f, width, dtype=dt, device=device)
        self.u_prev = [[[zeros_u] * model.config.dilation(k) for _ in range(2)]
                       for k in range(len(model.u_blocks))]
        # ul stream: position-by-position caches of every convolution.
        self.left = _ConvCache(model.ul_init_left, batch, width, zeros_row)
        self.ul_caches = [(_ConvCache(blk.conv1, batch, width, zeros_row),
                           _ConvCache(blk.conv2, batch, width, zeros_row)) for blk in model.ul_blocks]
        self.x_rows = [zeros_row, zeros_row]  # encoded input rows i-2 and i-1, (B, C+1, W)
        self.current = []                    # encoded inputs (B, C+1) of row i, added by feed()
        self.row = -1

    def next_row(self) -> None:
        """The u stream for the next row, and everything of the ul stream that only looks up."""
        model, b, w, dt = self.model, self.b, self.w, self.dt
        f = model.config.filters
        if self.row >= 0:
            self.x_rows = [self.x_rows[1], torch.stack(self.current, dim=-1)]
            self.current = []
        self.row += 1
        if self.row == 0:
            u = self.x_rows[1].new_zeros(b, f, w)
            self.up = self.x_rows[1].new_zeros(w, b, f)
        else:
            u = _row_conv(model.u_init, *self.x_rows)  # down_shift(u_init)(i)
            self.up = F.conv2d(F.pad(self.x_rows[1][:, :, None], (1, 1, 0, 0)),
                               model.ul_init_up.weight,
                               model.ul_init_up.bias)[:, :, 0].permute(2, 0, 1)  # (W, B, F)
        self.aux = []
        for blk, ul_blk, cache in zip(model.u_blocks, model.ul_blocks, self.u_prev):
            cu = concat_elu(u)
            c1 = concat_elu(_row_conv(blk.conv1, cache[0].pop(0), cu))
            cache[0].append(cu)
            c2 = _row_conv(blk.conv2, cache[1].pop(0), c1)
            cache[1].append(c1)
            ga, gb = c2.chunk(2, dim=1)
            u = u + ga * torch.sigmoid(gb)
            self.aux.append(F.conv1d(concat_elu(u), ul_blk.aux.weight[..., 0],
                                     ul_blk.aux.bias).permute(2, 0, 1))  # (W, B, F)
        for cache in (self.left, *[c for pair in self.ul_caches for c in pair]):
            cache.next_row()
        self.from_left = 0.0  # right_shift(ul_init_left(x))(i, j): the conv's output at (i, j-1)

    def features(self, j: int) -> torch.Tensor:
        """h at (row, j), (B, F): what the head reads there."""
        ul = self.up[j] + self.from_left
        for (cache1, cache2), a in zip(self.ul_caches, self.aux):
            c1 = concat_elu(cache1.step(j, concat_elu(ul)) + a[j])
            ga, gb = cache2.step(j, c1).chunk(2, dim=1)
            ul = ul + ga * torch.sigmoid(gb)
        return F.elu(ul)

    def channel(self, h: torch.Tensor, c: int, previous: list) -> torch.Tensor:
        """The 256 logits (B, 256) of channel c at the position of ``h``, given the decided
        values (B,) of channels 0..c-1 there."""
        return self.model.head.channel(h, c, previous)

    def feed(self, j: int, values: torch.Tensor) -> None:
        """The decided values (B, C) of pixel (row, j): context for everything after it."""
        encoded = PixelCNN.encode(values[:, :, None, None])[:, :, 0, 0].to(self.dt)  # (B, C+1)
        self.current.append(encoded)  # positions come in order: this is column j
        self.from_left = self.left.step(j, encoded)
