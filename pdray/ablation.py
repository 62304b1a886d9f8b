"""Controlled experiments on why purification fails on CIFAR-10 (the JPEG copy).

The CIFAR-10 data pdray's first models were trained on here is a JPEG-decoded copy whose error (6.24 levels
per sub-pixel on average) is the size of eps_attack 8. ``jpeg`` makes the same kind of copy
of exact data, so a Fashion-MNIST PixelCNN trained on it separates "the data" from "the
model" with an exact ground truth.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pdray import attacks, data, purify, zoo
from pdray.classifiers import predict
from pdray.cluster import torch_device
from pdray.config import (LBFGSB_MAXITER, PROBE_ATTACKS, PROBE_EPS_ATTACK, THROUGH_DEFENSE,
                          VALIDATION_IMAGES, Purifier, check_eps, classifier_name,
                          eps_defend_for, parse_attack)
from pdray.errors import PdrayError, parse_choice
from pdray.pixelcnn import bits_per_dim
from pdray.pixels import to_nchw, to_nhwc
from pdray.pvalues import roc

# The quality whose mean absolute error on the first 2,000 Fashion-MNIST test images (6.25
# levels) matches the CIFAR-10 copy's (6.24); quality 50 gives 5.83 and 40 gives 6.84.
FMNIST_MATCHED_QUALITY = 44


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 NHWC images after a JPEG round trip through Pillow at ``quality``."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            buf, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out[i] = decoded.reshape(image.shape)
    return out


@torch.no_grad()
def model_modes(pixelcnn, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The most likely value of every sub-pixel given the pixels before it (uint8 NHWC).
    On a purified image these are the unconstrained choices Algorithm 1 weighed, since each
    of its decisions saw exactly the purified prefix."""
    device = next(pixelcnn.parameters()).device
    return np.concatenate([to_nhwc(pixelcnn(to_nchw(images[i:i + batch_size], device)).argmax(-1))
                           for i in range(0, len(images), batch_size)])


def kept(purified: np.ndarray, purified_clean: np.ndarray, x: np.ndarray, clean: np.ndarray,
         where: np.ndarray | None = None) -> float:
    """How much of the perturbation purification keeps: the least-squares coefficient of
    (purified input - purified clean image) on (input - clean image). 1 when purification
    passes the perturbation through (eps_defend 0), 0 when it lands where the clean image
    does whatever the input was."""
    moved = purified.astype(np.float64) - purified_clean
    delta = x.astype(np.float64) - clean
    if where is not None:
        moved, delta = moved[where], delta[where]
    return float((moved * delta).sum() / max((delta * delta).sum(), 1e-12))


def split_kept(classifier, labels: np.ndarray, purified: np.ndarray, purified_clean: np.ndarray,
               x: np.ndarray, clean: np.ndarray) -> dict:
    """Purification's change to an attacked input, relative to the clean image's, split as
    ``kept`` * (x - clean) + residual, each part added back to the purified clean image and
    classified: ``accuracy_at_kept`` is the accuracy if the kept share were all that
    differed; ``accuracy_at_residual`` whether the rest (what the greedy chain did
    differently elsewhere) is adversarial too, against the same residual with random signs
    (``accuracy_at_residual_random_signs``: its size without its structure)."""
    share = kept(purified, purified_clean, x, clean)
    base, delta = purified_clean.astype(np.float64), x.astype(np.float64) - clean
    residual = purified - base - share * delta
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=residual.shape)

    def accuracy(z):
        z = np.clip(np.round(z), 0, 255).astype(np.uint8)
        return float((predict(classifier, z) == labels).mean())

    return {"perturbation_kept": share,
            "accuracy_at_kept": accuracy(base + share * delta),
            "residual": float(np.abs(residual).mean()),
            "accuracy_at_residual": accuracy(base + residual),
            "accuracy_at_residual_random_signs": accuracy(base + signs * residual)}


