import numpy as np
import pytest
import torch

from pdray import bench, purify
from conftest import tiny_pixelcnn


@pytest.mark.parametrize("samples,channels", [("fmnist_samples", 1), ("cifar_samples", 3)])
def test_art_reads_the_probabilities_and_picks_their_bounded_argmax(samples, channels, request):
    """IBM ART's PixelDefend is one pass: each sub-pixel becomes the most likely value in
    its eps box under the model's output for the unpurified image. Computed directly, the
    same rule must give ART's output exactly (it did not while ART read the logits)."""
    images = request.getfixturevalue(samples)[0][:3]
    model = tiny_pixelcnn(channels)
    out = bench.art_pixeldefend(model, images, 8, batch_size=3)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).long()
    with torch.no_grad():
        probs = torch.softmax(model(x), -1).reshape(-1, 256)
    lo, hi = purify._bounds(x, torch.full((3,), 8))
    direct = purify._decide(probs, lo.reshape(-1), hi.reshape(-1))[0].view(x.shape)
    assert np.array_equal(out, direct.numpy().transpose(0, 2, 3, 1).astype(np.uint8))
    assert (out != images).mean() > 0.3  # not vacuous
