import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pdray import bench, purify
from pdray.cluster import torch_device
from pdray.errors import PdrayError
from conftest import REPO, tiny_pixelcnn
from test_cli import pdray

try:
    import art  # noqa: F401
    ART_MISSING = None
except Exception as e:  # missing, or broken by its own dependencies
    ART_MISSING = f"IBM ART does not import ({type(e).__name__}: {e}); pip install -e '.[art]'"
needs_art = pytest.mark.skipif(ART_MISSING is not None, reason=str(ART_MISSING))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the no-GPU path "
                                                              "does not run")
GPU_CHECK = REPO / "bench" / "gpu-check.sh"


def direct_one_pass(model, images, eps_defend):
    """The one-pass bounded argmax, written out with purify's own helpers."""
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).long()
    with torch.no_grad():
        probs = torch.softmax(model(x), -1).reshape(-1, 256)
    lo, hi = purify.bounds(x, torch.full((len(x),), eps_defend))
    direct = purify._decide(probs, lo.reshape(-1), hi.reshape(-1))[0].view(x.shape)
    return direct.numpy().transpose(0, 2, 3, 1).astype(np.uint8)


@needs_art
@pytest.mark.parametrize("samples,channels", [("fmnist_samples", 1), ("cifar_samples", 3)])
def test_art_reads_the_probabilities_and_picks_their_bounded_argmax(samples, channels, request):
    """IBM ART's PixelDefend is one pass: each sub-pixel becomes the most likely value in
    its eps box under the model's output for the unpurified image. Computed directly, the
    same rule must give ART's output exactly (it did not while ART read the logits)."""
    images = request.getfixturevalue(samples)[0][:3]
    model = tiny_pixelcnn(channels)
    out = bench.art_pixeldefend(model, images, 8, batch_size=3)
    assert np.array_equal(out, direct_one_pass(model, images, 8))
    assert np.array_equal(out, purify.one_pass(model, images, 8, batch_size=2))
    assert (out != images).mean() > 0.3  # not vacuous


@needs_art
def test_bench_purify_art_agrees_with_the_one_pass_rule():
    """The bench's own check: on every benchmarked image ART equals the one-pass rule, and
    differs from Algorithm 1, which is sequential."""
    r = bench.bench_purify("fmnist", n_images=3, batch_size=2, reference_steps=1,
                           agreement_images=1, art=True, device="cpu")
    assert r["device"] == "cpu" and r["images"] == 3 and r["agreement"] == 1.0
    assert r["art_agreement_with_one_pass"] == 1.0
    assert r["art_agreement_with_reference"] == r["one_pass_agreement_with_reference"] < 1


@needs_art
def test_bench_purify_art_reads_the_shipped_cifar10_pixelcnn():
    """The same check with the three-channel shipped model, less Algorithm 1 run in full:
    3,072 passes of that model for one image, minutes on a CPU. Without it the bench
    compares nothing with Algorithm 1 and says so."""
    r = bench.bench_purify("cifar10", n_images=3, batch_size=2, reference_steps=1,
                           agreement_images=0, art=True, device="cpu")
    assert r["images"] == 3 and r["art_agreement_with_one_pass"] == 1.0
    assert r["agreement"] is r["art_agreement_with_reference"] is None
    assert r["agreement_subpixels"] == 0


@needs_art
def test_an_art_failure_is_one_pdray_error(monkeypatch):
    """ART breaking inside its own code is a message, not a traceback."""
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.softmax = torch.nn.Identity()  # the child ART reads

        def forward(self, x):
            raise RuntimeError("boom")

    monkeypatch.setattr(bench, "_ArtProbabilities", lambda model: Broken())
    with pytest.raises(PdrayError, match="IBM ART's PixelDefend failed .*boom"):
        bench.art_pixeldefend(tiny_pixelcnn(1), np.zeros((1, 28, 28, 1), np.uint8), 8, 1)


def test_bench_deepfool_times_both_loops_on_the_same_images():
    """The bench's own agreement check: pdray's DeepFool loop gives foolbox's images, up to
    the float noise of batch size (here one image goes on alone after the first step)."""
    r = bench.bench_deepfool("fmnist-resnet-normal", n_images=4, steps=3)
    assert r["images"] == 4 and r["steps"] == 3 and r["foolbox_cpu_s"] > 0 < r["pdray_cpu_s"]
    assert r["max_abs_diff_levels"] < 1e-3 and r["found_agreement"] == 1.0
    assert 0 < r["identical_images"] <= 1
    with pytest.raises(PdrayError, match="at least 1"):
        bench.bench_deepfool("fmnist-resnet-normal", n_images=0)
    with pytest.raises(PdrayError, match="fmnist-pixelcnn is a fmnist pixelcnn, not a"):
        bench.bench_deepfool("fmnist-pixelcnn")


def test_torch_device_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device().type == torch_device("auto").type == torch_device("cpu").type == "cpu"
    with pytest.raises(PdrayError, match="--device cuda, but torch .* sees no CUDA GPU"):
        torch_device("cuda")
    with pytest.raises(PdrayError, match="Unknown device 'tpu'"):
        torch_device("tpu")


@no_gpu
def test_bench_purify_on_cuda_without_a_gpu_is_a_clear_error():
    r = pdray("bench", "purify", "--dataset", "fmnist", "--device", "cuda", "--json", check=False)
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr and r.stderr.startswith("pdray: error: --device cuda")


def gpu_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=300)


@no_gpu
def test_gpu_check_without_a_gpu_prints_one_json_line_and_exits_0():
    r = gpu_check({"PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["gpu"] is False and "no GPU" in line["message"]


def test_gpu_check_runs_bench_purify_on_cuda_at_both_batches(tmp_path):
    """The GPU path with a stand-in interpreter that claims a GPU and echoes the
    arguments bench purify was given: four runs, one JSON line."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [[ $2 == import\\ torch* ]]; then echo "2.0 True"; exit; fi\n'
                    'shift 2; printf \'{"args": "%s"}\\n\' "$*"\n')
    fake.chmod(0o755)
    r = gpu_check({"PYTHON": str(fake), "CIFAR10_DATA_DIR": "/data/c10"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    args = [run["args"] for run in line["runs"]]
    assert line["gpu"] is True and len(args) == 4
    for a, dataset, batch in zip(args, ["fmnist", "fmnist", "cifar10", "cifar10"],
                                 [256, 1024, 256, 1024]):
        assert a.startswith(f"bench purify --dataset {dataset} --device cuda --batch-size {batch} "
                            f"--n-images {batch} ") and a.endswith("--json" if dataset == "fmnist"
                                                                     else "--data-dir /data/c10")


def test_gpu_check_stops_at_a_failed_run_with_a_json_line(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [[ $2 == import\\ torch* ]]; then echo "2.0 True"; exit; fi\n'
                    'echo "pdray: error: out of memory" >&2; exit 2\n')
    fake.chmod(0o755)
    r = gpu_check({"PYTHON": str(fake)})
    assert r.returncode == 1 and "out of memory" in r.stderr
    line = json.loads(r.stdout)
    assert line["gpu"] is True and "fmnist at batch 256" in line["error"]
