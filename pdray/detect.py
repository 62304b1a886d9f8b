"""Claim 1: adversarial images lie in low-likelihood regions of the PixelCNN.

The N training log-likelihoods that p-values rank against (pdray.pvalues) are computed
once per checkpoint and shipped beside it. Detection (the paper's Figure 2) scores images
by -log p_CNN, clean training images negative and perturbed images positive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pdray import attacks, data, zoo
from pdray.cluster import torch_device
from pdray.config import (DETECT_IMAGES, PROBE_EPS_ATTACK, check_eps, classifier_name, parse_attack,
                          parse_dataset, pixelcnn_name)
from pdray.errors import PdrayError
from pdray.files import save_npy, sha256
from pdray.pixelcnn import bits_per_dim, log_prob_from_bpd
from pdray.pvalues import ks_uniform, pvalues, roc


def log_likelihoods(model, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """log p_CNN(X) in nats, per uint8 NHWC image."""
    return log_prob_from_bpd(bits_per_dim(model, images, batch_size),
                             int(np.prod(images.shape[1:])))


def train_logp_path(name: str) -> Path:
    return zoo.weights_dir() / f"{name}.train_logp.npy"


def store_train_log_likelihoods(name: str, data_dir=None) -> Path:
    """Score the whole training split (official order) with a shipped PixelCNN and save it
    beside the weights; the manifest records the file and its sha256."""
    e = zoo.entry(name)
    model, _ = zoo.load(name, torch_device())
    d = data.load(e["dataset"], data_dir)
    logp = log_likelihoods(model, d.train.images)
    path = train_logp_path(name)
    save_npy(path, logp)
    zoo.update_entry(name, train_logp_file=path.name, train_logp_sha256=sha256(path))
    return path


def train_log_likelihoods(name: str) -> np.ndarray:
    e = zoo.entry(name)
    if "train_logp_file" not in e:
        raise PdrayError(f"{name} has no stored training-set likelihoods; run "
                         f"`pdray models likelihoods {name}` once.")
    path = zoo.weights_dir() / e["train_logp_file"]
    if not path.is_file() or sha256(path) != e["train_logp_sha256"]:
        raise PdrayError(f"{path} is missing or does not match its manifest sha256; "
                         f"recompute it with `pdray models likelihoods {name}`.")
    return np.load(path, allow_pickle=False)


def detect(dataset: str, attack: str, eps_attack: int = PROBE_EPS_ATTACK,
           n_images: int = DETECT_IMAGES, data_dir=None,
           classifier: str | None = None, pixelcnn: str | None = None) -> dict:
    """Attack the first n test images of the shipped normal ResNet and measure how well
    the PixelCNN tells them from clean training images."""
    ds = parse_dataset(dataset)
    attack = parse_attack(attack)
    eps_attack = check_eps(eps_attack)
    d = data.load(ds, data_dir)
    if not 1 <= n_images <= len(d.test.labels):
        raise PdrayError(f"--n-images must be between 1 and {len(d.test.labels)}; got {n_images}.")
    classifier = classifier or classifier_name(ds)
    pixelcnn = pixelcnn or pixelcnn_name(ds)
    device = torch_device()
    clf, _ = zoo.load(classifier, device)
    density, _ = zoo.load(pixelcnn, device)
    train_logp = train_log_likelihoods(pixelcnn)
    images, labels = d.test.images[:n_images], d.test.labels[:n_images]
    adversarial = attacks.attack(attack, clf, images, labels, eps_attack, seed=0)
    logp_clean, logp_adv = log_likelihoods(density, images), log_likelihoods(density, adversarial)
    p_clean, p_adv = pvalues(logp_clean, train_logp), pvalues(logp_adv, train_logp)
    _, _, auc = roc(-train_logp, -logp_adv)
    _, _, auc_clean = roc(-train_logp, -logp_clean)
    return {"data": d.name, "attack": attack.value, "eps_attack": eps_attack, "n_images": n_images,
            "auc": auc, "auc_clean_test": auc_clean,
            "mean_pvalue_clean": float(p_clean.mean()), "mean_pvalue_attacked": float(p_adv.mean()),
            "ks_pvalue_clean": ks_uniform(p_clean),
            "classifier": classifier, "pixelcnn": pixelcnn}
