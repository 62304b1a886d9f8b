"""The distributed evaluation: test-image shards -> attack actors -> purifier actors ->
one Parquet file per shard (pdray.results). The one module that imports ray.data.

    shards (one block each)
      -> AttackStage    (actor pool; classifiers loaded once per actor)
      -> PurifierStage  (actor pool; one PixelCNN replica per actor, one GPU each if any)
      -> the driver groups rows by shard and writes each complete shard.

Clean and RAND images do not depend on the classifier, so they travel once with
classifier "*" and are purified once; the purifier classifies each defended image with
every classifier it concerns. The adaptive attacks (BPDA, BPDA-soft) need the purifier, so
the purifier stage makes those images from the clean ones it receives, one set per defense:
each defense's row holds the images made against that defense. The stages are plain
classes: a test or a benchmark can call them without Ray.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray.data import ActorPoolStrategy, DataContext

from pdray import attacks, cluster, data, detect, purify, pvalues, results, zoo
from pdray.classifiers import predict
from pdray.config import THROUGH_DEFENSE, Attack, Defense, EvalConfig, RunOptions
from pdray.errors import PdrayError
from pdray.monitor import PeakMemory
from pdray.pixelcnn import bits_per_dim, log_prob_from_bpd
from pdray.results import SHARED


def resolve(cfg: EvalConfig) -> EvalConfig:
    """``cfg.resolved()``, with its models checked against the weights and adaptive
    PixelDefend's threshold, unless given, the one chosen for its PixelCNN."""
    cfg = cfg.resolved()
    for name in cfg.classifiers:
        zoo.require(name, "classifier", cfg.dataset)
    zoo.require(cfg.pixelcnn, "pixelcnn", cfg.dataset)
    if Defense.ADAPTIVE.value in cfg.defenses and cfg.adaptive_threshold is None:
        cfg = replace(cfg, adaptive_threshold=zoo.adaptive_threshold(cfg.pixelcnn)["bpd"])
    return cfg


# ---- the stages ----------------------------------------------------------------------------

class AttackStage:
    """Loads the images (test or validation) and the classifiers once; maps a batch of shard
    ids to every requested (classifier, attack, eps_attack) image of those shards, plus the
    clean ones."""

    def __init__(self, cfg: dict, shards: list[list[int]], data_dir: str | None):
        self.cfg = EvalConfig(**cfg)
        self.shards = shards
        self.split = data.load(self.cfg.dataset, data_dir).split(self.cfg.images)
        self.models = {n: zoo.load(n, cluster.torch_device())[0] for n in self.cfg.classifiers}

    def __call__(self, batch: dict) -> dict:
        cfg, cols = self.cfg, defaultdict(list)
        options = dict(seed=cfg.seed, cw_steps=cfg.cw_steps, deepfool_steps=cfg.deepfool_steps,
                       cw_binary_search_steps=cfg.cw_binary_search_steps)
        for shard in batch["shard"]:
            ids = np.asarray(self.shards[int(shard)])
            images, labels = self.split.images[ids], self.split.labels[ids]
            parts = [(SHARED, "clean", 0, images, 0.0)]
            for attack in cfg.attacks:
                if attack in THROUGH_DEFENSE:
                    continue  # made by the purifier stage, which holds the defenses
                for name in [SHARED] if attack == Attack.RAND else cfg.classifiers:
                    t = time.perf_counter()
                    advs = attacks.attack_many(attack, self.models.get(name), images, labels,
                                               cfg.eps_attack, image_ids=ids, **options)
                    seconds = (time.perf_counter() - t) / len(cfg.eps_attack)
                    parts += [(name, attack, e, adv, seconds)
                              for e, adv in zip(cfg.eps_attack, advs)]
            for name, attack, eps, adv, seconds in parts:
                for i, image_id in enumerate(ids):
                    for k, v in (("shard", shard), ("image_id", image_id), ("classifier", name),
                                 ("attack", attack), ("eps_attack", eps),
                                 ("label", int(self.split.labels[image_id])), ("image", adv[i]),
                                 ("attack_seconds", seconds / len(ids))):
                        cols[k].append(v)
        out = {k: np.asarray(v) for k, v in cols.items() if k != "image"}
        out["image"] = np.stack(cols["image"])
        return out


