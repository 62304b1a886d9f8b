"""Tiny CPU models, small datasets in the official on-disk formats, and real sample images
shared by all tests. No network, no GPU, no dataset but the ones made here, except in the
tests that ask for the real data (``real_fmnist``, ``real_cifar10``)."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import tempfile
from pathlib import Path

import foolbox
import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Where the user keeps the real data (PDRAY_DATA_DIR, else pdray's cache and Debian's copy):
# only the real-data tests look there. PDRAY_REQUIRE_DATA=1 (CI) makes missing data a
# failure instead of a skip.
USER_DATA_DIR = os.environ.get("PDRAY_DATA_DIR", "")
REQUIRE_DATA = os.environ.get("PDRAY_REQUIRE_DATA") == "1"

# Every other test, and every `pdray` and Ray actor it starts, reads the small datasets
# made below and never downloads.
os.environ["PDRAY_OFFLINE"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray Train's controller polls its workers every 2 s, and a test's two-step training
# waits on those polls as it starts and ends.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
torch.set_num_threads(2)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array as an idx-ubyte.gz file, the format of the official Fashion-MNIST."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_fmnist(folder: Path, train: tuple, test: tuple) -> Path:
    """(images, labels) pairs as the four official Fashion-MNIST files."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[..., 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder


def write_cifar10(folder: Path, train: tuple, test: tuple) -> Path:
    """(images, labels) pairs as the official CIFAR-10 python batches: the training split
    cut into data_batch_1..5, then test_batch and batches.meta."""
    from pdray.data import CLASSES, Dataset, write_cifar10_batch

    def batch(name, images, labels):
        write_cifar10_batch(folder / name, images, labels,
                            [f"{name}_{i}.png" for i in range(len(images))])

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = train
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
        batch(f"data_batch_{i}", images[part], labels[part])
    batch("test_batch", *test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": len(test[1]), b"num_vis": 3072,
                     b"label_names": [c.encode() for c in CLASSES[Dataset.CIFAR10]]}, f, protocol=4)
    return folder


def small_splits(images: np.ndarray, labels: np.ndarray) -> tuple[tuple, tuple]:
    """A training split of 100 images (the 20 flipped, and shifted two pixels four ways,
    with seeded noise of up to 4 levels) and the 20 themselves as the test split. Without
    the noise a shifted image can score exactly as its original does, and p-values, which
    rank test scores among training scores, would then hang on float rounding."""
    variants = [images[:, :, ::-1]] + [np.roll(images, s, axis=a) for a in (1, 2) for s in (2, -2)]
    train = np.concatenate(variants).astype(np.int16)
    train += np.random.default_rng(0).integers(-4, 5, size=train.shape, dtype=np.int16)
    return (np.clip(train, 0, 255).astype(np.uint8), np.tile(labels, len(variants))), (images, labels)


def _small_datasets(root: Path) -> Path:
    """Fashion-MNIST and CIFAR-10 as custom datasets in the official formats, made from the
    20 test images foolbox ships; PDRAY_DATA_DIR points every test process and Ray actor at
    them, so it must be set before Ray starts."""
    from pdray.data import CUSTOM_MARKER

    for name, write, folder in (("fashionMNIST", write_fmnist, "fashion-mnist"),
                                ("cifar10", write_cifar10, "cifar-10-batches-py")):
        written = write(root / folder, *small_splits(*foolbox_samples(name)))
        (written / CUSTOM_MARKER).write_text(
            f"pdray tests: the 20 {name} test images foolbox ships, and 100 flipped or shifted "
            f"copies as the training split\n")
    os.environ["PDRAY_DATA_DIR"] = str(root)
    return root


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
        # A stand-in for the training-set likelihoods: the small training split.
        images = data.load(dataset).train.images
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


def real_data(dataset: str):
    """The official ``dataset`` where pdray finds it outside the tests, never downloaded.
    Missing, the test is skipped with the reason (a failure under PDRAY_REQUIRE_DATA=1)."""
    from pdray import data

    small, os.environ["PDRAY_DATA_DIR"] = os.environ["PDRAY_DATA_DIR"], USER_DATA_DIR
    try:
        d = data.load(dataset)
    except data.DatasetNotFound as e:
        d, problem = None, str(e)
    finally:
        os.environ["PDRAY_DATA_DIR"] = small
    if d is not None and not d.official:
        d, problem = None, f"{d.source} holds a custom dataset, not the official one"
    if d is None:
        hint = ("install dataset-fashion-mnist or set PDRAY_DATA_DIR" if dataset == "fmnist"
                else "set PDRAY_DATA_DIR to a folder holding cifar-10-batches-py")
        if REQUIRE_DATA:
            pytest.fail(f"PDRAY_REQUIRE_DATA=1 and the real {dataset} data is missing: {problem}",
                        pytrace=False)
        pytest.skip(f"no real {dataset} data ({hint}; PDRAY_REQUIRE_DATA=1 fails instead)")
    return d


@pytest.fixture(scope="session")
def real_fmnist():
    return real_data("fmnist")


@pytest.fixture(scope="session")
def real_cifar10():
    return real_data("cifar10")


@pytest.fixture(scope="session")
def small_data():
    """The folder of the small datasets every test process and Ray actor reads."""
    return Path(os.environ["PDRAY_DATA_DIR"])


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
                  logistic: bool | None = None, head: str = "free", mixtures: int = 3,
                  dilations: tuple = ()):
    """A small random PixelCNN whose conditionals are far from flat. ``logistic`` defaults
    to the shipped models' head: without the logistic term for Fashion-MNIST, with it for
    CIFAR-10."""
    from pdray.pixelcnn import Config, PixelCNN

    torch.manual_seed(seed)
    logistic = channels == 3 if logistic is None else logistic
    model = PixelCNN(Config(channels=channels, filters=filters, blocks=blocks, logistic=logistic,
                            head=head, mixtures=mixtures, dilations=dilations)).eval()
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


@pytest.fixture(scope="module")
def gpu_cluster():
    """Three fake nodes in this machine: a head with no GPU and two workers with one GPU
    each (Ray schedules them; torch still runs on the CPU). One per module: starting it
    takes ~10 s, and a test that removes a node runs last."""
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


_small_datasets(Path(tempfile.mkdtemp(prefix="pdray-test-data-")))
_tiny_zoo(Path(tempfile.mkdtemp(prefix="pdray-test-zoo-")))
