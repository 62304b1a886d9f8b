"""The distributed evaluation: test-image shards -> attack actors -> purifier actors ->
one Parquet file per shard. The one module that imports ray.data.

    shards (one block each)
      -> AttackStage    (actor pool; classifiers loaded once per actor)
      -> PurifierStage  (actor pool; one PixelCNN replica per actor, one GPU each if any)
      -> the driver groups rows by shard and writes OUT/results/shard=KKKKK/part-0.parquet,
         then the shard's _SUCCESS marker.

Clean and RAND images do not depend on the classifier, so they travel once with
classifier "*" and are purified once; the purifier classifies each defended image with
every classifier it concerns. The adaptive BPDA attack needs the purifier, so the
purifier stage makes those images from the clean ones it receives. Writing on the driver,
one file per shard replaced with os.replace, makes a shard rerun atomic and duplicate-free
whatever Ray retried.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pdray import attacks, data, zoo
from pdray.errors import PdrayError, parse_choice
from pdray.files import atomic_write
from pdray.monitor import PeakMemory

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


class Defense(str, Enum):
    NONE = "none"
    SQUEEZE = "squeeze"
    PIXELDEFEND = "pixeldefend"
    ADAPTIVE = "adaptive"


# The paper's settings: CIFAR-10 Table 1; Fashion-MNIST as recalled in FIELD-NOTES.
DEFAULT_EPS_ATTACK = {data.Dataset.FMNIST: [8, 25], data.Dataset.CIFAR10: [2, 8, 16]}
DEFAULT_EPS_DEFEND = {data.Dataset.FMNIST: 32, data.Dataset.CIFAR10: 16}


@dataclass
class EvalConfig:
    """What a run computes. Two runs with equal configs produce equal rows."""
    dataset: str = "fmnist"
    n_images: int = 64
    shards: int = 4
    attacks: list[str] = field(default_factory=lambda: list(attacks.PAPER_ATTACKS))
    eps_attack: list[int] | None = None      # default: the paper's, per dataset
    eps_defend: int | None = None            # default: the paper's, per dataset
    classifiers: list[str] | None = None     # default: the dataset's normal ResNet
    pixelcnn: str | None = None              # default: the dataset's shipped PixelCNN
    defenses: list[str] = field(default_factory=lambda: [d.value for d in Defense])
    adaptive_threshold: float | None = None  # bits/dim; default: the one chosen on validation data
    seed: int = 0
    save_images: int = 8                     # keep images of image ids below this, for figures
    cw_steps: int = 50
    cw_binary_search_steps: int = 3
    deepfool_steps: int = 50
    bpda_steps: int | None = None            # default: BIM's (Kurakin's) step count
    purify_batch: int = 64


@dataclass
class RunOptions:
    """How a run is carried out; not part of what it computes."""
    out: str = "out"
    data_dir: str | None = None
    shard: int | None = None        # rerun only this shard
    resume: bool = False            # skip shards that have a marker
    num_attackers: int = 1
    num_purifiers: int | None = None  # default: one per GPU, else 1
    attacker_cpus: float = 1.0      # CPUs Ray reserves per actor; on a CPU-only machine the
    purifier_cpus: float = 1.0      # attacks dominate, so give them the cores (purifier 0)
    gpus: str = "auto"              # "auto": a GPU per purifier if the cluster has any; or "0"
    report: bool = True


def resolve(cfg: EvalConfig) -> EvalConfig:
    """Fill defaults and check every choice; errors name the bad value."""
    ds = data.parse_dataset(cfg.dataset)
    cfg = EvalConfig(**asdict(cfg))
    cfg.dataset = ds.value
    cfg.attacks = [attacks.parse_attack(a).value for a in cfg.attacks]
    if not cfg.attacks:
        raise PdrayError("Choose at least one attack.")
    cfg.eps_attack = [attacks.check_eps(e) for e in (cfg.eps_attack or DEFAULT_EPS_ATTACK[ds])]
    cfg.eps_defend = attacks.check_eps(
        DEFAULT_EPS_DEFEND[ds] if cfg.eps_defend is None else cfg.eps_defend, "eps_defend")
    cfg.defenses = [parse_choice(Defense, d, "defense").value for d in cfg.defenses]
    cfg.classifiers = cfg.classifiers or [f"{ds.value}-resnet-normal"]
    for name in cfg.classifiers:
        e = zoo.entry(name)
        if e["kind"] != "classifier" or e["dataset"] != ds.value:
            raise PdrayError(f"{name} is a {e['dataset']} {e['kind']}, not a {ds.value} classifier.")
    cfg.pixelcnn = cfg.pixelcnn or f"{ds.value}-pixelcnn"
    e = zoo.entry(cfg.pixelcnn)
    if e["kind"] != "pixelcnn" or e["dataset"] != ds.value:
        raise PdrayError(f"{cfg.pixelcnn} is not a {ds.value} PixelCNN.")
    if Defense.ADAPTIVE.value in cfg.defenses and cfg.adaptive_threshold is None:
        cfg.adaptive_threshold = zoo.adaptive_threshold(cfg.pixelcnn)["bpd"]
    if cfg.n_images < 1 or cfg.purify_batch < 1 or (cfg.bpda_steps is not None
                                                     and cfg.bpda_steps < 1):
        raise PdrayError("n_images, purify_batch and bpda_steps must be at least 1.")
    return cfg


def rows_per_image(cfg: EvalConfig) -> int:
    shared = 1 + len(cfg.eps_attack) * ("rand" in cfg.attacks)
    per_classifier = len(cfg.eps_attack) * sum(a != "rand" for a in cfg.attacks)
    return (shared + per_classifier) * len(cfg.classifiers) * len(cfg.defenses)


# ---- the stages ----------------------------------------------------------------------------

def _device():
    from pdray.cluster import torch_device

    return torch_device()


class AttackStage:
    """Loads the test set and the classifiers once; maps a batch of shard ids to every
    requested (classifier, attack, eps_attack) image of those shards, plus the clean ones."""

    def __init__(self, cfg: dict, shards: list[list[int]], data_dir: str | None):
        self.cfg = EvalConfig(**cfg)
        self.shards = shards
        self.test = data.load(self.cfg.dataset, data_dir).test
        self.models = {n: zoo.load(n, _device())[0] for n in self.cfg.classifiers}

    def __call__(self, batch: dict) -> dict:
        cfg, cols = self.cfg, defaultdict(list)

        def emit(shard, ids, classifier, attack, eps, images, seconds):
            for i, image_id in enumerate(ids):
                for k, v in (("shard", shard), ("image_id", image_id), ("classifier", classifier),
                             ("attack", attack), ("eps_attack", eps),
                             ("label", int(self.test.labels[image_id])),
                             ("image", images[i]), ("attack_seconds", seconds / len(ids))):
                    cols[k].append(v)

        for shard in batch["shard"]:
            ids = np.asarray(self.shards[int(shard)])
            images, labels = self.test.images[ids], self.test.labels[ids]
            emit(shard, ids, SHARED, "clean", 0, images, 0.0)
            for attack in cfg.attacks:
                if attack == attacks.Attack.BPDA.value:
                    continue  # made by the purifier stage, which holds the defense
                targets = [SHARED] if attack == "rand" else cfg.classifiers
                for name in targets:
                    t = time.perf_counter()
                    advs = attacks.attack_many(
                        attack, self.models.get(name), images, labels, cfg.eps_attack,
                        seed=cfg.seed, image_ids=ids, cw_steps=cfg.cw_steps,
                        cw_binary_search_steps=cfg.cw_binary_search_steps,
                        deepfool_steps=cfg.deepfool_steps)
                    seconds = (time.perf_counter() - t) / len(cfg.eps_attack)
                    for eps, adv in zip(cfg.eps_attack, advs):
                        emit(shard, ids, name, attack, eps, adv, seconds)
        out = {k: np.asarray(v) for k, v in cols.items() if k != "image"}
        out["image"] = np.stack(cols["image"])
        return out


class PurifierStage:
    """One PixelCNN replica: scores each input (bits/dim, p-value), applies every defense,
    purifying each distinct image once, and classifies the result with the unmodified
    classifiers."""

    def __init__(self, cfg: dict):
        import ray

        from pdray import detect

        self.cfg = EvalConfig(**cfg)
        device = _device()
        self.pixelcnn = zoo.load(self.cfg.pixelcnn, device)[0]
        self.train_logp = detect.train_log_likelihoods(self.cfg.pixelcnn)
        self.models = {n: zoo.load(n, device)[0] for n in self.cfg.classifiers}
        self.recipes = {n: zoo.entry(n)["recipe"] for n in self.cfg.classifiers}
        self.archs = {n: zoo.entry(n)["arch"] for n in self.cfg.classifiers}
        ctx = ray.get_runtime_context()
        self.where = f"node {ctx.get_node_id()[:12]} gpu {','.join(map(str, ray.get_gpu_ids())) or '-'}"

    def __call__(self, batch: dict) -> dict:
        from pdray import detect, purify
        from pdray.evaluate import bits_per_dim, predict

        cfg = self.cfg
        if attacks.Attack.BPDA.value in cfg.attacks:
            batch = self._with_bpda(batch)
        images = batch["image"]
        n, dims = len(images), int(np.prod(images.shape[1:]))
        t = time.perf_counter()
        bpd_in = bits_per_dim(self.pixelcnn, images)
        pvalue = detect.pvalues(-bpd_in * dims * np.log(2), self.train_logp)
        defended, bpd_def, eps_def = {}, {}, {}
        if {"pixeldefend", "adaptive"} & set(cfg.defenses):
            # Adaptive alone needs only the images at or above its threshold purified.
            eps = cfg.eps_defend if "pixeldefend" in cfg.defenses else \
                purify.adaptive_eps(bpd_in, cfg.adaptive_threshold, cfg.eps_defend)
            purified, bpd_purified = purify.pixeldefend(
                self.pixelcnn, images, eps, batch_size=cfg.purify_batch, return_bpd=True)
        for d in cfg.defenses:
            if d == "none":
                defended[d], bpd_def[d], eps_def[d] = images, bpd_in, np.zeros(n, int)
            elif d == "squeeze":
                defended[d] = purify.feature_squeeze(images)
                bpd_def[d], eps_def[d] = bits_per_dim(self.pixelcnn, defended[d]), np.zeros(n, int)
            elif d == "pixeldefend":
                defended[d], bpd_def[d] = purified, bpd_purified
                eps_def[d] = np.full(n, cfg.eps_defend)
            else:  # adaptive: images below the threshold keep eps_defend 0, i.e. stay as they are
                eps_def[d] = purify.adaptive_eps(bpd_in, cfg.adaptive_threshold, cfg.eps_defend)
                keep = eps_def[d] == 0
                defended[d] = np.where(keep[:, None, None, None], images, purified)
                bpd_def[d] = np.where(keep, bpd_in, bpd_purified)
        preds = {(d, c): predict(m, x) for d, x in defended.items() for c, m in self.models.items()}
        seconds = (time.perf_counter() - t) / n + batch["attack_seconds"]
        cols = defaultdict(list)
        for i in range(n):
            owner = batch["classifier"][i]
            for c in (cfg.classifiers if owner == SHARED else [owner]):
                for d in cfg.defenses:
                    pred = int(preds[(d, c)][i])
                    keep_image = int(batch["image_id"][i]) < cfg.save_images
                    for k, v in (("shard", int(batch["shard"][i])),
                                 ("image_id", int(batch["image_id"][i])),
                                 ("label", int(batch["label"][i])), ("dataset", cfg.dataset),
                                 ("classifier", c), ("network", self.archs[c]),
                                 ("recipe", self.recipes[c]),
                                 ("attack", batch["attack"][i]),
                                 ("eps_attack", int(batch["eps_attack"][i])), ("defense", d),
                                 ("eps_defend", int(eps_def[d][i])), ("pred", pred),
                                 ("correct", pred == int(batch["label"][i])),
                                 ("bpd_input", float(bpd_in[i])), ("pvalue_input", float(pvalue[i])),
                                 ("bpd_defended", float(bpd_def[d][i])),
                                 ("seconds", float(seconds[i])), ("purifier", self.where),
                                 ("image_input", images[i].tobytes() if keep_image else None),
                                 ("image_defended",
                                  defended[d][i].tobytes() if keep_image else None)):
                        cols[k].append(v)
        return {k: np.asarray(v, dtype=object if k.startswith("image_") else None)
                for k, v in cols.items()}

    def _with_bpda(self, batch: dict) -> dict:
        """Append the BPDA images of this batch's clean images, one per classifier and
        eps_attack. BPDA attacks PixelDefend at eps_defend, so it runs here, beside the
        PixelCNN (and its GPU); the rows then go through every defense like any attack."""
        from pdray import purify

        cfg = self.cfg
        clean = np.nonzero(batch["attack"] == "clean")[0]
        if not len(clean):
            return batch
        images, labels = batch["image"][clean], batch["label"][clean]
        defend = lambda x: purify.pixeldefend(  # noqa: E731
            self.pixelcnn, x, cfg.eps_defend, batch_size=cfg.purify_batch)
        parts, n = [batch], len(clean)
        for name, model in self.models.items():
            t = time.perf_counter()
            advs = attacks.attack_many(attacks.Attack.BPDA, model, images, labels,
                                       cfg.eps_attack, defend=defend, bpda_steps=cfg.bpda_steps)
            seconds = (time.perf_counter() - t) / len(cfg.eps_attack) / n
            for eps, adv in zip(cfg.eps_attack, advs):
                parts.append({"shard": batch["shard"][clean], "image_id": batch["image_id"][clean],
                              "classifier": np.full(n, name, dtype=object),
                              "attack": np.full(n, attacks.Attack.BPDA.value, dtype=object),
                              "eps_attack": np.full(n, eps), "label": labels, "image": adv,
                              "attack_seconds": np.full(n, seconds)})
        return {k: np.concatenate([p[k] for p in parts]) for k in batch}


# ---- the run -------------------------------------------------------------------------------

def shard_dir(out: Path, k: int) -> Path:
    return out / "results" / f"shard={k:05d}"


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


def _versions() -> dict:
    """Library versions and the driver's CPU: the same code on another CPU family runs other
    float kernels, which changes CW's and DeepFool's images (see README, Reproducibility)."""
    import eagerpy
    import foolbox
    import ray
    import torch

    import pdray

    return {"python": platform.python_version(), "pdray": pdray.__version__,
            "torch": torch.__version__, "ray": ray.__version__, "foolbox": foolbox.__version__,
            "eagerpy": eagerpy.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "cpu": f"{_cpu_model()} ({platform.machine()}, torch kernels "
                   f"{torch.backends.cpu.get_cpu_capability()})"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def prepare_out(cfg: EvalConfig, opts: RunOptions, shards: list[list[int]],
                data_source: dict | None = None) -> Path:
    """Create OUT and its run.json, or check that an existing OUT is this configuration
    and, when both record it, the same data (``data.Data.provenance``)."""
    out = Path(opts.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pdray-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PdrayError(f"Cannot write results to {out} ({e.strerror}). Choose a writable "
                         f"--out folder.") from None
    run = {"config": asdict(cfg), "shards": shards,
           "models": {n: zoo.entry(n)["sha256"] for n in [*cfg.classifiers, cfg.pixelcnn]}}
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
            raise PdrayError(f"{path} is unreadable; use a new --out folder.")
        _check_same_data(out, old.get("data"), data_source)
        # A run.json from before an option existed matches if this run leaves it at its default.
        defaults = {f.name: f.default for f in fields(EvalConfig)}
        old["config"] = {**{k: v for k, v in run["config"].items() if v == defaults.get(k)},
                         **old["config"]}
        if {k: old.get(k) for k in run} != run:
            raise PdrayError(f"{out} holds results of another configuration (see its run.json). "
                             f"Use a new --out folder, or the same options as that run.")
    from pdray.detect import train_log_likelihoods

    run.update(versions=_versions(), train_logp_n=len(train_log_likelihoods(cfg.pixelcnn)),
               command=_command(), **({"data": data_source} if data_source else {}))
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


def _check_models(cfg: EvalConfig) -> None:
    """Verify every checkpoint on the driver, before any actor starts."""
    for name in [*cfg.classifiers, cfg.pixelcnn]:
        e = zoo.entry(name)
        zoo.load_checkpoint(zoo.weights_dir() / e["file"], e["sha256"])
    from pdray.detect import train_log_likelihoods

    train_log_likelihoods(cfg.pixelcnn)


HISTORY = "history.jsonl"


def _command() -> list[str]:
    """This process's command line, with the program's folder left out."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def record_history(out: Path, entry: dict) -> None:
    """Append one finished invocation (command, shards, wall time) to OUT/history.jsonl,
    so a results folder tells how it was made and how long that took, across resumes."""
    path = out / HISTORY
    old = path.read_text() if path.exists() else ""
    atomic_write(path, lambda tmp: tmp.write_text(old + json.dumps(entry) + "\n"))


