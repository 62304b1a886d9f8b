import numpy as np
import pytest
import torch

from pdray import purify
from conftest import tiny_pixelcnn


@pytest.mark.parametrize("channels,logistic,head", [(1, False, "free"), (3, False, "free"),
                                                    (3, True, "free"), (1, False, "mixture"),
                                                    (3, False, "mixture")])
def test_fast_equals_reference_in_float64(channels, logistic, head, fmnist_samples, cifar_samples):
    images = (fmnist_samples if channels == 1 else cifar_samples)[0][:4, 4:14, 5:13]
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).long()
    eps = torch.tensor([16, 4, 0, 255])
    model = tiny_pixelcnn(channels, filters=16, blocks=3, logistic=logistic, head=head).double()
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
    from pdray.evaluate import bits_per_dim

    images = fmnist_samples[0][:5, :10, :10]
    model = tiny_pixelcnn(1)
    out, bpd = purify.pixeldefend(model, images, [16, 0, 8, 0, 255], batch_size=2,
                                  return_bpd=True)
    assert np.array_equal(out[[1, 3]], images[[1, 3]])  # eps 0: untouched, scored by a pass
    np.testing.assert_allclose(bpd, bits_per_dim(model, out), rtol=1e-4)


def test_feature_squeeze_levels_and_median():
    flat = np.full((1, 4, 4, 1), 100, dtype=np.uint8)
    out = purify.feature_squeeze(flat)
    assert np.all(out == out[0, 0, 0, 0]) and abs(int(out[0, 0, 0, 0]) - 100) <= 4
    levels = np.unique(purify.feature_squeeze(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)))
    assert len(levels) <= 63  # 32 levels, plus midpoints of the 2x2 median
    spike = np.zeros((1, 4, 4, 1), dtype=np.uint8)
    spike[0, 1, 1] = 255
    assert purify.feature_squeeze(spike).max() == 0  # a lone outlier is filtered out
