import numpy as np
import pytest
import torch

from conftest import tiny_pixelcnn


def raster_channel_order(t):  # (B, C, H, W[, ...]) -> (B, H*W*C, ...)
    return t.permute(0, 2, 3, 1, *range(4, t.dim())).reshape(t.shape[0], -1, *t.shape[4:])


@pytest.mark.parametrize("channels,logistic", [(1, False), (1, True), (3, False), (3, True)])
def test_causality(channels, logistic):
    """The conditional of sub-pixel i does not change when any sub-pixel at or after i
    changes, for every i; and it does depend on earlier sub-pixels. Each sub-pixel in
    turn: redraw it and everything after it, compare all conditionals up to it."""
    model = tiny_pixelcnn(channels, filters=8, blocks=2, logistic=logistic).double()
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