def probe(pixelcnn, classifier, images: np.ndarray, labels: np.ndarray, *,
          eps_defend: int, eps_attack: int = PROBE_EPS_ATTACK,
          inputs: tuple[str, ...] = ("clean", "fgsm", "bim"), batch_size: int = 64,
          purifier: Purifier = Purifier.GREEDY, maxiter: int = LBFGSB_MAXITER) -> list[dict]:
    """Where purification takes each kind of input, one row per input kind: accuracy
    before and after, bits/dim before and after, mean |purified - clean| in levels, the
    share of sub-pixels that end on the edge of the eps_defend ball, the share decided by
    the model (the purified value is its unconstrained mode there), and for attacked inputs
    how much of the perturbation survives (``kept``), overall and where the model decided,
    what that share and the rest of the change each do to accuracy (``split_kept``), and
    how well bits/dim tells them from the clean images (``auc_vs_clean``: a noisier or
    blunter model may purify more and detect less). Two things separate the model from the
    greedy chain: ``accuracy_given_clean_past`` and ``accuracy_given_input_past`` make
    every one of Algorithm 1's bounded choices at once from a fixed past (the clean image:
    a chain that never drifts; the input: one that copies the input's past), and
    ``context_gain`` is how far the model's modes follow the input's perturbation from its
    past alone (per channel for colour images). ``purifier`` lbfgsb replaces Algorithm 1
    with L-BFGS-B from the input (``maxiter`` iterations): where the images it finds near
    attacked inputs are likelier than the clean images and still misclassified, the
    likelihood itself does not lead back to the clean image, whatever decodes it."""
    def purified_of(x):
        if purifier is Purifier.GREEDY:
            return purify.pixeldefend(pixelcnn, x, eps_defend, batch_size=batch_size,
                                      return_bpd=True)
        purified = purify.lbfgsb(pixelcnn, x, eps_defend, maxiter=maxiter)[0]
        return purified, bits_per_dim(pixelcnn, purified)

    rows = []
    clean_out = purified_of(images)  # the clean row's, and what ``kept`` compares against
    purified_clean = clean_out[0]
    bpd_clean = bits_per_dim(pixelcnn, images)
    teacher = model_modes(pixelcnn, images)  # every sub-pixel's mode given the clean past
    for kind in inputs:
        x = images if kind == "clean" else attacks.attack(kind, classifier, images, labels, eps_attack)
        purified, bpd_after = clean_out if kind == "clean" else purified_of(x)
        moved = np.abs(purified.astype(np.int16) - x.astype(np.int16))
        bpd_before = bpd_clean if kind == "clean" else bits_per_dim(pixelcnn, x)
        modes = model_modes(pixelcnn, purified)
        free = modes == purified
        rows.append({
            "input": kind, "eps_attack": 0 if kind == "clean" else eps_attack,
            "eps_defend": eps_defend, "n_images": len(images), "purifier": purifier.value,
            "accuracy_before": float((predict(classifier, x) == labels).mean()),
            "accuracy_after": float((predict(classifier, purified) == labels).mean()),
            "bpd_before": float(bpd_before.mean()),
            "bpd_after": float(np.mean(bpd_after)),
            "input_to_clean": float(np.abs(x.astype(np.int16) - images).mean()),
            "purified_to_clean": float(np.abs(purified.astype(np.int16) - images).mean()),
            "edge_fraction": float((moved == eps_defend).mean()),
            "model_decided_fraction": float(free.mean()),
            # Where the model wants each sub-pixel given the purified past (what Algorithm 1
            # asks it), in levels from the clean image; for the clean row also given the
            # clean past: the gap between the two is the greedy chain's drift.
            "mode_to_clean": float(np.abs(modes.astype(np.int16) - images).mean()),
        })
        if kind == "clean":
            rows[-1]["mode_to_clean_given_clean_past"] = float(np.abs(teacher.astype(np.int16) - images).mean())
        else:
            rows[-1].update(split_kept(classifier, labels, purified, purified_clean, x, images))
            rows[-1]["kept_where_model_decided"] = kept(purified, purified_clean, x, images, free)
            rows[-1]["auc_vs_clean"] = roc(bpd_clean, bpd_before)[2]
            # How far the model's mode follows the perturbation in its past, per level of
            # perturbation: 0 if the past's perturbation says nothing about this sub-pixel's.
            followed = model_modes(pixelcnn, x)
            rows[-1]["context_gain"] = kept(followed, teacher, x, images)
            if images.shape[-1] > 1:  # G and B also see the same pixel's decided R (and G)
                rows[-1]["context_gain_by_channel"] = [
                    kept(followed, teacher, x, images, np.broadcast_to(c, images.shape))
                    for c in np.eye(images.shape[-1], dtype=bool)]  # one channel's mask each
        # Algorithm 1's bounded choices made all at once from a fixed past: the clean image's
        # (the chain without drift) and the input's (the chain that copies its input's past).
        for past, z in (("clean", images), ("input", x)):
            forced = purify.one_pass(pixelcnn, x, eps_defend, past=z, batch_size=batch_size)
            rows[-1][f"accuracy_given_{past}_past"] = float((predict(classifier, forced) == labels).mean())
    return rows


