"""Shipped weights: the manifest, checksummed loading, and export of trained models.

A weights file is a plain dict loadable with ``torch.load(weights_only=True)``:
``{"kind", "dataset", "arch", "recipe", "config", "metrics", "state_dict"}``. The
manifest (weights/manifest.json) lists each file with its recipe, epochs, wall time,
metrics and sha256, and is what ``pdray models list`` prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from pdray import classifiers, data, pixelcnn
from pdray.classifiers import predict
from pdray.config import METRIC_IMAGES
from pdray.errors import PdrayError
from pdray.files import atomic_write, sha256
from pdray.pixelcnn import bits_per_dim

PACKAGE_WEIGHTS = Path(__file__).parent / "weights"


def weights_dir() -> Path:
    """The shipped weights, or PDRAY_WEIGHTS_DIR's (tests, private model zoos). Read at
    each call, so Ray actors see what the driver's environment says."""
    return Path(os.environ.get("PDRAY_WEIGHTS_DIR") or PACKAGE_WEIGHTS)


def manifest() -> list[dict]:
    path = weights_dir() / "manifest.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PdrayError(f"{path} is not valid JSON; restore it from git.") from None


def entry(name: str) -> dict:
    for e in manifest():
        if e["name"] == name:
            return e
    names = ", ".join(e["name"] for e in manifest()) or "none yet"
    raise PdrayError(f"No shipped model named {name!r}. Shipped models: {names} "
                     f"(`pdray models list`).")


def require(name: str, kind: str, dataset: str) -> dict:
    """The entry of a shipped ``kind`` ("classifier" or "pixelcnn") of ``dataset``."""
    e = entry(name)
    if e["kind"] != kind or e["dataset"] != dataset:
        what = "PixelCNN" if kind == "pixelcnn" else kind
        raise PdrayError(f"{name} is a {e['dataset']} {e['kind']}, not a {dataset} {what}.")
    return e


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> dict:
    """Load a weights or training-state file safely, with a clear error if it is bad. A
    training state stands for the model it would ship: its averaged weights."""
    path = Path(path)
    if not path.is_file():
        raise PdrayError(f"Checkpoint {path} does not exist.")
    if expected_sha256 and sha256(path) != expected_sha256:
        raise PdrayError(f"Checkpoint {path} does not match its manifest sha256: it is "
                         f"corrupt or was replaced. Restore it (shipped weights come back "
                         f"with a reinstall or `git checkout`) or retrain it.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise PdrayError(f"Checkpoint {path} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). It is corrupt or "
                         f"not a pdray checkpoint.") from None
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and isinstance(ckpt.get("model"), dict):
        ckpt = {**ckpt, "state_dict": ckpt["model"]}  # a training state: its averaged weights
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "kind" not in ckpt:
        raise PdrayError(f"Checkpoint {path} is not a pdray weights file or training state.")
    return ckpt


def build(ckpt: dict) -> nn.Module:
    """The model a weights file describes, with its weights, in eval mode on the CPU."""
    if ckpt["kind"] == "classifier":
        shape = data.SHAPE[data.Dataset(ckpt["dataset"])]
        model = classifiers.build(ckpt["arch"], shape, [0.0] * shape[2], [1.0] * shape[2],
                                  **ckpt.get("arch_options", {}))
    elif ckpt["kind"] == "pixelcnn":
        model = pixelcnn.PixelCNN(pixelcnn.Config(**ckpt["config"]))
    else:
        raise PdrayError(f"Unknown model kind {ckpt['kind']!r} in checkpoint.")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise PdrayError(f"Checkpoint weights do not fit a {ckpt['kind']} "
                         f"({str(e).splitlines()[0]}).") from None
    return model.eval()


def path_of(name: str) -> Path:
    """The weights file of a shipped model (what pipeline actors load by path)."""
    return weights_dir() / entry(name)["file"]


