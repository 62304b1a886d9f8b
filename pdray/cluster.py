"""Connecting to Ray and choosing devices: the few facts every Ray entry point needs, and
what a run records about where it ran. Ray is imported only where it is used: the modules
that need a device alone do not pay for it."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

import torch

import pdray
from pdray.config import Device
from pdray.errors import PdrayError, parse_choice

# Ray's default object store takes 30% of RAM; pdray's batches are small images.
LOCAL_OBJECT_STORE_BYTES = 1 << 30


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a small local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)


def gpus_available() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def require_gpus(n: int) -> None:
    """Asking Ray for GPUs that no node has hangs forever; fail at once instead."""
    have = gpus_available()
    if n > have:
        raise PdrayError(f"{n} GPU(s) requested but the Ray cluster has {have}. Run on the "
                         f"CPU (no --gpu for training, --gpus 0 or auto for eval) or add GPU "
                         f"nodes (see cluster.yaml).")


def torch_device(device: str = "auto") -> torch.device:
    """The device torch can use here; Ray's GPU bookkeeping alone does not make CUDA real.
    ``cuda`` where torch sees no GPU is an error: a run asked for on a GPU and silently
    made on the CPU would measure the wrong thing."""
    choice = parse_choice(Device, device, "device")
    if choice is Device.CUDA and not torch.cuda.is_available():
        build = (f"a CUDA {torch.version.cuda} build, no GPU visible" if torch.version.cuda
                 else "a CPU-only build")
        raise PdrayError(f"--device cuda, but torch {torch.__version__} ({build}) sees no CUDA "
                         f"GPU here. Use --device cpu or auto, or run on a machine with a GPU "
                         f"and a CUDA build of torch.")
    use_cuda = choice is Device.CUDA or choice is Device.AUTO and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def placement() -> str:
    """Where this process runs, for the rows it makes: "node <id> gpu <ids>", or "local"
    outside Ray."""
    import ray

    if not ray.is_initialized():
        return "local"
    node = ray.get_runtime_context().get_node_id()[:12]
    return f"node {node} gpu {','.join(map(str, ray.get_gpu_ids())) or '-'}"


def versions() -> dict:
    """Library versions and this machine's CPU: the same code on another CPU family runs
    other float kernels, which changes CW's and DeepFool's images (see README,
    Reproducibility)."""
    return {"python": platform.python_version(), "pdray": pdray.__version__,
            "torch": torch.__version__,
            **{name: metadata.version(name) for name in ("ray", "foolbox", "eagerpy", "numpy",
                                                         "pandas")},
            "cpu": f"{_cpu_model()} ({platform.machine()}, torch kernels "
                   f"{torch.backends.cpu.get_cpu_capability()})"}


def kernels(cpu: str) -> str | None:
    """The torch kernel level in a ``versions()["cpu"]`` string (None if it has none)."""
    found = re.search(r"torch kernels ([^)]+)\)", cpu or "")
    return found.group(1) if found else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
