"""Choosing the adaptive PixelDefend threshold on validation data (Appendix C).

Adaptive PixelDefend leaves an image alone (eps_defend 0) when its bits/dim is below a
threshold and purifies it otherwise. The paper sets the threshold "at the lowest value
which did not decrease the performance of the strongest adversary" on validation data.
Read literally that is minus infinity (purify everything); what it must mean, and what
is implemented here, is the highest threshold (the most images left untouched, so the
best clean accuracy) at which the strongest attack's accuracy is still no lower than
with plain PixelDefend. The validation images are the held-out tail of the training
split, which no shipped model was trained on.
"""

from __future__ import annotations

import numpy as np

from pdray import attacks, data, purify, zoo
from pdray.classifiers import predict
from pdray.cluster import torch_device
from pdray.config import (PAPER_ATTACKS, VALIDATION_IMAGES, classifier_name, eps_attack_for,
                          eps_defend_for, parse_attack, parse_dataset, pixelcnn_name)
from pdray.errors import PdrayError
from pdray.pixelcnn import bits_per_dim


def strongest_accuracy(correct_kept: dict, correct_purified: dict, bpd: dict, t: float) -> float:
    """Mean over eps_attack of the minimum over attacks of the accuracy at threshold t."""
    per_eps: dict[int, list[float]] = {}
    for (attack, eps), keep in correct_kept.items():
        if attack == "clean":
            continue
        right = np.where(bpd[(attack, eps)] < t, keep, correct_purified[(attack, eps)])
        per_eps.setdefault(eps, []).append(right.mean())
    return float(np.mean([min(v) for v in per_eps.values()]))


def choose_threshold(dataset: str, classifier: str | None = None, pixelcnn: str | None = None,
                     eps_defend: int | None = None, attack_names: list[str] | None = None,
                     eps_attack: list[int] | None = None, n_images: int = VALIDATION_IMAGES,
                     data_dir=None, store: bool = True) -> dict:
    ds = parse_dataset(dataset)
    classifier = classifier or classifier_name(ds)
    pixelcnn = pixelcnn or pixelcnn_name(ds)
    eps_defend = eps_defend_for(ds, eps_defend)
    attack_names = [parse_attack(a).value for a in (attack_names or PAPER_ATTACKS)]
    eps_attack = eps_attack_for(ds, eps_attack)
    d = data.load(ds, data_dir)
    val = d.validation
    if not 1 <= n_images <= len(val.labels):
        raise PdrayError(f"--n-images must be between 1 and {len(val.labels)}.")
    images, labels = val.images[:n_images], val.labels[:n_images]
    device = torch_device()
    clf, _ = zoo.load(classifier, device)
    density, _ = zoo.load(pixelcnn, device)
    inputs = {("clean", 0): images}
    for a in attack_names:
        for e, adv in zip(eps_attack, attacks.attack_many(a, clf, images, labels, eps_attack,
                                                          seed=1, image_ids=range(n_images))):
            inputs[(a, e)] = adv
    bpd = {k: bits_per_dim(density, x) for k, x in inputs.items()}
    kept = {k: predict(clf, x) == labels for k, x in inputs.items()}
    purified = {k: predict(clf, purify.pixeldefend(density, x, eps_defend)) == labels
                for k, x in inputs.items()}
    baseline = strongest_accuracy(kept, purified, bpd, -np.inf)
    candidates = np.unique(np.concatenate(list(bpd.values())))
    ok = [t for t in candidates if strongest_accuracy(kept, purified, bpd, t) >= baseline]
    t = float(max(ok)) if ok else float("-inf")
    clean = np.where(bpd[("clean", 0)] < t, kept[("clean", 0)], purified[("clean", 0)])
    result = {
        "bpd": t, "data": d.name, "classifier": classifier, "eps_defend": eps_defend, "attacks": attack_names,
        "eps_attack": eps_attack, "n_images": n_images,
        "chosen_on": f"validation images 0..{n_images - 1} (the held-out tail of the "
                     f"{ds.value} training split)",
        "rule": "highest threshold whose strongest-attack accuracy (mean over eps_attack of "
                "the minimum over attacks) is no lower than plain PixelDefend's",
        "strongest_accuracy": strongest_accuracy(kept, purified, bpd, t),
        "strongest_accuracy_pixeldefend": baseline,
        "clean_accuracy": float(clean.mean()),
        "clean_accuracy_pixeldefend": float(purified[("clean", 0)].mean()),
        "clean_bpd_mean": float(bpd[("clean", 0)].mean()),
    }
    if store:
        zoo.update_entry(pixelcnn, adaptive_threshold=result)
    return result
