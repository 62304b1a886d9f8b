"""A PixelCNN++-style density model with a 256-way softmax per sub-pixel.

Read top to bottom: shifts and shifted convolutions, concat_elu, the gated residual
block, the channel head, then the model and its likelihood helpers.

Design, and why:
- Two streams as in PixelCNN++ (Salimans et al. 2017): ``u`` sees the rows above,
  ``ul`` the rows above and the pixels to the left. Causality comes from shifting and
  padding, not from masked weights.
- One resolution, no down/up-sampling. Every layer then advances one pixel per
  decoding step, so exact incremental decoding (pdray.purify) caches two rows per
  convolution and nothing else; depth provides the receptive field.
- The network runs once per pixel position and produces features ``h``. A small head
  turns ``h`` into the 256-way conditional of each channel, taking the already-decided
  channel values as input (G sees R; B sees R and G), as in the authors' code. So a
  purifier pays one network step per pixel and three cheap head calls.
- Optionally (``logistic``, on for models trained since) the head adds to each channel's
  256 free logits the log-density of a logistic whose mean is linear in the decided
  channels, as PixelCNN++'s mixture component is. The output is still a 256-way softmax,
  but it starts out knowing that nearby values are alike and that G follows R, which the
  free logits alone learn slowly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    channels: int = 1        # 1 for Fashion-MNIST, 3 for CIFAR-10
    filters: int = 64        # width of both streams
    blocks: int = 6          # gated residual blocks per stream; receptive field ~2 rows each
    dropout: float = 0.0     # inside each gated block, as in PixelCNN++ (which used 0.5)
    logistic: bool = False   # the head's logistic logit term; False for weights trained before it


def down_shift(x):  # (B, C, H, W): row i takes row i-1's values, row 0 zeros
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x):  # (B, C, H, W): column j takes column j-1's values
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def concat_elu(x):  # (B, C, ...) -> (B, 2C, ...)
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv2d(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i and columns j-kw//2..j+kw//2."""

    def __init__(self, c_in: int, c_out: int, kernel=(2, 3)):
        super().__init__(c_in, c_out, kernel)

    def forward(self, x):
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, (kw // 2, kw // 2, kh - 1, 0)))


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

    def __init__(self, filters: int, conv: type, aux: bool, dropout: float):
        super().__init__()
        self.conv1 = conv(2 * filters, filters)
        self.aux = nn.Conv2d(2 * filters, filters, 1) if aux else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(2 * filters, 2 * filters)

    def forward(self, x, a=None):  # (B, F, H, W)
        c = self.conv1(concat_elu(x))
        if self.aux is not None:
            c = c + self.aux(concat_elu(a))
        c = self.conv2(self.dropout(concat_elu(c)))  # (B, 2F, H, W)
        gate_a, gate_b = c.chunk(2, dim=1)
        return x + gate_a * torch.sigmoid(gate_b)


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
        decided integer values of channels 0..c-1, each shaped like h without F."""
        a = self.hidden[c](h)
        first = c * (c - 1) // 2  # embeddings of channel c start here
        for k in range(c):
            a = a + self.embed[first + k](previous[k])
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


def log_prob(logits, x):  # logits (B, C, H, W, 256), x (B, C, H, W) -> (B,) nats
    logp = F.log_softmax(logits, dim=-1)
    return logp.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).flatten(1).sum(1)


def bpd(logits, x):  # -> (B,) bits per dimension
    return -log_prob(logits, x) / (x[0].numel() * math.log(2))


class PixelCNN(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c, f = config.channels, config.filters
        self.u_init = DownShiftedConv2d(c + 1, f, (2, 3))
        self.ul_init_up = DownShiftedConv2d(c + 1, f, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(c + 1, f, (2, 1))
        self.u_blocks = nn.ModuleList(
            GatedResnet(f, DownShiftedConv2d, False, config.dropout) for _ in range(config.blocks))
        self.ul_blocks = nn.ModuleList(
            GatedResnet(f, DownRightShiftedConv2d, True, config.dropout) for _ in range(config.blocks))
        self.head = ChannelHead(f, c, config.logistic)

    @staticmethod
    def encode(x):  # (B, C, H, W) in 0..255 -> (B, C+1, H, W) in [-1, 1] plus a ones plane
        x = x.float() / 127.5 - 1.0
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

    def log_prob(self, x):  # (B, C, H, W) 0..255 -> (B,) log p(x) in nats
        return log_prob(self.forward(x), x)

    def bpd(self, x):  # (B, C, H, W) -> (B,) bits per dimension
        return bpd(self.forward(x), x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
