"""The training steps on the CPU, without Ray: each recipe, the PixelCNN step, the batches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdray import recipes
from pdray.config import ClassifierConfig, PixelCNNConfig, Recipe
from pdray.pixels import to_nchw
from conftest import tiny_classifier, tiny_pixelcnn


def test_the_workers_batches_split_each_global_batch():
    one = list(recipes.batches(20, 8, seed=0, epoch=1))
    two = [list(recipes.batches(20, 8, seed=0, epoch=1, rank=r, world=2)) for r in range(2)]
    assert [s for s, _ in one] == [0, 1]  # the last, partial batch is dropped
    for (s, idx), (_, a), (_, b) in zip(one, *two):
        assert np.array_equal(idx, np.concatenate([a, b]))
    assert not np.array_equal(one[0][1], next(recipes.batches(20, 8, seed=0, epoch=2))[1])


def test_label_smoothing_softens_the_targets():
    logits, y = torch.randn(5, 10), torch.arange(5)
    assert torch.allclose(recipes.smoothed_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))
    assert recipes.smoothed_cross_entropy(logits, y, 0.1) != F.cross_entropy(logits, y)


@pytest.mark.parametrize("recipe", [r.value for r in Recipe])
def test_each_recipe_takes_a_step(recipe, fmnist_samples):
    images, labels = fmnist_samples
    model = tiny_classifier(1)
    cfg = ClassifierConfig(recipe=recipe, lr=0.01).resolved()
    opt = recipes.classifier_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    x = recipes.augment(to_nchw(images[:8]).float(), 2, True, gen)
    model.train()
    loss = recipes.classifier_loss(model, x, torch.from_numpy(labels[:8]), cfg, gen)
    recipes.sgd_step(opt, loss, recipes.lr_at(0, 10, cfg.lr, warmup=2))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.training  # adversarial examples are made in eval mode, then it is restored


def test_the_pixelcnn_step_lowers_the_loss_and_averages_the_weights(fmnist_samples):
    model = tiny_pixelcnn(1)
    cfg = PixelCNNConfig(lr=1e-2)
    ema = recipes.averaged(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x = to_nchw(fmnist_samples[0][:8, :10, :10])
    objective = recipes.BitsPerDim(model)
    losses = [recipes.pixelcnn_step(objective, model, ema, opt, x, step, cfg)[0].item()
              for step in range(5)]
    assert losses[-1] < losses[0]
    context = recipes.noisy(x, 8.0, torch.Generator().manual_seed(0))
    loss, _ = recipes.pixelcnn_step(objective, model, ema, opt, x, 5, cfg, context)
    assert torch.isfinite(loss) and loss.item() != pytest.approx(objective(x).mean().item())
    averaged, last = ema.module.state_dict(), model.state_dict()
    assert any(not torch.equal(averaged[k], last[k]) for k in last)