class PurifierStage:
    """One PixelCNN replica: scores each input (bits/dim, p-value), applies every defense
    (``purify.defend``), and classifies the result with the unmodified classifiers."""

    def __init__(self, cfg: dict, out: str | None = None):
        self.cfg = EvalConfig(**cfg)
        self.out = out  # the run's folder: adaptive attacks keep their images there (results.kept)
        device = cluster.torch_device()
        self.pixelcnn = zoo.load(self.cfg.pixelcnn, device)[0]
        self.train_logp = detect.train_log_likelihoods(self.cfg.pixelcnn)
        self.models = {n: zoo.load(n, device)[0] for n in self.cfg.classifiers}
        self.entries = {n: zoo.entry(n) for n in self.cfg.classifiers}
        self.where = cluster.placement()

    def __call__(self, batch: dict) -> dict:
        cfg = self.cfg
        batch = {**batch, "target": np.full(len(batch["image"]), "", dtype=object)}
        if set(THROUGH_DEFENSE) & set(cfg.attacks):
            batch = self._with_adaptive(batch)
        images = batch["image"]
        t = time.perf_counter()
        bpd = bits_per_dim(self.pixelcnn, images)
        logp = log_prob_from_bpd(bpd, np.prod(images.shape[1:]))
        pvalue = pvalues.pvalues(logp, self.train_logp)
        defended = self._defend(images, bpd, batch["target"])
        preds = {(d, c): predict(m, x.images) for d, x in defended.items()
                 for c, m in self.models.items()}
        seconds = (time.perf_counter() - t) / len(images) + batch["attack_seconds"]
        return self._rows(batch, bpd, pvalue, defended, preds, seconds)

    def _defend(self, images: np.ndarray, bpd: np.ndarray, target: np.ndarray) -> dict:
        """``purify.defend`` on every row that needs it: defense -> Defended over all rows.
        Untargeted rows get every defense; images made against one defense (``target``)
        get only that one, the only row they go into."""
        cfg = self.cfg
        out = {d: purify.Defended(images.copy(), bpd.copy(), np.zeros(len(images), int))
               for d in cfg.defenses}
        for t, defenses in {"": cfg.defenses, **{d: [d] for d in cfg.defenses}}.items():
            rows = np.nonzero(target == t)[0]
            if not len(rows):
                continue
            for d, x in purify.defend(self.pixelcnn, images[rows], defenses, cfg.eps_defend,
                                      threshold=cfg.adaptive_threshold, bpd=bpd[rows],
                                      batch_size=cfg.purify_batch).items():
                out[d].images[rows], out[d].bpd[rows], out[d].eps_defend[rows] = x
        return out

    def _rows(self, batch, bpd, pvalue, defended, preds, seconds) -> dict:
        """The result rows (pdray.results.SCHEMA) of a scored and defended batch."""
        cfg, cols = self.cfg, defaultdict(list)
        for i in range(len(batch["image"])):
            owner, label = batch["classifier"][i], int(batch["label"][i])
            keep_image = int(batch["image_id"][i]) < cfg.save_images
            for c in (cfg.classifiers if owner == SHARED else [owner]):
                for d, x in defended.items():
                    if batch["target"][i] not in ("", d):
                        continue  # made against another defense: that defense's row
                    pred = int(preds[(d, c)][i])
                    for k, v in (("shard", int(batch["shard"][i])),
                                 ("image_id", int(batch["image_id"][i])),
                                 ("label", label), ("dataset", cfg.dataset),
                                 ("classifier", c), ("network", self.entries[c]["arch"]),
                                 ("recipe", self.entries[c]["recipe"]),
                                 ("attack", batch["attack"][i]),
                                 ("eps_attack", int(batch["eps_attack"][i])), ("defense", d),
                                 ("eps_defend", int(x.eps_defend[i])), ("pred", pred),
                                 ("correct", pred == label),
                                 ("bpd_input", float(bpd[i])), ("pvalue_input", float(pvalue[i])),
                                 ("bpd_defended", float(x.bpd[i])),
                                 ("seconds", float(seconds[i])), ("purifier", self.where),
                                 ("image_input",
                                  batch["image"][i].tobytes() if keep_image else None),
                                 ("image_defended",
                                  x.images[i].tobytes() if keep_image else None)):
                        cols[k].append(v)
        return {k: np.asarray(v, dtype=object if k.startswith("image_") else None)
                for k, v in cols.items()}

    def _with_adaptive(self, batch: dict) -> dict:
        """Append the adaptive attacks' images of this batch's clean images: per attack,
        classifier, defense and eps_attack, the images made against that defense (its
        ``target``), which become that defense's rows only. Each defense's row then holds
        an attack aimed at it, as the per-image worst case over a row's attacks needs. They
        run here, beside the PixelCNN (and its GPU), each (attack, defense) once for every
        classifier and eps_attack together (``attacks.through_defense``), and each kept
        in the run's folder until the run is complete (``results.kept``)."""
        cfg = self.cfg
        clean = np.nonzero(batch["attack"] == "clean")[0]
        if not len(clean):
            return batch
        images, labels, ids = batch["image"][clean], batch["label"][clean], batch["image_id"][clean]
        options = dict(bpda_steps=cfg.bpda_steps, bpda_restarts=cfg.bpda_restarts,
                       bpda_schedule=cfg.bpda_schedule, seed=cfg.seed, image_ids=ids)
        parts, n = [batch], len(clean)
        for attack in [a for a in cfg.attacks if a in THROUGH_DEFENSE]:
            for d in cfg.defenses:
                kept = results.kept(self.out, f"{attack}-{d}", ids,
                                    partial(self._aimed, attack, d, images, labels, options))
                made, seconds = kept["images"], float(kept["seconds"])
                for name, advs in zip(self.models, made):
                    for eps, adv in zip(cfg.eps_attack, advs):
                        parts.append({
                            "shard": batch["shard"][clean], "image_id": ids,
                            "classifier": np.full(n, name, dtype=object),
                            "attack": np.full(n, attack, dtype=object),
                            "eps_attack": np.full(n, eps), "label": labels, "image": adv,
                            "attack_seconds": np.full(n, seconds),
                            "target": np.full(n, d, dtype=object)})
        return {k: np.concatenate([p[k] for p in parts]) for k in batch}

    def _aimed(self, attack: str, defense: str, images: np.ndarray, labels: np.ndarray,
               options: dict) -> dict:
        """``attack`` aimed at ``defense``: its images [classifier][eps_attack] and the
        seconds it took per image."""
        t = time.perf_counter()
        made = attacks.through_defense(attack, list(self.models.values()), images, labels,
                                       self.cfg.eps_attack, **self._through(attack, defense),
                                       **options)
        per_image = (time.perf_counter() - t) / len(self.cfg.eps_attack) / len(images) / len(made)
        return {"images": np.asarray(made), "seconds": np.asarray(per_image)}

    def _through(self, attack: str, defense: str) -> dict:
        """The option that aims ``attack`` at ``defense``: BPDA takes the defense as it is,
        BPDA-soft its surrogate (pdray.purify)."""
        cfg = self.cfg
        if attack == Attack.BPDA:
            return {"defend": purify.defender(self.pixelcnn, defense, cfg.eps_defend,
                                              threshold=cfg.adaptive_threshold,
                                              batch_size=cfg.purify_batch)}
        return {"surrogate": purify.surrogate(self.pixelcnn, defense, cfg.eps_defend,
                                              threshold=cfg.adaptive_threshold, tau=cfg.bpda_tau)}