def load(name_or_path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A shipped model by name (checksum verified), or any weights file by path."""
    p = Path(name_or_path)
    if p.suffix == ".pt" and (p.is_file() or os.sep in str(name_or_path)):
        ckpt = load_checkpoint(p)
    else:
        e = entry(str(name_or_path))
        ckpt = load_checkpoint(weights_dir() / e["file"], e["sha256"])
    return build(ckpt).to(device), ckpt


FLOAT32_LIMIT_MB = 25.0  # larger weights ship in float16 (the VGG's 12.8M parameters)


def export(ckpt: dict, name: str, epochs: int, wall_time_s: float,
           trained_on: dict | None = None) -> dict:
    """Ship a trained model: write weights/<name>.pt and its manifest entry, atomically.
    ``trained_on`` (``data.Data.provenance``) names the data it was trained and scored on.
    Weights over FLOAT32_LIMIT_MB are stored in float16 to keep the repository small;
    loading copies them into the float32 model, and the manifest says "stored_as"."""
    weights_dir().mkdir(parents=True, exist_ok=True)
    path = weights_dir() / f"{name}.pt"
    state = ckpt["state_dict"]
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    stored_as = "float16" if size_mb > FLOAT32_LIMIT_MB else "float32"
    if stored_as == "float16":
        ckpt = {**ckpt, "state_dict": {k: t.half() if t.is_floating_point() else t
                                       for k, t in state.items()}}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    new = {"name": name, "dataset": ckpt["dataset"], "kind": ckpt["kind"], "arch": ckpt["arch"],
           "recipe": ckpt.get("recipe"), "epochs": epochs, "wall_time_s": round(wall_time_s, 1),
           "metrics": ckpt["metrics"], "config": ckpt["config"],
           **({"train_config": ckpt["train_config"]} if "train_config" in ckpt else {}),
           **({"data": trained_on} if trained_on else {}),
           "stored_as": stored_as, "sha256": sha256(path), "file": path.name}
    _write_manifest([e for e in manifest() if e["name"] != name] + [new])
    return new


def update_entry(name: str, **fields) -> dict:
    """Add fields (such as a companion file and its sha256) to a manifest entry."""
    e = {**entry(name), **fields}
    _write_manifest([x for x in manifest() if x["name"] != name] + [e])
    return e


def _write_manifest(entries: list[dict]) -> None:
    entries.sort(key=lambda e: (e["kind"], e["dataset"], e["name"]))
    atomic_write(weights_dir() / "manifest.json", lambda tmp: tmp.write_text(json.dumps(entries, indent=2) + "\n"))


def adaptive_threshold(name: str) -> dict:
    """The adaptive PixelDefend threshold chosen for a shipped PixelCNN (pdray.adaptive)."""
    e = entry(name)
    if "adaptive_threshold" not in e:
        raise PdrayError(f"{name} has no adaptive threshold yet; choose one on validation "
                         f"data with `pdray adaptive-threshold --dataset {e['dataset']}`.")
    return e["adaptive_threshold"]


def metric(name: str, n_images: int = METRIC_IMAGES, data_dir: str | Path | None = None,
           device: torch.device | str = "cpu") -> dict:
    """A shipped model's metric recomputed on the first ``n_images`` test images:
    accuracy for a classifier, bits/dim for a PixelCNN."""
    e = entry(name)
    d = data.load(e["dataset"], data_dir)
    if not 1 <= n_images <= len(d.test.labels):
        raise PdrayError(f"--n-images must be between 1 and {len(d.test.labels)}; got {n_images}.")
    model, _ = load(name, device)
    images, labels = d.test.images[:n_images], d.test.labels[:n_images]
    if e["kind"] == "classifier":
        metric, value = "accuracy", float((predict(model, images) == labels).mean())
    else:
        metric, value = "bpd", float(bits_per_dim(model, images).mean())
    return {"name": name, "metric": metric, "value": value, "n_images": n_images,
            "data": d.name}
