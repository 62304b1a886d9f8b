"""Tiny CPU models and real sample images shared by all tests. No network, no GPU."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import foolbox
import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg"

# Every test, and every `pdray` it starts, reads CIFAR-10 from ../shared and never downloads.
os.environ["PDRAY_OFFLINE"] = "1"
os.environ["PDRAY_DATA_DIR"] = str(SHARED_CIFAR)
os.environ["RAY_AUTH_MODE"] = "disabled"
torch.set_num_threads(2)


def _tiny_zoo(folder: Path) -> Path:
    """A model zoo of tiny random models, exported the way shipped ones are; Ray actors
    find it through PDRAY_WEIGHTS_DIR, which must be set before Ray starts."""
    from pdray import data, detect, zoo
    from pdray.files import save_npy, sha256

    os.environ["PDRAY_WEIGHTS_DIR"] = str(folder)
    for dataset, channels in (("fmnist", 1), ("cifar10", 3)):
        for recipe, seed in (("normal", 0), ("adv-fgsm", 1)):
            model = tiny_classifier(channels, seed)
            zoo.export({"kind": "classifier", "dataset": dataset, "arch": "resnet",
                        "recipe": recipe, "arch_options": {"units": 1}, "config": {},
                        "metrics": {}, "state_dict": model.state_dict()},
                       f"{dataset}-resnet-{recipe}", epochs=0, wall_time_s=0.0)
        pcnn = tiny_pixelcnn(channels)
        zoo.export({"kind": "pixelcnn", "dataset": dataset, "arch": "pixelcnn", "recipe": None,
                    "config": vars(pcnn.config), "metrics": {}, "state_dict": pcnn.state_dict()},
                   f"{dataset}-pixelcnn", epochs=0, wall_time_s=0.0)
        # A stand-in for the training-set likelihoods: 500 training images, not 60,000.
        images = data.load(dataset).train.images[:500]
        path = detect.train_logp_path(f"{dataset}-pixelcnn")
        save_npy(path, detect.log_likelihoods(pcnn, images))
        zoo.update_entry(f"{dataset}-pixelcnn", train_logp_file=path.name,
                         train_logp_sha256=sha256(path),
                         adaptive_threshold={"bpd": 7.0, "note": "tiny test model"})
    return folder


def foolbox_samples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The 20 exact test images foolbox ships (Fashion-MNIST or CIFAR-10), uint8 NHWC."""
    folder = Path(foolbox.__file__).parent / "data"
    files = sorted(folder.glob(f"{name}_*.png"))
    images = [np.asarray(Image.open(f)) for f in files]
    images = np.stack([im if im.ndim == 3 else im[..., None] for im in images]).astype(np.uint8)
    labels = np.array([int(re.search(r"_(\d+)\.png$", f.name).group(1)) for f in files])
    return images, labels


@pytest.fixture(scope="session")
def fmnist_samples():
    return foolbox_samples("fashionMNIST")


@pytest.fixture(scope="session")
def cifar_samples():
    return foolbox_samples("cifar10")


def tiny_classifier(channels: int, seed: int = 0):
    """The paper's ResNet with one unit per stage: same code path, a fraction of the cost."""
    from pdray.classifiers import ResNet

    torch.manual_seed(seed)
    return ResNet(channels, [128.0] * channels, [64.0] * channels, units=1).eval()


def tiny_pixelcnn(channels: int, seed: int = 0, filters: int = 8, blocks: int = 2,
                  logistic: bool | None = None, head: str = "free", mixtures: int = 3):
    """A small random PixelCNN whose conditionals are far from flat. ``logistic`` defaults
    to the shipped models' head: without the logistic term for Fashion-MNIST, with it for
    CIFAR-10."""
    from pdray.pixelcnn import Config, PixelCNN

    torch.manual_seed(seed)
    logistic = channels == 3 if logistic is None else logistic
    model = PixelCNN(Config(channels=channels, filters=filters, blocks=blocks, logistic=logistic,
                            head=head, mixtures=mixtures)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_zoo():
    """The folder of the tiny model zoo every test process and Ray actor uses."""
    return Path(os.environ["PDRAY_WEIGHTS_DIR"])


def local_ray():
    """A local Ray, started once and kept for the tests that follow (a multi-node test
    shuts it down and the next user starts it again)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=300 * 1024 * 1024)
    return ray


@pytest.fixture
def ray_local():
    return local_ray()


@pytest.fixture
def gpu_cluster():
    """Three fake nodes in this machine: a head with no GPU and two workers with one GPU
    each (Ray schedules them; torch still runs on the CPU)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
        "object_store_memory": 200 * 1024 * 1024})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 1024 * 1024)
               for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


_tiny_zoo(Path(tempfile.mkdtemp(prefix="pdray-test-zoo-")))
