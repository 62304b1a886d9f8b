import numpy as np
import pytest
import torch

from pdray import attacks, purify
from pdray.errors import PdrayError
from pdray.classifiers import predict
from conftest import tiny_classifier, tiny_pixelcnn


@pytest.mark.parametrize("name", [a.value for a in attacks.Attack])
@pytest.mark.parametrize("eps_attack", [2, 8])
@pytest.mark.parametrize("samples", ["fmnist_samples", "cifar_samples"])
def test_attack_invariants(name, eps_attack, samples, request):
    images, labels = request.getfixturevalue(samples)
    images, labels = images[:6], labels[:6]
    model = tiny_classifier(images.shape[-1])
    adv = attacks.attack(name, model, images, labels, eps_attack, cw_steps=10,
                         cw_binary_search_steps=2, deepfool_steps=10, bpda_steps=5,
                         defend=purify.feature_squeeze,  # the defense BPDA attacks through
                         surrogate=purify.surrogate(None, "squeeze", 0))  # and BPDA-soft
    assert adv.dtype == np.uint8 and adv.shape == images.shape
    delta = adv.astype(np.int16) - images.astype(np.int16)
    assert np.abs(delta).max() <= eps_attack  # inside the eps ball, integer pixels
    # and it did something; BPDA leaves images the defended model already gets wrong alone,
    # and DeepFool and CW images they cannot fool (whether they hurt is tested below)
    assert np.abs(delta).max() > 0 or name in ("bpda", "bpda-soft", "deepfool", "cw")
    if name in ("fgsm",):
        # FGSM moves every sub-pixel by exactly eps unless a bound clips it.
        clipped = (images.astype(int) + eps_attack > 255) | (images.astype(int) - eps_attack < 0)
        assert np.all((np.abs(delta) == eps_attack) | clipped)


def fitted_classifier(images, labels, seed: int = 0):
    """The tiny model trained to fit the 20 sample images."""
    model = tiny_classifier(1, seed).train()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).float()
    y = torch.from_numpy(labels)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(), loss.backward(), opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def fitted(fmnist_samples):
    return fitted_classifier(*fmnist_samples)


@pytest.mark.parametrize("name", ["fgsm", "bim", "deepfool", "cw"])
def test_attacks_lower_accuracy_of_a_trained_model(name, fitted, fmnist_samples):
    """Gradient attacks must hurt: the tiny model fits the 20 images, then is attacked.
    CW gets 5 x 100 steps: with the pipeline's 3 x 50 its L2-minimal perturbations of this
    overconfident model are still large (L-inf up to 180 levels), so the clip to eps 32
    leaves 70% correct. DeepFool gets 10 of its 50 steps, which leave 30% correct here (50
    leave 25%, in 3x the time). (BPDA: test_bpda_breaks_a_defense_that_fgsm_only_weakens.)"""
    images, labels = fmnist_samples
    assert (predict(fitted, images) == labels).mean() == 1.0
    adv = attacks.attack(name, fitted, images, labels, 32, cw_steps=100, cw_binary_search_steps=5,
                         deepfool_steps=10)
    assert (predict(fitted, adv) == labels).mean() < 0.5


@pytest.mark.parametrize("samples", ["fmnist_samples", "cifar_samples"])
def test_deepfool_is_foolboxs_deepfool(samples, fitted, request):
    """pdray's DeepFool loop drops images once they are adversarial and shares one forward
    pass among the candidate classes; each image must still get foolbox's iterates. Some
    images flip at the first step and some later (on Fashion-MNIST some not within 10), so
    the batch shrinks along the way."""
    import foolbox as fb
    images, labels = request.getfixturevalue(samples)
    model = fitted if images.shape[-1] == 1 else tiny_classifier(3)
    for steps in (1, 10):
        ref, ref_found = attacks._foolbox(fb.attacks.L2DeepFoolAttack(steps=steps, candidates=10),
                                          model, images, labels, None)
        ours, found = attacks.l2_deepfool(model, images, labels, steps=steps)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
        assert np.array_equal(found, ref_found)
        if steps == 1:
            assert 0 < found.sum() < len(found)