def load_density(pixelcnn: str, last_weights: bool = False):
    """A shipped PixelCNN by name, or a weights or training-state file. ``last_weights``
    takes a training state's last optimiser weights instead of its running average: runs
    made with different averaging compare fairly that way."""
    if not last_weights:
        return zoo.load(pixelcnn, torch_device())[0]
    ckpt = zoo.load_checkpoint(pixelcnn)
    if "train_model" not in ckpt:
        raise PdrayError(f"--last-weights needs a training state; {pixelcnn} is a weights file.")
    return zoo.build({**ckpt, "state_dict": ckpt["train_model"]}).to(torch_device())


def run(dataset: str, pixelcnn: str, classifier: str | None = None, *,
        n_images: int = VALIDATION_IMAGES, jpeg_quality: int = 0,
        attack_names: tuple[str, ...] = PROBE_ATTACKS,
        eps_attack: int = PROBE_EPS_ATTACK, eps_defend: int | None = None, last_weights: bool = False,
        purifier: str | Purifier = Purifier.GREEDY, maxiter: int = LBFGSB_MAXITER,
        data_dir=None) -> list[dict]:
    """``probe`` on the first ``n_images`` validation images (the held-out tail of the
    training split: never tune on the test set), optionally JPEG-compressed first."""
    check_eps(eps_attack)
    purifier = parse_choice(Purifier, purifier, "purifier")
    if maxiter < 1:
        raise PdrayError(f"--maxiter must be at least 1; got {maxiter}.")
    attack_names = tuple(parse_attack(a).value for a in attack_names)
    if set(attack_names) & set(THROUGH_DEFENSE):
        raise PdrayError("The ablation probes transfer attacks; BPDA and BPDA-soft run in "
                         "`pdray eval`.")
    eps_defend = eps_defend_for(dataset, eps_defend)  # both before any work
    d = data.load(dataset, data_dir)
    split = d.validation
    if not 1 <= n_images <= len(split.labels):
        raise PdrayError(f"--n-images must be between 1 and {len(split.labels)}; got {n_images}.")
    images, labels = split.images[:n_images], split.labels[:n_images]
    if jpeg_quality:
        images = jpeg(images, jpeg_quality)
    device = torch_device()
    density = load_density(pixelcnn, last_weights)
    if density.config.channels != images.shape[-1]:
        raise PdrayError(f"{pixelcnn} models {density.config.channels}-channel images; "
                         f"{d.dataset.value} has {images.shape[-1]}.")
    model, _ = zoo.load(classifier or classifier_name(d.dataset), device)
    rows = probe(density, model, images, labels, eps_attack=eps_attack, eps_defend=eps_defend,
                 inputs=("clean", *attack_names), purifier=purifier, maxiter=maxiter)
    for row in rows:
        row.update(dataset=d.dataset.value, pixelcnn=str(pixelcnn), last_weights=last_weights,
                   jpeg_quality=jpeg_quality)
    return rows
