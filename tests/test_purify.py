import numpy as np
import pytest
import torch

from pdray import purify
from pdray.pixelcnn import bits_per_dim
from conftest import tiny_pixelcnn


@pytest.mark.parametrize("channels,logistic,head,dilations",
                         [(1, False, "free", ()), (3, False, "free", ()), (3, True, "free", ()),
                          (1, False, "mixture", ()), (3, False, "mixture", ()),
                          (3, True, "free", (1, 3, 2))])
def test_fast_equals_reference_in_float64(channels, logistic, head, dilations, fmnist_samples,
                                          cifar_samples):
    images = (fmnist_samples if channels == 1 else cifar_samples)[0][:4, 4:14, 5:13]
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).long()
    eps = torch.tensor([16, 4, 0, 255])
    model = tiny_pixelcnn(channels, filters=16, blocks=3, logistic=logistic, head=head,
                          dilations=dilations).double()
    ref, ref_logp = purify.reference_batch(model, x, eps)
    fast, fast_logp = purify.fast_batch(model, x, eps)
    assert torch.equal(ref, fast)
    # The decoding's likelihood is the purified image's, as a full forward pass gives it.
    assert torch.allclose(fast_logp, model.log_prob(fast).double(), rtol=1e-9)
    assert torch.allclose(ref_logp, fast_logp, rtol=1e-9)
    assert (ref != x).float().mean() > 0.3  # the test is not vacuous
    assert torch.equal(ref[2], x[2])  # eps 0 leaves an image as it is
    moved = (ref - x).abs().amax(dim=(1, 2, 3)).tolist()
    assert moved[0] <= 16 and moved[1] <= 4 and moved[3] > 16  # each inside its own ball


def test_fast_float32_agrees_with_reference(cifar_samples):
    images = cifar_samples[0][:6, :12, :12]
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).long()
    eps = torch.full((6,), 16)
    model = tiny_pixelcnn(3, filters=16, blocks=3)
    ref, _ = purify.reference_batch(model.double(), x, eps)
    fast, _ = purify.fast_batch(model.float(), x, eps)
    agreement = (ref == fast).float().mean().item()
    print(f"float32 agreement {agreement:.5f} over {ref.numel()} sub-pixels")
    assert agreement >= 0.999


def test_reference_steps_touch_only_the_first_subpixels(fmnist_samples):
    x = torch.from_numpy(fmnist_samples[0][:2, :6, :6].transpose(0, 3, 1, 2).copy()).long()
    model = tiny_pixelcnn(1)
    out, _ = purify.reference_batch(model, x, torch.full((2,), 255), steps=5)
    changed = (out != x).view(2, -1)
    assert not changed[:, 5:].any() and changed[:, :5].any()


def test_pixeldefend_returns_the_bits_per_dim_of_what_it_returns(fmnist_samples):
    images = fmnist_samples[0][:5, :10, :10]
    model = tiny_pixelcnn(1)
    out, bpd = purify.pixeldefend(model, images, [16, 0, 8, 0, 255], batch_size=2,
                                  return_bpd=True)
    assert np.array_equal(out[[1, 3]], images[[1, 3]])  # eps 0: untouched, scored by a pass
    np.testing.assert_allclose(bpd, bits_per_dim(model, out), rtol=1e-4)


def test_defend_applies_each_defense_and_adaptive_alone_purifies_only_what_it_needs(
        fmnist_samples):
    images = fmnist_samples[0][:6, :10, :10]
    model = tiny_pixelcnn(1)
    threshold = float(np.median(bits_per_dim(model, images)))  # half below, half above
    every = purify.defend(model, images, ["none", "squeeze", "pixeldefend", "adaptive"], 16,
                          threshold=threshold, batch_size=4)
    alone = purify.defend(model, images, ["adaptive"], 16, threshold=threshold, batch_size=4)
    np.testing.assert_array_equal(every["adaptive"].images, alone["adaptive"].images)
    np.testing.assert_array_equal(every["adaptive"].eps_defend, alone["adaptive"].eps_defend)
    # The decoding's likelihood depends on the batch's float32 sums in its last digits.
    np.testing.assert_allclose(every["adaptive"].bpd, alone["adaptive"].bpd, rtol=1e-6)
    eps = alone["adaptive"].eps_defend
    keep = eps == 0
    assert keep.any() and (eps[~keep] == 16).all()
    assert np.array_equal(alone["adaptive"].images[keep], images[keep])
    assert np.array_equal(every["adaptive"].images[~keep], every["pixeldefend"].images[~keep])
    assert np.array_equal(every["none"].images, images) and not every["none"].eps_defend.any()
    assert np.array_equal(every["squeeze"].images, purify.feature_squeeze(images))
    assert (every["pixeldefend"].eps_defend == 16).all()
    for d in every.values():
        np.testing.assert_allclose(d.bpd, bits_per_dim(model, d.images), rtol=1e-4)


