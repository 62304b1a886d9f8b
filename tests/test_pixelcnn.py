import numpy as np
import pytest
import torch

from conftest import tiny_pixelcnn


def raster_channel_order(t):  # (B, C, H, W[, ...]) -> (B, H*W*C, ...)
    return t.permute(0, 2, 3, 1, *range(4, t.dim())).reshape(t.shape[0], -1, *t.shape[4:])


HEADS = [(1, False, "free"), (1, True, "free"), (3, False, "free"), (3, True, "free"),
         (1, False, "mixture"), (3, False, "mixture")]


@pytest.mark.parametrize("channels,logistic,head", HEADS)
def test_causality(channels, logistic, head):
    """The conditional of sub-pixel i does not change when any sub-pixel at or after i
    changes, for every i; and it does depend on earlier sub-pixels. Each sub-pixel in
    turn: redraw it and everything after it, compare all conditionals up to it."""
    model = tiny_pixelcnn(channels, filters=8, blocks=2, logistic=logistic, head=head).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, channels, 6, 5), generator=g)
    with torch.no_grad():
        base = raster_channel_order(model(x))[0]  # (D, 256)
        n = base.shape[0]
        flat = raster_channel_order(x)[0]
        depends_on_earlier = 0
        for i in range(n):
            y = flat.clone()
            y[i:] = torch.randint(0, 256, (n - i,), generator=g)
            y = y.view(1, 6, 5, channels).permute(0, 3, 1, 2)
            out = raster_channel_order(model(y))[0]
            # Float64 round-off (1e-16) aside: a leak would move the logits by ~1e-2.
            leak = (out[:i + 1] - base[:i + 1]).abs().max().item()
            assert leak < 1e-12, f"sub-pixel {i} saw the future ({leak})"
            depends_on_earlier += int(not torch.allclose(out[i + 1:], base[i + 1:]))
        assert depends_on_earlier == n - 1


def test_bpd_and_log_prob_agree():
    model = tiny_pixelcnn(3)
    x = torch.randint(0, 256, (2, 3, 4, 4))
    with torch.no_grad():
        lp, bpd = model.log_prob(x), model.bpd(x)
    assert torch.allclose(bpd, -lp / (48 * np.log(2)))
    assert torch.all(bpd > 0)


@pytest.mark.parametrize("channels,logistic,head", HEADS)
def test_each_conditional_is_a_distribution_and_log_prob_reads_it(channels, logistic, head):
    """Every head gives a normalised 256-way distribution per sub-pixel (Algorithm 1 and the
    p-values rely on it), and the cheap ``log_prob`` path reads the same numbers."""
    model = tiny_pixelcnn(channels, logistic=logistic, head=head).double()
    x = torch.randint(0, 256, (2, channels, 5, 4), generator=torch.Generator().manual_seed(1))
    x[0, :, 0, 0], x[0, :, 0, 1] = 0, 255  # the end bins, which reach to -inf and +inf
    with torch.no_grad():
        logits = model(x)
        logp = torch.log_softmax(logits, -1).gather(-1, x[..., None]).squeeze(-1)
        assert torch.allclose(model.log_prob(x), logp.flatten(1).sum(1), rtol=1e-12)
        if head == "mixture":  # already log-probabilities, not just logits
            assert torch.logsumexp(logits, -1).abs().max() < 1e-12


def test_mixture_head_is_smooth_and_conditions_on_decided_channels():
    """A one-component mixture is a binned logistic: unimodal in v, and G's mode moves
    with R through the linear coefficient, as in PixelCNN++."""
    from pdray.pixelcnn import MixtureHead

    head = MixtureHead(filters=4, channels=3, mixtures=1).double()
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.params[1].bias[0] = 0.0    # G's mean
        head.params[1].bias[1] = -3.0   # G's log scale
        head.params[1].bias[2] = 5.0    # tanh(5) ~ 1: G follows R
        h = torch.zeros(2, 4, dtype=torch.float64)
        r = torch.tensor([40, 200])
        g = head.channel(h, 1, [r])  # (2, 256)
    modes = g.argmax(-1)
    assert (modes - r).abs().max() <= 2  # G's mean is R's value (tanh(5) = 0.9999)
    # Unimodal inside 1..254 (the end bins also hold the tails beyond 0 and 255).
    diffs = torch.diff(g[:, 1:255], dim=-1)
    for row, m in zip(diffs, modes - 1):
        assert torch.all(row[:m] > 0) and torch.all(row[m + 1:] < 0)


@pytest.mark.parametrize("head", ["free", "mixture"])
def test_log_prob_scores_x_given_the_context_it_is_given(head):
    """Context-noise training scores the clean sub-pixels conditioned on a perturbed past:
    the context moves every conditional, including the channels' own (G given R), while
    the values scored stay x's; without a context it is x's own likelihood."""
    model = tiny_pixelcnn(3, logistic=True, head=head).double()
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    context = (x + torch.randint(-8, 9, x.shape)).clamp(0, 255)
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, x), model.log_prob(x))
        logp = torch.log_softmax(model(context), -1).gather(-1, x[..., None]).squeeze(-1)
        assert torch.allclose(model.log_prob(x, context), logp.flatten(1).sum(1), rtol=1e-12)
        assert not torch.allclose(model.log_prob(x, context), model.log_prob(x))
