import gzip
import shutil

import numpy as np
import pytest

from pdray import data
from pdray.errors import PdrayError


def test_fmnist_is_exact_and_in_official_order(fmnist_samples):
    d = data.load("fmnist")
    assert d.train.images.shape == (60000, 28, 28, 1) and d.test.images.shape == (10000, 28, 28, 1)
    assert d.train.images.dtype == np.uint8 and d.test.labels.dtype == np.int64
    images, labels = fmnist_samples  # foolbox ships official test images 0..19
    assert np.array_equal(d.test.images[:20], images)
    assert np.array_equal(d.test.labels[:20], labels)


def test_cifar10_copy_is_in_official_order(cifar_samples):
    d = data.load("cifar10")
    assert d.train.images.shape == (50000, 32, 32, 3) and d.test.images.shape == (10000, 32, 32, 3)
    images, labels = cifar_samples
    assert np.array_equal(d.test.labels[:20], labels)
    # The JPEG copy is close to, not equal to, the exact images (see the data README).
    assert np.abs(d.test.images[:20].astype(int) - images).mean() < 10


def test_validation_split_is_the_held_out_tail():
    d = data.load("fmnist")
    assert len(d.fit.labels) + len(d.validation.labels) == len(d.train.labels)
    assert np.array_equal(d.validation.images[0], d.train.images[-data.VALIDATION_IMAGES])


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


def test_missing_data_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(data.DEBIAN_DIR, data.Dataset.FMNIST, tmp_path / "nowhere")
    with pytest.raises(PdrayError) as e:  # a named folder is the only place looked at
        data.load("fmnist", tmp_path / "empty")
    assert "empty" in str(e.value) and "data folder" in str(e.value)
    monkeypatch.setenv("PDRAY_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(PdrayError) as e:  # else the search, which names every place
        data.load("fmnist")
    assert "empty" in str(e.value) and "nowhere" in str(e.value) and "PDRAY_OFFLINE" in str(e.value)


def test_corrupt_data_is_a_clear_error(tmp_path):
    folder = tmp_path / "fashion-mnist"
    shutil.copytree(data.DEBIAN_DIR[data.Dataset.FMNIST], folder)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02")
    with pytest.raises(PdrayError, match="corrupt"):
        data.load("fmnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(PdrayError, match="Unknown dataset"):
        data.load("mnist")