class ConstantLogits(torch.nn.Module):
    """A classifier no attack can fool: class 3 for every image, whatever its pixels, except
    an all-black one, which it calls class 5. So foolbox's success flag is True for CW's
    black starting point although CW finds nothing."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(-(torch.arange(10.0) - 3).abs())

    def forward(self, x):  # (B, C, H, W) in 0..255 -> (B, 10); zero gradient everywhere
        black = (x.flatten(1).amax(1) < 1).float()[:, None]
        shift = torch.zeros(10)
        shift[5] = 10.0
        return self.logits + black * shift + 0.0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("name", ["deepfool", "cw"])
def test_a_failed_minimisation_attack_returns_the_original(name, fmnist_samples):
    """Images 0..2 are classified correctly (label 3) and cannot be fooled; images 3..5 are
    already wrong. Either way the attack's output is exactly the input, not foolbox's
    starting point (a black image for CW) clipped into the eps ball."""
    images = fmnist_samples[0][:6]
    labels = np.array([3, 3, 3, 0, 1, 2])
    model = ConstantLogits()
    for eps, adv in zip((8, 25), attacks.attack_many(name, model, images, labels, [8, 25],
                                                     cw_steps=20, deepfool_steps=10)):
        assert np.array_equal(adv, images), (name, eps)


@pytest.mark.parametrize("name", ["deepfool", "cw"])
def test_an_image_already_misclassified_is_left_unchanged(name, fitted, fmnist_samples):
    """With labels the trained model gets wrong, CW's first iterate (the image after its
    tanh round trip, up to 1.4e-4 of a level off) is already adversarial: rounding must
    not turn that float noise into a one-level perturbation."""
    images, labels = fmnist_samples
    wrong = (labels + 1) % 10
    assert not (predict(fitted, images) == wrong).any()
    adv = attacks.attack(name, fitted, images, wrong, 8)
    assert np.array_equal(adv, images)


def test_bpda_breaks_a_defense_that_fgsm_only_weakens(fmnist_samples):
    """BPDA aims at the classifier behind the defense, and stops moving an image once the
    defended image is misclassified; it needs a defense to aim through."""
    images, labels = fmnist_samples
    model = fitted_classifier(images, labels)
    squeezed_acc = lambda x: (predict(model, purify.feature_squeeze(x)) == labels).mean()  # noqa: E731
    assert squeezed_acc(images) >= 0.8
    adv = attacks.attack("bpda", model, images, labels, 16, defend=purify.feature_squeeze,
                         bpda_steps=20)
    assert squeezed_acc(adv) < 0.5
    assert squeezed_acc(adv) <= squeezed_acc(attacks.attack("fgsm", model, images, labels, 16))
    assert np.abs(adv.astype(int) - images.astype(int)).max() <= 16
    for schedule, alpha in (("constant", 1), ("halving", 16 // 4)):
        one_step = attacks.attack("bpda", model, images, labels, 16, bpda_steps=1,
                                  bpda_schedule=schedule, defend=purify.feature_squeeze)
        assert np.abs(one_step.astype(int) - images.astype(int)).max() == alpha
    with pytest.raises(PdrayError, match="needs a defense"):
        attacks.attack("bpda", model, images, labels, 16)
    with pytest.raises(PdrayError, match="needs a defense's surrogate"):
        attacks.attack("bpda-soft", model, images, labels, 16)
    with pytest.raises(PdrayError, match="Unknown BPDA schedule"):
        attacks.attack("bpda", model, images, labels, 16, defend=purify.feature_squeeze,
                       bpda_schedule="cosine")


class StartDecides(torch.nn.Module):
    """A classifier whose gradient is zero, so an adaptive attack never moves from where a
    restart puts it: label 0 always wins, except where sub-pixel (0, 0) is odd
    (``fooled_by_odd``), which makes class 1 win. Otherwise the loss rises with that
    sub-pixel's value and never reaches a mistake."""

    def __init__(self, fooled_by_odd: bool):
        super().__init__()
        self.fooled_by_odd = fooled_by_odd
        self.bias = torch.nn.Parameter(torch.zeros(2))  # where the attacks find the device

    def forward(self, x):  # (B, C, H, W) in 0..255 -> (B, 2)
        v = x[:, 0, 0, 0].detach()
        one = torch.where(v % 2 == 1, 10.0, -10.0) if self.fooled_by_odd else v / 255 - 10
        logits = torch.stack([torch.zeros_like(v), one], 1) + self.bias
        return logits + 0.0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("schedule", ["constant", "halving"])
