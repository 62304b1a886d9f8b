"""The results folder, as the pipeline writes it and the report reads it:

    OUT/run.json                          what the run computes (config, shards, models, data)
                                          and what it ran on (versions, command)
    OUT/results/shard=KKKKK/part-0.parquet  one row per (image, classifier, attack,
    OUT/results/shard=KKKKK/_SUCCESS        eps_attack, defense); the marker says "complete"
    OUT/history.jsonl                     one line per invocation: shards, wall time, memory
    OUT/partial/ATTACK-DEFENSE-IDS.npz    an adaptive attack's images of a shard not yet
                                          written, so a stopped run resumes inside a shard

A shard is replaced whole (its part file swapped in with os.replace, then marked), so a
rerun is atomic and duplicate-free whatever Ray retried. No Ray and no models here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pdray.config import THROUGH_DEFENSE, Defense, EvalConfig
from pdray.errors import PdrayError
from pdray.files import atomic_write
from pdray.purify import adaptive_eps

# One row per (image, classifier, attack, eps_attack, defense).
SCHEMA = pa.schema([
    ("shard", pa.int64()), ("image_id", pa.int64()), ("label", pa.int64()),
    ("dataset", pa.string()), ("classifier", pa.string()), ("network", pa.string()),
    ("recipe", pa.string()), ("attack", pa.string()), ("eps_attack", pa.int64()),
    ("defense", pa.string()), ("eps_defend", pa.int64()), ("pred", pa.int64()),
    ("correct", pa.bool_()), ("bpd_input", pa.float64()), ("pvalue_input", pa.float64()),
    ("bpd_defended", pa.float64()),
    ("seconds", pa.float64()), ("purifier", pa.string()),  # provenance: time, node/GPU
    ("image_input", pa.binary()), ("image_defended", pa.binary()),  # uint8 HWC bytes, or null
])
SHARED = "*"  # the classifier of rows whose image does not depend on one (clean, RAND)
KEY = ["image_id", "classifier", "attack", "eps_attack", "defense"]
MARKER = "_SUCCESS"
HISTORY = "history.jsonl"
PARTIAL = "partial"


# ---- shards --------------------------------------------------------------------------------

def shard_dir(out: Path, k: int) -> Path:
    return Path(out) / "results" / f"shard={k:05d}"


def completed_shards(out: Path) -> set[int]:
    folder = Path(out) / "results"
    if not folder.is_dir():
        return set()
    return {int(p.name.split("=")[1]) for p in folder.glob("shard=*") if (p / MARKER).exists()}


def write_shard(out: Path, k: int, rows: pd.DataFrame) -> None:
    """Replace shard k: drop its marker, atomically swap in the one part file, then mark it
    complete. Readers see the old complete file, or the new one, never a mix."""
    folder = shard_dir(out, k)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    rows = rows.sort_values(KEY).reset_index(drop=True)
    table = pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata(None)  # types from SCHEMA alone, not pandas' guesses
    atomic_write(folder / "part-0.parquet", lambda tmp: pq.write_table(table, tmp))
    atomic_write(folder / MARKER, lambda tmp: tmp.write_text(f"{len(rows)}\n"))


def load_results(out: Path) -> tuple[pd.DataFrame, dict]:
    """Rows of every shard that has its completion marker, and the run's run.json."""
    out = Path(out)
    run = read_run(out)
    parts = sorted(p for p in (out / "results").glob("shard=*/part-0.parquet")
                   if (p.parent / MARKER).exists())
    if not parts:
        raise PdrayError(f"{out} has no completed shards yet; run the evaluation first.")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True), run


