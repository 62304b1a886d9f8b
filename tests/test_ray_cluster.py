"""The pipeline on multi-node and submitted-job setups: GPU placement, node and actor
loss, and `ray job submit` against a head this test starts and stops by pid."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pdray import pipeline, report, results
from pdray.config import EvalConfig, RunOptions
from conftest import REPO, local_ray
from test_pipeline import CFG, rows

MANY_SHARDS = {**CFG, "n_images": 20, "shards": 10, "purify_batch": 10}  # a shard per batch


def expected_rows(cfg):
    return cfg["n_images"] * pipeline.resolve(EvalConfig(**cfg)).rows_per_image()


def run_in_thread(cfg, out, **opts):
    box = {}

    def target():
        try:
            pipeline.run(EvalConfig(**cfg), RunOptions(out=str(out), **opts))
        except BaseException as e:  # re-raised in the test
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, box


def wait_for_first_shard(out, thread, timeout=300):
    t0 = time.time()
    while not results.completed_shards(out) and thread.is_alive():
        assert time.time() - t0 < timeout, "no shard finished"
        time.sleep(0.2)
    return len(results.completed_shards(out))


def assert_complete(out, cfg):
    df = rows(out)
    assert len(df) == expected_rows(cfg) and not df.duplicated(results.KEY).any()
    assert results.completed_shards(out) == set(range(cfg["shards"]))


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # it ended meanwhile
        return ""


def test_killing_a_purifier_actor_mid_run(tmp_path):
    local_ray()
    thread, box = run_in_thread(MANY_SHARDS, tmp_path)
    done_at_kill = wait_for_first_shard(tmp_path, thread)
    # This test's Ray runs under this process: never a purifier of another evaluation.
    victims = [p for p in psutil.Process().children(recursive=True)
               if "PurifierStage" in cmdline(p)]
    assert victims, "no purifier actor process found"
    for p in victims:
        p.send_signal(signal.SIGKILL)
    thread.join(600)
    assert "error" not in box, box.get("error")
    assert done_at_kill < MANY_SHARDS["shards"]
    assert_complete(tmp_path, MANY_SHARDS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    """`ray start --head` on free ports with a private temp dir and a fake GPU; stopped by
    killing exactly the processes of that temp dir (never `ray stop`)."""
    tmp = tmp_path_factory.mktemp("rayhead")
    temp_dir = Path("/tmp") / f"pdray-ray-{os.getpid()}"  # short: socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    dash = free_port()
    subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head",
                    f"--port={free_port()}", f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                    f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=1",
                    f"--object-store-memory={300 * 1024 * 1024}",
                    f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}",
                    f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dash}", env, tmp
    for p in psutil.process_iter():
        if str(temp_dir) in cmdline(p):
            p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_full_eval(ray_head):
    import ray

    ray.shutdown()  # this test talks to its own head, not the in-process Ray
    address, env, tmp = ray_head
    out = tmp / "out"
    args = ["--dataset", "fmnist", "--n-images", "4", "--shards", "2", "--attacks", "fgsm",
            "--eps-attack", "8", "--out", str(out)]
    for _ in range(60):  # the head's job agent comes up a few seconds after `ray start`
        r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit",
                            "--address", address, "--working-dir", str(REPO), "--",
                            "python", "jobs/full_eval.py", *args],
                           env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in r.stderr:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on GPUs" in r.stdout  # the fake GPU was found and asked for
    assert results.completed_shards(out) == {0, 1}
    assert (out / "report" / "table1.md").exists()


def test_purifiers_spread_one_per_gpu(gpu_cluster, tmp_path):
    pipeline.run(EvalConfig(**MANY_SHARDS), RunOptions(out=str(tmp_path)))
    assert_complete(tmp_path, MANY_SHARDS)
    df, _ = results.load_results(tmp_path)
    placements = set(df.purifier)
    assert len(placements) == 2, placements  # two purifiers, one on each GPU node
    assert len({p.split(" gpu ")[0] for p in placements}) == 2
    assert all(" gpu -" not in p for p in placements)


def test_losing_a_worker_node_mid_run(gpu_cluster, tmp_path):
    cluster, workers = gpu_cluster
    thread, box = run_in_thread(MANY_SHARDS, tmp_path)
    done_at_kill = wait_for_first_shard(tmp_path, thread)
    cluster.remove_node(workers[0])
    thread.join(600)
    assert "error" not in box, box.get("error")
    assert done_at_kill < MANY_SHARDS["shards"]  # the node died while work remained
    assert_complete(tmp_path, MANY_SHARDS)
