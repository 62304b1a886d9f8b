"""The paper's Appendix E: why Algorithm 1 is greedy rather than gradient-based.

The paper reports that L-BFGS-B (scipy's) maximising the PixelCNN's likelihood inside the
eps_defend box mostly fails: from random starts it ends at images *less* likely than the
adversarial ones it started from (Figure 3: the first 10 CIFAR-10 test images, FGSM at
eps_attack 8, 100 starts per image). This reruns the comparison on pdray's models: the
objective is the PixelCNN's bits/dim at non-integer pixels (``PixelCNN.log_prob_continuous``),
each L-BFGS-B result is rounded to whole levels (a purified image is an image), and every
image is scored with the exact bits/dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pdray import attacks, data, purify, zoo
from pdray.cluster import torch_device
from pdray.config import check_eps, classifier_name, eps_defend_for, pixelcnn_name
from pdray.errors import PdrayError
from pdray.files import atomic_write, check_writable
from pdray.pixelcnn import PixelCNN, bits_per_dim

KINDS = ["clean", "fgsm", "greedy", "lbfgsb"]  # Figure 3's four distributions


def lbfgsb_purify(model: PixelCNN, image: np.ndarray, eps_defend: int, starts: int,
                  maxiter: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``starts`` runs of L-BFGS-B (``purify.lbfgsb``) on one uint8 HWC image, each from a
    uniform point of the eps_defend box; returns the rounded results (starts, H, W, C) uint8
    and each run's iteration count. The paper names no iteration limit; ``maxiter`` is one."""
    chw = image.transpose(2, 0, 1).astype(np.float64)
    lo, hi = np.maximum(chw - eps_defend, 0), np.minimum(chw + eps_defend, 255)
    rng = np.random.default_rng(seed)
    points = np.stack([rng.uniform(lo.ravel(), hi.ravel()).reshape(chw.shape).transpose(1, 2, 0)
                       for _ in range(starts)])
    return purify.lbfgsb(model, np.repeat(image[None], starts, axis=0), eps_defend,
                         maxiter=maxiter, starts=points)


def run(dataset: str, *, n_images: int = 10, eps_attack: int = 8, eps_defend: int | None = None,
        starts: int = 100, maxiter: int = 100, out: str | Path = ".", data_dir=None) -> dict:
    """Clean, FGSM, greedy-purified and L-BFGS-B-purified bits/dim of the first ``n_images``
    test images, against the shipped normal ResNet and PixelCNN; writes
    ``appendix_e.csv`` (one row per image and kind, and per start for L-BFGS-B) and
    ``appendix_e.png`` (Figure 3) into ``out``."""
    check_eps(eps_attack)
    eps_defend = eps_defend_for(dataset, eps_defend)
    if n_images < 1 or starts < 1 or maxiter < 1:
        raise PdrayError(f"--n-images, --starts and --maxiter must be at least 1; got "
                         f"{n_images}, {starts} and {maxiter}.")
    d = data.load(dataset, data_dir)
    if n_images > len(d.test.labels):
        raise PdrayError(f"--n-images must be at most {len(d.test.labels)}; got {n_images}.")
    images, labels = d.test.images[:n_images], d.test.labels[:n_images]
    device = torch_device()
    classifier, _ = zoo.load(classifier_name(d.dataset), device)
    pixelcnn, _ = zoo.load(pixelcnn_name(d.dataset), device)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PdrayError(f"Cannot write to {out} ({e.strerror}).") from None
    check_writable(out / "appendix_e.csv")  # now, not after hours of L-BFGS-B

    fgsm = attacks.fgsm(classifier, images, labels, [eps_attack])[0]
    greedy = purify.pixeldefend(pixelcnn, fgsm, eps_defend)
    rows = [{"image_id": i, "kind": kind, "start": 0, "iterations": 0, "bpd": float(b)}
            for kind, x in (("clean", images), ("fgsm", fgsm), ("greedy", greedy))
            for i, b in enumerate(bits_per_dim(pixelcnn, x))]
    for i in range(n_images):
        runs, iterations = lbfgsb_purify(pixelcnn, fgsm[i], eps_defend, starts, maxiter, seed=i)
        rows += [{"image_id": i, "kind": "lbfgsb", "start": s, "iterations": int(n),
                  "bpd": float(b)}
                 for s, (n, b) in enumerate(zip(iterations, bits_per_dim(pixelcnn, runs)))]
    table = pd.DataFrame(rows)
    atomic_write(out / "appendix_e.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(out / "appendix_e.png", lambda p: figure(table, d.dataset.value, p))
    return summary(table) | {"dataset": d.dataset.value, "n_images": n_images,
                             "eps_attack": eps_attack, "eps_defend": eps_defend,
                             "starts": starts, "maxiter": maxiter}


def summary(table: pd.DataFrame) -> dict:
    """Mean bits/dim per kind, and the paper's claim in numbers: the share of L-BFGS-B runs
    that end less likely than their FGSM image, and the share that beat greedy decoding."""
    by = {k: g.set_index("image_id").bpd for k, g in table[table.kind != "lbfgsb"].groupby("kind")}
    lb = table[table.kind == "lbfgsb"]
    return {"mean_bpd": {k: round(float(table[table.kind == k].bpd.mean()), 4) for k in KINDS},
            "lbfgsb_worse_than_fgsm": float((lb.bpd.values > by["fgsm"][lb.image_id].values).mean()),
            "lbfgsb_better_than_greedy": float((lb.bpd.values < by["greedy"][lb.image_id].values).mean()),
            "lbfgsb_mean_iterations": float(lb.iterations.mean())}


def figure(table: pd.DataFrame, dataset: str, path: Path) -> None:
    """Figure 3: the bits/dim distributions of the four kinds of image."""
    import matplotlib  # a second's start-up that only the figure needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(table.bpd.min(), table.bpd.max(), 40)
    names = {"clean": "clean", "fgsm": "FGSM", "greedy": "greedy (PixelDefend)",
             "lbfgsb": "L-BFGS-B"}
    for kind in KINDS:
        ax.hist(table[table.kind == kind].bpd, bins=bins, density=True, alpha=0.5,
                label=names[kind])
    ax.set_xlabel("bits per dimension")
    ax.set_ylabel("density")
    ax.set_title(f"{dataset}: purifying FGSM images, greedy against L-BFGS-B")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