def test_feature_squeeze_levels_and_median():
    flat = np.full((1, 4, 4, 1), 100, dtype=np.uint8)
    out = purify.feature_squeeze(flat)
    assert np.all(out == out[0, 0, 0, 0]) and abs(int(out[0, 0, 0, 0]) - 100) <= 4
    grid = np.rint(np.arange(32) * 255 / 31).astype(np.uint8)  # the 32 levels in 0..255
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert set(np.unique(purify.feature_squeeze(every_value))) <= set(grid)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    assert set(np.unique(purify.feature_squeeze(noisy))) <= set(grid)
    spike = np.zeros((1, 4, 4, 1), dtype=np.uint8)
    spike[0, 1, 1] = 255
    assert purify.feature_squeeze(spike).max() == 0  # a lone outlier is filtered out


def test_feature_squeeze_is_xu_et_al_s_median():
    """Levels already on the grid (0, 8, 16, 25 are levels 0..3 of 32): each output is the
    upper middle value of the pixel and its neighbours above and to the left, mirrored at
    the border (EvadeML-Zoo's scipy median_filter, size 2, mode "reflect"). The mean of the
    middle two, 12 at the bottom right, is not a level."""
    x = np.array([[0, 8], [16, 25]], dtype=np.uint8).reshape(1, 2, 2, 1)
    assert purify.feature_squeeze(x)[0, ..., 0].tolist() == [[0, 8], [16, 16]]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    q = np.rint(images / 255.0 * 31) * 255 / 31  # the 32-level image, in 0..255
    expected = np.empty_like(q)
    for i in range(5):
        for j in range(6):
            rows, cols = [max(i - 1, 0), i], [max(j - 1, 0), j]
            window = q[:, rows][:, :, cols].reshape(2, 4, 3)
            expected[:, i, j] = np.sort(window, axis=1)[:, 2]
    assert np.array_equal(purify.feature_squeeze(images), np.rint(expected).astype(np.uint8))


def _monotone_pixelcnn(channels: int, towards: int):
    """A PixelCNN whose every conditional is known: the head's weights are zero and its
    bias rises (towards 255) or falls (towards 0) by one per value, so the most likely
    feasible value is an end of the feasible range, whatever the context."""
    model = tiny_pixelcnn(channels, logistic=False)
    with torch.no_grad():
        for out in model.head.out:
            out.weight.zero_()
            out.bias.copy_(torch.arange(256.0) * (1.0 if towards == 255 else -1.0))
    return model


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("towards", [0, 255])
def test_purifier_reaches_exactly_the_ends_of_the_feasible_range(method, channels, towards):
    """The feasible range is [max(x - eps, 0), min(x + eps, 255)]: both ends are reachable
    and nothing beyond them, at the pixel values 0 and 255 and next to them."""
    values = np.array([0, 1, 7, 8, 9, 100, 246, 247, 248, 254, 255, 128])
    images = np.stack([np.roll(values, k) for k in range(4 * channels)]).reshape(4, 3, 4, channels)
    images = images.astype(np.uint8)
    eps = np.array([8, 1, 255, 0])
    out = purify.pixeldefend(_monotone_pixelcnn(channels, towards), images, eps, method=method)
    x, e = images.astype(int), eps[:, None, None, None]
    expected = np.maximum(x - e, 0) if towards == 0 else np.minimum(x + e, 255)
    assert np.array_equal(out, expected.astype(np.uint8))


# ---- soft Algorithm 1 and the surrogates the adaptive attacks aim through --------------------

SOFT_MODELS = [(1, False, "free", (1, 4, 4)), (3, True, "free", (3, 3, 3)),
               (3, False, "mixture", (3, 3, 3))]


def _soft_case(channels, logistic, head, shape):
    """A tiny float64 PixelCNN, two images on whole levels and each one's eps_defend."""
    model = tiny_pixelcnn(channels, filters=4, blocks=1, logistic=logistic, head=head).double()
    x = torch.randint(40, 216, (2, *shape), generator=torch.Generator().manual_seed(0))
    return model, x.double(), torch.tensor([16, 4])


