"""The `pdray` command as a user runs it: JSON outputs, and clear errors without tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pdray(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-c", "from pdray.cli import main; main()", *args],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def assert_clean_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.startswith("pdray: error:")
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.parametrize("dataset,train,shape", [("fmnist", 60000, [28, 28, 1]),
                                                 ("cifar10", 50000, [32, 32, 3])])
def test_data_info(dataset, train, shape):
    info = json.loads(pdray("data", "info", "--dataset", dataset, "--json").stdout)
    assert info["dataset"] == dataset and info["train"] == train and info["test"] == 10000
    assert info["shape"] == shape and len(info["classes"]) == 10 and info["source"]


def test_models_list_is_json():
    models = json.loads(pdray("models", "list", "--json").stdout)
    assert isinstance(models, list)
    for m in models:
        assert {"name", "dataset", "kind", "arch", "recipe", "epochs", "wall_time_s", "metrics",
                "sha256", "file"} <= set(m)


def test_missing_data_is_a_clear_error(tmp_path):
    r = pdray("data", "info", "--dataset", "cifar10", "--data-dir", str(tmp_path), check=False,
              env={"PDRAY_DATA_DIR": "", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert_clean_error(r, "cifar10 was not found", str(tmp_path))


def test_unknown_model_is_a_clear_error():
    assert_clean_error(pdray("models", "evaluate", "no-such-model", check=False),
                       "No shipped model named")


def test_unknown_recipe_is_a_clear_error(tmp_path):
    r = pdray("train", "classifier", "--recipe", "distillation", "--runs-dir", str(tmp_path),
              check=False)
    assert_clean_error(r, "Unknown recipe")