def read_history(out: Path) -> list[dict]:
    path = Path(out) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _log(message: str) -> None:
    print(message, flush=True)


def run(cfg: EvalConfig, opts: RunOptions, log=_log) -> Path:
    """Evaluate every requested shard and write its Parquet file; returns OUT."""
    started = time.time()
    cfg = resolve(cfg)
    if opts.num_attackers < 1 or min(opts.attacker_cpus, opts.purifier_cpus) < 0:
        raise PdrayError(f"--num-attackers must be at least 1 and --attacker-cpus / "
                         f"--purifier-cpus at least 0; got {opts.num_attackers}, "
                         f"{opts.attacker_cpus} and {opts.purifier_cpus}.")
    d = data.load(cfg.dataset, opts.data_dir)
    shards = [s.tolist() for s in data.shard_indices(cfg.n_images, cfg.shards,
                                                     n_available=len(d.test.labels))]
    if opts.shard is not None and not 0 <= opts.shard < len(shards):
        raise PdrayError(f"--shard must be in 0..{len(shards) - 1} for {len(shards)} shards; "
                         f"got {opts.shard}.")
    _check_models(cfg)
    out = prepare_out(cfg, opts, shards, d.provenance())
    todo = [opts.shard] if opts.shard is not None else list(range(len(shards)))
    if opts.resume:
        todo = [k for k in todo if k not in completed_shards(out)]
    if not todo:
        log(f"all {len(shards)} shards of {out} are complete")
        return out

    written, mem = [], PeakMemory()

    def record(**placement):
        record_history(out, {"command": _command(), "shards": todo, "completed": written,
                             "interrupted": len(written) < len(todo), **placement,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                      time.localtime(started)),
                             "wall_time_s": round(time.time() - started, 1),
                             "peak_pss_mb": mem.peak_mb})

    try:
        with mem:
            placement = _evaluate(cfg, opts, shards, todo, out, log, written)
    except BaseException:
        if written:  # its shards stay, so its wall time counts: totals add up across resumes
            record()
        raise
    record(**placement)
    return out