@pytest.mark.parametrize("channels,logistic,head,shape", SOFT_MODELS)
def test_soft_gradient_matches_finite_differences(channels, logistic, head, shape, tau=0.5):
    """Autograd through the soft decoding (every cached decoder step, the soft values fed
    as context) against central differences, in float64, for every input sub-pixel. The
    gradient is more than BPDA's identity: later sub-pixels follow earlier ones through the
    PixelCNN's context."""
    model, x0, eps = _soft_case(channels, logistic, head, shape)
    w = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda x: (purify.soft_batch(model, x, eps, tau) * w).sum()  # noqa: E731
    x = x0.clone().requires_grad_(True)
    grad, = torch.autograd.grad(f(x), x)
    h, fd = 1e-6, torch.zeros_like(x0)
    for idx in np.ndindex(*x0.shape):
        e = torch.zeros_like(x0)
        e[idx] = h
        fd[idx] = (f(x0 + e) - f(x0 - e)) / (2 * h)
    err = (grad - fd).abs().max().item()
    print(f"max |autograd - finite difference| {err:.2e}; max |gradient - identity| "
          f"{(grad - w).abs().max().item():.2e}")
    assert err < 1e-6 * max(1.0, fd.abs().max().item())
    assert (grad - w).abs().max() > 1e-3  # the context's share is there


@pytest.mark.parametrize("channels,logistic,head,shape", SOFT_MODELS)
def test_soft_tends_to_the_exact_purifier_as_tau_falls(channels, logistic, head, shape):
    """At small tau each soft value is the exact purifier's, except at near-ties: where the
    best two feasible values' logits are closer than tau, the softmax averages them. The
    mixture head's smooth conditionals have such ties at their modes (margins down to
    3e-7 here); wherever the exact decision's margin is 100 tau or more, the soft decoding
    equals it."""
    model, x, eps = _soft_case(channels, logistic, head, shape)
    exact, _ = purify.fast_batch(model, x.long(), eps)
    with torch.no_grad():
        logits = model(exact)  # (B, C, H, W, 256): each conditional given the exact prefix
    lo, hi = purify.bounds(x.long(), eps)
    z = torch.arange(256)
    feasible = (z >= lo[..., None]) & (z <= hi[..., None])
    best = logits.masked_fill(~feasible, float("-inf")).topk(2, dim=-1).values
    clear = best[..., 0] - best[..., 1] > 1e-4  # 100 tau at tau 1e-6
    gaps = {tau: (purify.soft_batch(model, x, eps, tau) - exact).abs()
            for tau in (1.0, 1e-2, 1e-4, 1e-6)}
    print("max |soft - exact| at tau 1, 1e-2, 1e-4, 1e-6:", [g.max().item() for g in gaps.values()],
          f"; decisions clearer than 1e-4: {clear.float().mean().item():.2f}")
    assert gaps[1.0].max() > 1 and clear.float().mean() > 0.75
    assert gaps[1e-6][clear].max() < 1e-6


@pytest.mark.parametrize("defense", ["none", "squeeze", "pixeldefend", "adaptive"])
def test_a_surrogate_returns_its_defenses_output(defense, fmnist_samples):
    """Forward, a surrogate is its defense exactly; backward it has a gradient (BPDA-soft's
    straight-through): through soft Algorithm 1 for PixelDefend, which is what the gradient
    of soft_batch gives."""
    images = fmnist_samples[0][:4, 10:18, 10:18]
    model = tiny_pixelcnn(1)
    bpd = np.sort(bits_per_dim(model, images))
    assert bpd[1] < bpd[2]
    threshold = float(bpd[1:3].mean())  # two purified, two left alone
    exact = purify.defender(model, defense, 16, threshold=threshold)(images)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float().requires_grad_(True)
    out = purify.surrogate(model, defense, 16, threshold=threshold, tau=0.5)(x)
    assert torch.equal(out.detach(), torch.from_numpy(exact.transpose(0, 3, 1, 2)).float())
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grad, = torch.autograd.grad((out * w).sum(), x)
    assert grad.abs().sum() > 0
    if defense == "pixeldefend":
        y = x.detach().clone().requires_grad_(True)
        soft, = torch.autograd.grad((purify.soft_batch(model, y, torch.full((4,), 16), 0.5)
                                     * w).sum(), y)
        torch.testing.assert_close(grad, soft)
    if defense == "squeeze":  # the stand-in: the same median filter, before the rounding
        q = np.rint(images / 255.0 * 31) * 255.0 / 31
        median = purify._median_2x2(torch.from_numpy(q.transpose(0, 3, 1, 2).copy()))
        assert torch.equal(median.round().float(), out.detach())
    if defense == "adaptive":  # the images it leaves alone pass the gradient as it is
        keep = purify.adaptive_eps(bits_per_dim(model, images), threshold, 16) == 0
        assert keep.sum() == 2 and torch.equal(grad[keep], w[keep])