def rethreshold(out: Path, threshold: float) -> dict:
    """Give a run's adaptive PixelDefend rows another bits/dim threshold without purifying
    again. Adaptive PixelDefend shows the classifier the input below the threshold and
    PixelDefend's purified image at or above it (``purify.defend``), so its rows follow
    from the run's undefended and PixelDefend rows. Not so where BPDA was aimed at it: the
    attack itself depends on the threshold, and such a run must be made again. Running it
    twice gives the same rows, so an interrupted call is finished by calling it again."""
    out = Path(out)
    if np.isnan(threshold):
        raise PdrayError("--adaptive-threshold must be a number of bits/dim, not NaN.")
    run = read_run(out)
    cfg = run["config"]
    needed = {Defense.NONE.value, Defense.PIXELDEFEND.value, Defense.ADAPTIVE.value}
    if not needed <= set(cfg["defenses"]):
        raise PdrayError(f"{out} was not run with the defenses none, pixeldefend and adaptive, "
                         f"from which adaptive PixelDefend's rows follow; run it again with "
                         f"--adaptive-threshold {threshold}.")
    aimed = sorted(set(cfg["attacks"]) & set(THROUGH_DEFENSE))
    if aimed:
        raise PdrayError(f"{out} holds {', '.join(aimed)} images aimed at adaptive PixelDefend, "
                         f"which depend on its threshold; run it again with "
                         f"--adaptive-threshold {threshold} (and a new --out).")
    start, switched = time.perf_counter(), 0
    df, _ = load_results(out)
    shards = sorted(df.shard.unique().tolist())
    for k, rows in df.groupby("shard"):
        new = _rethreshold_rows(rows, threshold)
        switched += int((new.eps_defend != rows.eps_defend).sum())
        write_shard(out, k, new)
    before = cfg.get("adaptive_threshold")
    run["config"]["adaptive_threshold"] = float(threshold)
    atomic_write(out / "run.json", lambda tmp: tmp.write_text(json.dumps(run, indent=2) + "\n"))
    summary = {"out": str(out), "threshold_before": before, "threshold": float(threshold),
               "shards": len(shards), "adaptive_rows_switched": switched}
    record_history(out, {"command": command(), "shards": shards,
                         "wall_time_s": time.perf_counter() - start, "rethreshold": summary})
    return summary


def _rethreshold_rows(rows: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Each adaptive row becomes the undefended row (below the threshold) or the PixelDefend
    row (at or above it) of the same image, classifier, attack and eps_attack."""
    key = ["image_id", "classifier", "attack", "eps_attack"]
    taken = ["eps_defend", "pred", "correct", "bpd_defended", "image_defended"]
    adaptive = (rows.defense == Defense.ADAPTIVE.value).to_numpy()
    a = rows[adaptive]
    kept = adaptive_eps(a.bpd_input.to_numpy(), threshold, 1) == 0
    source = pd.DataFrame({**{c: a[c].to_numpy() for c in key},
                           "defense": np.where(kept, Defense.NONE.value, Defense.PIXELDEFEND.value)})
    picked = source.merge(rows[key + ["defense"] + taken], on=key + ["defense"], how="left",
                          validate="one_to_one")
    if picked.pred.isna().any():
        raise PdrayError("Some adaptive rows have no undefended or PixelDefend row beside them; "
                         "the results folder is incomplete.")
    new = rows.copy()
    for c in taken:
        new.loc[adaptive, c] = picked[c].to_numpy()
    return new


# ---- run.json ------------------------------------------------------------------------------

def read_run(out: Path) -> dict:
    """OUT/run.json: what the run computes and what it was begun on."""
    try:
        return json.loads((Path(out) / "run.json").read_text())
    except (OSError, ValueError):
        raise PdrayError(f"{out} has no readable run.json: it is not a pdray results folder.") from None


def prepare_out(out: str | Path, cfg: EvalConfig, shards: list[list[int]], models: dict,
                data: dict | None = None, recorded: dict | None = None) -> Path:
    """Create OUT and its run.json, or check that an existing OUT holds this run: the same
    configuration, shards and models (name -> sha256) and, when both record it, the same
    data (``data.Data.provenance``). ``recorded`` (versions, say) is written, not compared."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pdray-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PdrayError(f"Cannot write results to {out} ({e.strerror}). Choose a writable "
                         f"--out folder.") from None
    run = {"config": asdict(cfg), "shards": shards, "models": models}
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
            raise PdrayError(f"{path} is unreadable; use a new --out folder.")
        _check_same_data(out, old.get("data"), data)
        # A run.json from before an option existed matches if this run leaves it at its default.
        defaults = {f.name: f.default for f in fields(EvalConfig)}
        old["config"] = {**{k: v for k, v in run["config"].items() if v == defaults.get(k)},
                         **old["config"]}
        if {k: old.get(k) for k in run} != run:
            raise PdrayError(f"{out} holds results of another configuration (see its run.json). "
                             f"Use a new --out folder, or the same options as that run.")
    run.update(**(recorded or {}), command=command(), **({"data": data} if data else {}))
    if not path.exists():
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(run, indent=2) + "\n"))
    return out


