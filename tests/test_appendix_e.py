"""Appendix E: L-BFGS-B's objective, its runs, and the comparison end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pdray import appendix_e
from conftest import tiny_pixelcnn
from test_cli import assert_clean_error, pdray


@pytest.mark.parametrize("channels,head", [(3, "free"), (1, "mixture")])
def test_continuous_log_prob_is_log_prob_at_whole_levels_and_its_gradient_is_right(channels, head):
    model = tiny_pixelcnn(channels, filters=8, blocks=2, head=head).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, channels, 5, 4), generator=g)
    # Not to 1e-12: integer pixels are scaled to [-1, 1] in float32 before the network.
    assert torch.allclose(model.log_prob_continuous(x.double()), model.log_prob(x), rtol=1e-9)
    # Between levels: autograd against central differences, on a few sub-pixels.
    z = (x.double() + torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.8 + 0.1)
    z = z.clamp(0.1, 254.9).requires_grad_(True)
    grad, = torch.autograd.grad(model.log_prob_continuous(z).sum(), z)
    for idx in [(0, 0, 0, 0), (1, channels - 1, 2, 3), (0, 0, 4, 1)]:
        h = 1e-5
        up, down = z.detach().clone(), z.detach().clone()
        up[idx] += h
        down[idx] -= h
        numeric = (model.log_prob_continuous(up) - model.log_prob_continuous(down)).sum() / (2 * h)
        assert grad[idx].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-8)


def test_lbfgsb_runs_stay_in_the_box_on_whole_levels_and_repeat():
    model = tiny_pixelcnn(1, filters=8, blocks=2)
    image = np.random.default_rng(0).integers(0, 256, (6, 5, 1), dtype=np.uint8)
    runs, iterations = appendix_e.lbfgsb_purify(model, image, 16, starts=3, maxiter=5, seed=1)
    assert runs.shape == (3, 6, 5, 1) and runs.dtype == np.uint8
    assert np.abs(runs.astype(int) - image).max() <= 16
    assert (iterations >= 1).all() and (iterations <= 5).all()
    assert len({r.tobytes() for r in runs}) == 3  # three starts, three ends
    again, _ = appendix_e.lbfgsb_purify(model, image, 16, starts=3, maxiter=5, seed=1)
    assert np.array_equal(runs, again)


def test_appendix_e_writes_its_table_and_figure(tmp_path):
    """On the shipped Fashion-MNIST models: one image, two short L-BFGS-B runs."""
    r = pdray("appendix-e", "--dataset", "fmnist", "--n-images", "1", "--starts", "2",
              "--maxiter", "3", "--out", str(tmp_path), "--json")
    summary = json.loads(r.stdout)
    table = pd.read_csv(tmp_path / "appendix_e.csv")
    assert sorted(table.kind) == ["clean", "fgsm", "greedy", "lbfgsb", "lbfgsb"]
    assert (tmp_path / "appendix_e.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["eps_defend"] == 32 and set(summary["mean_bpd"]) == set(appendix_e.KINDS)
    fgsm, greedy = (table[table.kind == k].bpd.item() for k in ("fgsm", "greedy"))
    assert greedy < fgsm  # Algorithm 1 makes the FGSM image more likely


@pytest.mark.parametrize("args,words", [(["--starts", "0"], ["--starts"]),
                                        (["--eps-attack", "300"], ["0..255"])])
def test_appendix_e_bad_input_is_a_clear_error(args, words, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(pdray("appendix-e", "--dataset", "fmnist", "--out", str(out), *args,
                             check=False), *words)
    assert not out.exists()


def test_appendix_e_refuses_an_unwritable_table_before_any_work(tmp_path):
    (tmp_path / "appendix_e.csv").mkdir()  # where the table would go: writing it must fail
    r = pdray("appendix-e", "--dataset", "fmnist", "--n-images", "1", "--starts", "1",
              "--out", str(tmp_path), check=False)
    assert_clean_error(r, "it is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["appendix_e.csv"]
