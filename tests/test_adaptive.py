import shutil

import numpy as np

from pdray import adaptive, zoo


def test_strongest_accuracy_and_threshold_rule():
    kept = {("clean", 0): np.array([1, 1]), ("fgsm", 8): np.array([0, 1]), ("bim", 8): np.array([0, 0])}
    purified = {("clean", 0): np.array([0, 1]), ("fgsm", 8): np.array([1, 1]), ("bim", 8): np.array([1, 0])}
    bpd = {("clean", 0): np.array([1.0, 2.0]), ("fgsm", 8): np.array([3.0, 3.5]),
           ("bim", 8): np.array([3.0, 4.0])}
    assert adaptive.strongest_accuracy(kept, purified, bpd, -np.inf) == 0.5
    assert adaptive.strongest_accuracy(kept, purified, bpd, 3.5) == 0.0  # bim image 0 left alone


def test_choose_threshold_end_to_end_on_the_tiny_zoo(tiny_zoo, tmp_path, monkeypatch):
    shutil.copytree(tiny_zoo, tmp_path / "zoo")  # storing the threshold edits the manifest
    monkeypatch.setenv("PDRAY_WEIGHTS_DIR", str(tmp_path / "zoo"))
    result = adaptive.choose_threshold("fmnist", attack_names=["fgsm"], eps_attack=[8],
                                       n_images=8, store=True)
    assert result["strongest_accuracy"] >= result["strongest_accuracy_pixeldefend"]
    assert "validation" in result["chosen_on"]
    assert zoo.adaptive_threshold("fmnist-pixelcnn")["bpd"] == result["bpd"]