# ---- the run -------------------------------------------------------------------------------

def _log(message: str) -> None:
    print(message, flush=True)


def run(cfg: EvalConfig, opts: RunOptions, log=_log) -> Path:
    """Evaluate every requested shard and write its Parquet file; returns OUT."""
    started = time.time()
    cfg, opts = resolve(cfg), opts.resolved()
    d = data.load(cfg.dataset, opts.data_dir)
    n_available = len(d.split(cfg.images).labels)
    shards = [s.tolist() for s in data.shard_indices(cfg.n_images, cfg.shards,
                                                     n_available=n_available)]
    todo = opts.shard_ids(len(shards))
    names = [*cfg.classifiers, cfg.pixelcnn]
    for name in names:  # every checkpoint verified here, before any actor starts
        zoo.load_checkpoint(zoo.path_of(name), zoo.entry(name)["sha256"])
    train_logp = detect.train_log_likelihoods(cfg.pixelcnn)
    versions = cluster.versions()
    out = results.prepare_out(opts.out, cfg, shards, {n: zoo.entry(n)["sha256"] for n in names},
                              d.provenance(), {"versions": versions,
                                               "train_logp_n": len(train_logp)})
    began = cluster.kernels(results.read_run(out).get("versions", {}).get("cpu", ""))
    here = cluster.kernels(versions["cpu"])
    if began not in (None, here):
        log(f"note: {out} was begun with torch's {began} CPU kernels and this machine runs "
            f"{here}; CW's and DeepFool's images "
            f"can differ between the two, so the shards written now may differ from what the "
            f"earlier kernels would give (README, Reproducibility: ATEN_CPU_CAPABILITY and "
            f"ONEDNN_MAX_CPU_ISA choose the kernels). history.jsonl records each invocation's "
            f"CPU.")
    if opts.resume:
        todo = [k for k in todo if k not in results.completed_shards(out)]
    if not todo:
        log(f"all {len(shards)} shards of {out} are complete")
        return out

    written, mem, invocation = [], PeakMemory(), uuid.uuid4().hex[:12]

    def record(**placement):
        results.record_history(out, {
            "command": results.command(), "invocation": invocation, "shards": todo,
            "completed": written, "interrupted": len(written) < len(todo),
            "cpu": versions["cpu"], **placement,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_time_s": round(time.time() - started, 1), "peak_pss_mb": mem.peak_mb})

    def wrote(shard: int):
        # Recorded at every shard, not only at the end: a driver killed outright (a lost
        # node, a closed session) still leaves its shards' wall time in the history.
        written.append(shard)
        record()

    try:
        with mem:
            placement = _evaluate(cfg, opts, shards, todo, out, log, wrote)
    except BaseException:
        if written:  # its shards stay, so its wall time counts: totals add up across resumes
            record()
        raise
    record(**placement)
    return out


def _evaluate(cfg: EvalConfig, opts: RunOptions, shards: list[list[int]], todo: list[int],
              out: Path, log, wrote: Callable[[int], None]) -> dict:
    """Run the shards in ``todo`` through the actor pools and write each as it completes,
    then call ``wrote`` with its number; returns where the purifiers ran."""
    cluster.init_ray()
    gpus = cluster.gpus_available() if opts.gpus == "auto" else int(opts.gpus)
    if gpus:
        cluster.require_gpus(opts.num_purifiers or gpus)
    purifiers = _purifier_pool(opts, gpus)
    ctx = DataContext.get_current()
    # Both pools start at once (Ray Data's default): the purifiers load their PixelCNN while
    # the attackers load their classifiers, rather than after them. require_gpus above has
    # already refused GPUs the cluster does not have.
    ctx.wait_for_min_actors_s = -1
    # BPDA is made inside the purifier stage, so one call takes as long as its batch's
    # attacks (hours on a CPU with restarts): Ray Data's no-progress guard (30 min) must not
    # fail the run. Ray retries a dead actor; the variable still sets a bound if asked for.
    if "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S" not in os.environ:
        ctx.execution_no_progress_timeout_s = -1
    if gpus:  # a GPU batch is purify_batch rows and may span shards: keep shard order, so
        ctx.execution_options.preserve_order = True  # the same command batches alike
    per_image = cfg.rows_per_image()
    expected = {k: len(shards[k]) * per_image for k in todo}
    log(f"evaluating {sum(len(shards[k]) for k in todo)} images in {len(todo)} shard(s): "
        f"{per_image} rows per image; {opts.num_attackers} attacker(s), {_size(purifiers)} "
        f"purifier(s){' on GPUs' if gpus else ' on CPU'}")

    ds = (ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
          .map_batches(AttackStage, batch_size=1, num_cpus=opts.attacker_cpus,
                       fn_constructor_kwargs={"cfg": asdict(cfg), "shards": shards,
                                              "data_dir": opts.data_dir},
                       compute=ActorPoolStrategy(size=opts.num_attackers))
          # On CPUs one call per shard (the attack stage's block for it): PixelDefend's
          # float32 argmax can depend on which images share a batch, so a shard's rows must
          # not depend on which shards run beside it (--shard, --resume), and an adaptive
          # attack's call, hours long on a CPU, stays within one shard. Ray Data refuses
          # batch_size=None with GPUs; there a batch is purify_batch rows, as it forms.
          .map_batches(PurifierStage, batch_size=cfg.purify_batch if gpus else None,
                       num_cpus=opts.purifier_cpus, num_gpus=1 if gpus else 0,
                       fn_constructor_kwargs={"cfg": asdict(cfg), "out": str(out.resolve())},
                       compute=purifiers))
    pending, t0 = defaultdict(list), time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for k, rows in batch.groupby("shard"):
            pending[k].append(rows)
            got = pd.concat(pending[k]).drop_duplicates(results.KEY)
            if len(got) == expected[k]:
                results.write_shard(out, k, got)
                wrote(int(k))
                del pending[k]
                expected.pop(k)
                log(f"shard {k} done ({len(got)} rows, {time.time() - t0:.0f} s); "
                    f"{len(expected)} to go")
    if expected:
        raise PdrayError(f"shards {sorted(expected)} came back incomplete; rerun with --resume.")
    results.drop_partial(out, len(shards))
    return {"purifiers": _size(purifiers), "gpus": gpus}


def _purifier_pool(opts: RunOptions, gpus: int) -> ActorPoolStrategy:
    """Fixed when asked for (--num-purifiers) or on GPUs (one each). On CPUs a pool that
    starts with one purifier and grows as CPUs free up: once the attacks are done, their
    CPUs go to more purifiers. Two one-thread purifiers outrun one two-thread one, whose
    per-pixel steps are too small to split well between threads."""
    if opts.num_purifiers or gpus:
        return ActorPoolStrategy(size=opts.num_purifiers or gpus)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    most = cpus if opts.purifier_cpus <= 0 else int(cpus // opts.purifier_cpus)
    return ActorPoolStrategy(min_size=1, max_size=max(1, most))


def _size(pool: ActorPoolStrategy) -> str:
    return (str(pool.min_size) if pool.min_size == pool.max_size
            else f"{pool.min_size} to {pool.max_size}")
