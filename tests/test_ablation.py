import numpy as np
import pytest

from pdray import ablation, purify
from pdray.config import Purifier
from pdray.errors import PdrayError
from conftest import tiny_classifier, tiny_pixelcnn


def test_jpeg_copy_matches_the_error_it_is_chosen_for(fmnist_samples, cifar_samples):
    images = fmnist_samples[0]
    copy = ablation.jpeg(images, ablation.FMNIST_MATCHED_QUALITY)
    assert copy.dtype == np.uint8 and copy.shape == images.shape
    error = np.abs(copy.astype(int) - images).mean()
    assert 4.0 < error < 9.0  # the CIFAR-10 copy's 6.24, on 20 images rather than 2,000
    assert np.abs(ablation.jpeg(images, 100).astype(int) - images).mean() < 1.0
    assert ablation.jpeg(cifar_samples[0][:2], 75).shape == (2, 32, 32, 3)


def test_probe_reports_where_purification_goes(fmnist_samples):
    images, labels = fmnist_samples[0][:4], fmnist_samples[1][:4]
    pixelcnn, classifier = tiny_pixelcnn(1), tiny_classifier(1)
    untouched = ablation.probe(pixelcnn, classifier, images, labels, eps_defend=0,
                               inputs=("clean", "fgsm"))
    assert [r["input"] for r in untouched] == ["clean", "fgsm"]
    for r in untouched:  # eps_defend 0 leaves every image as it is
        assert r["accuracy_after"] == r["accuracy_before"]
        assert r["purified_to_clean"] == r["input_to_clean"]
        assert r["bpd_after"] == pytest.approx(r["bpd_before"])
    assert untouched[0]["input_to_clean"] == 0 and untouched[1]["input_to_clean"] > 0
    assert untouched[1]["perturbation_kept"] == pytest.approx(1.0)  # nothing purified away
    # ...so the change is all kept share, and nothing is left for the residual to do
    assert untouched[1]["accuracy_at_kept"] == untouched[1]["accuracy_before"]
    assert untouched[1]["residual"] == pytest.approx(0.0, abs=1e-9)
    assert untouched[1]["accuracy_at_residual"] == untouched[0]["accuracy_before"]
    assert 0.0 <= untouched[1]["auc_vs_clean"] <= 1.0 and "auc_vs_clean" not in untouched[0]
    # Nothing purified: the model sees the clean past in the clean row either way.
    assert untouched[0]["mode_to_clean"] == untouched[0]["mode_to_clean_given_clean_past"]
    for r in untouched:  # a ball of one value leaves no choice, whatever the past
        assert r["accuracy_given_clean_past"] == r["accuracy_given_input_past"] == r["accuracy_before"]
    assert "context_gain_by_channel" not in untouched[1]  # one channel: context_gain says it
    clean, anywhere = ablation.probe(pixelcnn, classifier, images, labels, eps_defend=255,
                                     inputs=("clean", "fgsm"))
    # The whole range is feasible: every value is the model's mode, whatever the input was.
    assert anywhere["model_decided_fraction"] == 1.0 and anywhere["perturbation_kept"] == 0.0
    assert anywhere["accuracy_at_kept"] == clean["accuracy_after"] and anywhere["residual"] == 0
    moved = ablation.probe(pixelcnn, classifier, images, labels, eps_defend=4, inputs=("clean",))[0]
    assert 0 < moved["purified_to_clean"] <= 4 and 0 < moved["edge_fraction"] <= 1


def test_lbfgsb_purifier_climbs_the_likelihood_inside_the_ball(fmnist_samples):
    images, labels = fmnist_samples[0][:3], fmnist_samples[1][:3]
    pixelcnn, classifier = tiny_pixelcnn(1), tiny_classifier(1)
    untouched = ablation.probe(pixelcnn, classifier, images, labels, eps_defend=0,
                               inputs=("clean",), purifier=Purifier.LBFGSB, maxiter=3)[0]
    assert untouched["purifier"] == "lbfgsb" and untouched["purified_to_clean"] == 0
    rows = ablation.probe(pixelcnn, classifier, images, labels, eps_defend=8,
                          inputs=("clean", "fgsm"), purifier=Purifier.LBFGSB, maxiter=10)
    for r in rows:  # from the input, uphill, and never out of the box
        assert r["bpd_after"] < r["bpd_before"]
        assert 0 < r["purified_to_clean"] <= r["input_to_clean"] + 8


def test_ablate_refuses_bpda_and_unknown_attacks_before_any_work(tmp_path):
    for names, message in [(("fgsm", "bpda"), "BPDA"), (("bpda-soft",), "BPDA-soft"),
                           (("fgsn",), "attack")]:
        with pytest.raises(PdrayError, match=message):  # an empty folder: no data was read
            ablation.run("fmnist", "fmnist-pixelcnn", attack_names=names, data_dir=tmp_path)
    for kwargs, message in [({"purifier": "adam"}, "purifier"), ({"maxiter": 0}, "maxiter")]:
        with pytest.raises(PdrayError, match=message):
            ablation.run("fmnist", "fmnist-pixelcnn", data_dir=tmp_path, **kwargs)


def test_one_pass_makes_algorithm_1s_choices_from_a_fixed_past(cifar_samples):
    images, labels = cifar_samples[0][:2], cifar_samples[1][:2]
    pixelcnn = tiny_pixelcnn(3)
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.integers(-8, 9, images.shape), 0, 255).astype(np.uint8)
    free = ablation.model_modes(pixelcnn, images)
    bounded = purify.one_pass(pixelcnn, noisy, 4, past=images, batch_size=1)
    assert np.abs(bounded.astype(int) - noisy).max() <= 4
    inside = np.abs(free.astype(int) - noisy) <= 4  # the bound binds only where the mode is out
    assert inside.any() and (~inside).any() and (bounded[inside] == free[inside]).all()
    # Given the purified image as its past, each choice is the one Algorithm 1 made.
    purified = purify.pixeldefend(pixelcnn, noisy, 4, method="reference")
    assert (purify.one_pass(pixelcnn, noisy, 4, past=purified) == purified).all()
    row = ablation.probe(pixelcnn, tiny_classifier(3), images, labels, eps_defend=4,
                         inputs=("fgsm",))[0]
    assert len(row["context_gain_by_channel"]) == 3
    assert all(np.isfinite(g) for g in [row["context_gain"], *row["context_gain_by_channel"]])
