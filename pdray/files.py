"""Checksums and atomic writes: a reader never sees a half-written result."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from pdray.errors import PdrayError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then
    rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results and weights are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path) -> None:
    """A PdrayError now, before any work, if ``atomic_write`` could not write ``path``:
    it is a folder, or no temporary file can be made beside it."""
    path = Path(path)
    if path.is_dir():
        raise PdrayError(f"Cannot write {path}: it is a folder. Name a file inside it.")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PdrayError(f"Cannot write {path}: {path.parent} is not a writable folder "
                         f"({e.strerror}).") from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (np.save itself would append .npy to a temporary name)."""
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)