def test_restarts_keep_each_images_worst_case(schedule):
    """Restart 0 starts from the clean image, restart r from the clean image plus the
    uniform noise seeded by (seed, image id, eps_attack, r). With a zero gradient nothing
    moves, so where each image ends is known: the first restart whose image is
    misclassified; else the restart with the highest loss; and with one restart, plain
    BPDA, the clean image."""
    images = np.full((8, 4, 4, 1), 100, dtype=np.uint8)
    ids = np.arange(30, 38)
    labels, eps, restarts = np.zeros(8, int), 8, 4
    identity = dict(defend=lambda x: x, bpda_steps=3, bpda_schedule=schedule, seed=5,
                    image_ids=ids)
    starts = [images.astype(int)] + [np.clip(images + attacks._uniform_noise(
        images.shape, eps, 5, ids, r), 0, 255) for r in range(1, restarts)]
    odd = np.stack([s[:, 0, 0, 0] % 2 == 1 for s in starts], 1)  # (image, restart)
    first = np.where(odd.any(1), odd.argmax(1), 0)
    assert not odd[:, 0].any() and odd[:, 1:].any(1).sum() not in (0, 8)  # not vacuous
    assert (first >= 2).any()  # some image needs more than one random restart

    model = StartDecides(fooled_by_odd=True)
    plain = attacks.attack("bpda", model, images, labels, eps, **identity)
    assert np.array_equal(plain, images)
    worst = attacks.attack("bpda", model, images, labels, eps, bpda_restarts=restarts, **identity)
    assert np.array_equal(worst, np.stack([starts[r][i] for i, r in enumerate(first)]))
    # Each image's restarts are its own: attacked one at a time, the same images come out.
    alone = [attacks.attack("bpda", model, images[i:i + 1], labels[i:i + 1], eps,
                            bpda_restarts=restarts, **{**identity, "image_ids": ids[i:i + 1]})
             for i in range(8)]
    assert np.array_equal(np.concatenate(alone), worst)

    highest = np.stack([s[:, 0, 0, 0] for s in starts], 1).argmax(1)  # the first of ties
    worst = attacks.attack("bpda", StartDecides(fooled_by_odd=False), images, labels, eps,
                           bpda_restarts=restarts, **identity)
    assert np.array_equal(worst, np.stack([starts[r][i] for i, r in enumerate(highest)]))
    assert (highest > 0).any()


@pytest.mark.parametrize("name", ["bpda", "bpda-soft"])
def test_several_classifiers_and_eps_at_once_give_each_ones_own_attack(name, fitted,
                                                                       fmnist_samples):
    """``through_defense`` batches every (classifier, eps_attack, image) so the defense runs
    once a step for all; each row's result is what attacking that classifier alone at that
    eps_attack gives (the same images here: the batch's float noise moves no sign), and
    eps_attack 0 leaves the images as they are."""
    images, labels = fmnist_samples
    images, labels = images[:6], labels[:6]
    models = [fitted, fitted_classifier(*fmnist_samples, seed=1)]
    aim = dict(defend=purify.feature_squeeze) if name == "bpda" else \
        dict(surrogate=purify.surrogate(None, "squeeze", 0))
    options = dict(bpda_steps=4, bpda_restarts=2, seed=3, image_ids=np.arange(10, 16), **aim)
    together = attacks.through_defense(name, models, images, labels, [4, 0, 12], **options)
    for model, got in zip(models, together):
        alone = attacks.attack_many(name, model, images, labels, [4, 0, 12], **options)
        for a, b in zip(got, alone):
            assert np.array_equal(a, b)
        assert np.array_equal(got[1], images)
        assert np.abs(got[2].astype(int) - images).max() > 4  # the larger ball is used
    assert not np.array_equal(together[0][2], together[1][2])  # each its own classifier


def test_bpda_soft_breaks_pixeldefend_through_its_surrogate(fmnist_samples):
    """BPDA-soft on a tiny PixelCNN's PixelDefend: the purified clean images are still
    classified well, the purified attacked ones are not. One block and 4 steps: the soft
    decoding's backward pass runs 784 positions of small ops, seconds per step."""
    images, labels = fmnist_samples
    images, labels = images[:10], labels[:10]
    model = fitted_classifier(*fmnist_samples)
    pixelcnn = tiny_pixelcnn(1, blocks=1)
    defend = purify.defender(pixelcnn, "pixeldefend", 4)
    accuracy = lambda x: (predict(model, defend(x)) == labels).mean()  # noqa: E731
    assert accuracy(images) >= 0.8
    adv = attacks.attack("bpda-soft", model, images, labels, 16, bpda_steps=4,
                         surrogate=purify.surrogate(pixelcnn, "pixeldefend", 4))
    assert np.abs(adv.astype(int) - images.astype(int)).max() <= 16
    assert accuracy(adv) <= 0.3