def _evaluate(cfg: EvalConfig, opts: RunOptions, shards: list[list[int]], todo: list[int],
              out: Path, log, written: list[int]) -> dict:
    """Run the shards in ``todo`` through the actor pools and write each as it completes,
    appending its number to ``written``; returns where the purifiers ran."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pdray.cluster import gpus_available, init_ray, require_gpus

    init_ray()
    have = gpus_available()
    gpus = have if opts.gpus == "auto" else int(opts.gpus)
    num_purifiers = opts.num_purifiers or max(1, gpus)
    if gpus:
        require_gpus(num_purifiers)
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 600  # a GPU the cluster never gets fails instead of hanging
    # PixelDefend's float32 argmax can depend on which images share a purifier batch, and
    # shards smaller than a batch share one in the order their attacks finish: keep shard
    # order, so the same command always batches the same rows together.
    ctx.execution_options.preserve_order = True
    per_image = rows_per_image(cfg)
    expected = {k: len(shards[k]) * per_image for k in todo}
    log(f"evaluating {sum(len(shards[k]) for k in todo)} images in {len(todo)} shard(s): "
        f"{per_image} rows per image; {opts.num_attackers} attacker(s), {num_purifiers} "
        f"purifier(s){' on GPUs' if gpus else ' on CPU'}")

    ds = (ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
          .map_batches(AttackStage, batch_size=1, num_cpus=opts.attacker_cpus,
                       fn_constructor_kwargs={"cfg": asdict(cfg), "shards": shards,
                                              "data_dir": opts.data_dir},
                       compute=ActorPoolStrategy(size=opts.num_attackers))
          .map_batches(PurifierStage, batch_size=cfg.purify_batch,
                       num_cpus=opts.purifier_cpus, num_gpus=1 if gpus else 0,
                       fn_constructor_kwargs={"cfg": asdict(cfg)},
                       compute=ActorPoolStrategy(size=num_purifiers)))
    pending, t0 = defaultdict(list), time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for k, rows in batch.groupby("shard"):
            pending[k].append(rows)
            got = pd.concat(pending[k]).drop_duplicates(KEY)
            if len(got) == expected[k]:
                write_shard(out, k, got)
                written.append(int(k))
                del pending[k]
                expected.pop(k)
                log(f"shard {k} done ({len(got)} rows, {time.time() - t0:.0f} s); "
                    f"{len(expected)} to go")
    if expected:
        raise PdrayError(f"shards {sorted(expected)} came back incomplete; rerun with --resume.")
    return {"purifiers": num_purifiers, "gpus": gpus}
