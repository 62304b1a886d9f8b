"""Which data a run read: names, checksums, official CIFAR-10 verification, and --resume
refusing other data."""

import hashlib
import json

import pytest

from pdray import data, pipeline, results
from pdray.config import EvalConfig
from pdray.errors import PdrayError

CFG = dict(dataset="fmnist", n_images=4, shards=2, attacks=["fgsm"], eps_attack=[8])


def test_fmnist_is_named_and_checksummed(real_fmnist):
    d = real_fmnist
    assert d.name == "Fashion-MNIST" and d.sha256 == data.FMNIST_FILES
    assert d.info()["name"] == "Fashion-MNIST" and d.info()["source"] == d.source
    recorded = d.provenance()["source"]  # committed in run.json: no machine path
    assert not recorded.startswith("/") and d.source.endswith(recorded)


def test_the_jpeg_copy_is_not_called_cifar10(real_cifar10):
    d = real_cifar10
    if d.sha256 != data.CIFAR10_JPEG_COPY_SHA256:
        pytest.skip(f"the CIFAR-10 found is {d.name}, not the JPEG-decoded copy")
    assert d.name == "CIFAR-10 (JPEG-decoded copy)"
    assert d.sha256 == data.CIFAR10_JPEG_COPY_SHA256


def _linked_copy(tmp_path, source):
    """A folder of links to real CIFAR-10 batches, and their md5s."""
    folder = tmp_path / data.FOLDER[data.Dataset.CIFAR10]
    folder.mkdir()
    md5 = {}
    for name in data.CIFAR10_FILES:
        (folder / name).symlink_to(f"{source}/{name}")
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return folder, md5


def test_official_cifar10_is_verified_by_checksum(tmp_path, monkeypatch, real_cifar10):
    """No official batches are reachable here: pretend the copy's md5s are the official
    ones. All matching is CIFAR-10; some matching is a corrupt or mixed folder."""
    folder, md5 = _linked_copy(tmp_path, real_cifar10.source)
    monkeypatch.setattr(data, "CIFAR10_OFFICIAL_MD5", md5)
    assert data.load("cifar10", folder).name == "CIFAR-10"
    data._read.cache_clear()
    monkeypatch.setattr(data, "CIFAR10_OFFICIAL_MD5", {**md5, "test_batch": "0" * 32})
    with pytest.raises(PdrayError, match="test_batch do not") as e:
        data.load("cifar10", folder)
    assert "\n" not in str(e.value)
    data._read.cache_clear()


def test_resume_on_other_data_is_refused(tmp_path):
    cfg = pipeline.resolve(EvalConfig(**CFG))
    shards = [[0, 1], [2, 3]]
    source = data.load("fmnist").provenance()
    results.prepare_out(tmp_path, cfg, shards, {}, source)
    assert json.loads((tmp_path / "run.json").read_text())["data"] == source
    moved = {**source, "source": "/elsewhere/fashion-mnist"}  # same files, another folder
    results.prepare_out(tmp_path, cfg, shards, {}, moved)
    other = {**source, "name": "Fashion-MNIST (unofficial copy)",
             "sha256": {**source["sha256"], "t10k-images-idx3-ubyte.gz": "0" * 64}}
    with pytest.raises(PdrayError, match="mix results from two datasets") as e:
        results.prepare_out(tmp_path, cfg, shards, {}, other)
    assert "\n" not in str(e.value) and "--data-dir" in str(e.value)