def test_rand_is_seeded_integer_noise(fmnist_samples):
    images, labels = fmnist_samples
    a = attacks.attack("rand", None, images, labels, 8, seed=3)
    b = attacks.attack("rand", None, images, labels, 8, seed=3)
    c = attacks.attack("rand", None, images, labels, 8, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_project_has_no_uint8_wraparound():
    x = np.array([[[[0], [255], [3]]]], dtype=np.uint8)
    adv = np.array([[[[-20.0], [300.0], [-1.0]]]])
    assert attacks.project(x, adv, 8).ravel().tolist() == [0, 255, 0]


def test_outward_rounding_keeps_small_changes():
    x = np.array([[[[10], [10], [10], [250]]]], dtype=np.uint8)
    adv = np.array([[[[10.3], [9.6], [10.0], [262.0]]]])
    assert attacks.project(x, adv, 8).ravel().tolist() == [10, 10, 10, 255]
    assert attacks.project(x, adv, 8, outward=True).ravel().tolist() == [11, 9, 10, 255]
    # Float noise (CW's tanh round trip moves a pixel by up to 1.4e-4 of a level) is no change.
    noisy = np.array([[[[10.00014], [9.99986], [10.002], [251.0004]]]])
    assert attacks.project(x, noisy, 8, outward=True).ravel().tolist() == [10, 10, 11, 251]


def test_bim_steps_follow_kurakin():
    assert [attacks.bim_steps(e) for e in (1, 2, 8, 16)] == [1, 2, 10, 20]


@pytest.mark.parametrize("bad", [-1, 256, 2.5])
def test_eps_out_of_range_is_a_clear_error(bad, fmnist_samples):
    images, labels = fmnist_samples
    with pytest.raises(PdrayError, match="0..255"):
        attacks.attack("fgsm", tiny_classifier(1), images, labels, bad)


def test_unknown_attack_is_a_clear_error(fmnist_samples):
    with pytest.raises(PdrayError, match="Unknown attack"):
        attacks.parse_attack("jsma")


def test_training_time_adversaries_stay_in_their_own_eps_ball(fmnist_samples):
    images, _ = fmnist_samples
    model = tiny_classifier(1)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2)).float()
    eps = attacks.sample_eps(len(x), torch.Generator().manual_seed(0))
    assert eps.min() >= 0 and eps.max() <= 16
    for iterative in (False, True):
        adv = attacks.adversarial_batch(model, x, eps, iterative)
        d = (adv - x).abs().flatten(1).max(1).values
        assert torch.all(d <= eps.ceil() + 1e-6) and adv.min() >= 0 and adv.max() <= 255
        assert torch.equal(adv, adv.round())


def test_training_time_bim_attacks_each_image_as_if_alone(fmnist_samples):
    """Images whose step count is used up leave the batch; the rest must not notice."""
    images, _ = fmnist_samples
    model = tiny_classifier(1)
    x = torch.from_numpy(images[:6].transpose(0, 3, 1, 2)).float()
    eps = torch.tensor([0.5, 2.0, 5.0, 8.0, 12.0, 16.0])
    together = attacks.adversarial_batch(model, x, eps, iterative=True)
    alone = torch.cat([attacks.adversarial_batch(model, x[i:i + 1], eps[i:i + 1], True)
                       for i in range(len(x))])
    assert torch.equal(together, alone)
    assert not torch.equal(together[-1], x[-1])


def test_attack_many_matches_single_calls(cifar_samples):
    images, labels = cifar_samples
    images, labels = images[:4], labels[:4]
    model = tiny_classifier(3)
    for name in ("rand", "fgsm", "deepfool"):
        many = attacks.attack_many(name, model, images, labels, [2, 0, 8], seed=1)
        assert np.array_equal(many[1], images)
        for eps, adv in zip((2, 8), (many[0], many[2])):
            assert np.array_equal(adv, attacks.attack(name, model, images, labels, eps, seed=1))


def test_a_misspelt_attack_option_is_an_error(fmnist_samples):
    images, labels = fmnist_samples
    with pytest.raises(TypeError, match="cw_step"):
        attacks.attack("cw", tiny_classifier(1), images[:2], labels[:2], 8, cw_step=10)