def _check_same_data(out: Path, old: dict | None, new: dict | None) -> None:
    """Resuming on other data would mix two datasets' rows in one table. The folder the
    data is read from may change; its name and checksums may not. A run.json from before
    runs recorded their data cannot be checked."""
    if not old or not new or (old.get("name"), old.get("sha256")) == (new["name"], new["sha256"]):
        return
    raise PdrayError(f"{out} holds results computed on {old.get('name')} read from "
                     f"{old.get('source')}, but this run reads {new['name']} from "
                     f"{new['source']}, and the files' sha256 checksums differ (see run.json); "
                     f"resuming would mix results from two datasets. Point --data-dir at the "
                     f"data that run used, or use a new --out folder.")


# ---- partial: adaptive attacks of shards not yet written ----------------------------------

def kept(out: str | Path | None, name: str, image_ids: np.ndarray,
         make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``make()``'s arrays for these images, kept in OUT/partial until the run is complete.
    An adaptive attack on one shard takes its purifier an hour on a CPU; a stopped run
    (--resume) then redoes only the attacks it had not finished. The file's name digests
    the image ids and run.json's configuration and models, so no other run reads it. Kept
    only where a purifier sees the run's folder (a purifier on another node without shared
    storage recomputes); a damaged file is recomputed."""
    if out is None or not (Path(out) / "run.json").exists():
        return make()
    run = read_run(out)
    what = json.dumps([run["config"], run["models"], np.asarray(image_ids).tolist()],
                      sort_keys=True)
    path = Path(out) / PARTIAL / f"{name}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            return dict(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    arrays = make()
    path.parent.mkdir(exist_ok=True)

    def write(tmp: Path):
        with open(tmp, "wb") as f:  # np.savez would add .npz to a temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return arrays


def drop_partial(out: Path, n_shards: int) -> None:
    """Remove OUT/partial once every shard of the run is written."""
    if len(completed_shards(out)) == n_shards:
        shutil.rmtree(Path(out) / PARTIAL, ignore_errors=True)


# ---- history.jsonl -------------------------------------------------------------------------

def command() -> list[str]:
    """This process's command line, with the program's folder left out."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def record_history(out: Path, entry: dict) -> None:
    """Add one invocation (command, shards, wall time) to OUT/history.jsonl, so a results
    folder tells how it was made and how long that took, across resumes. An entry with the
    ``invocation`` of an earlier line replaces it: a run records itself as it goes."""
    path = Path(out) / HISTORY
    lines = path.read_text().splitlines() if path.exists() else []
    mine = [i for i, line in enumerate(lines)
            if "invocation" in entry and json.loads(line).get("invocation") == entry["invocation"]]
    if mine:
        lines[mine[0]] = json.dumps(entry)
    else:
        lines.append(json.dumps(entry))
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))


def read_history(out: Path) -> list[dict]:
    path = Path(out) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
