"""Training on Ray Train: data-parallel TorchTrainer workers, CPU here, GPUs on a cluster.

A run lives in ``runs_dir/<name>/`` (Ray Train's storage). Starting the same run again
resumes from its last checkpoint: Ray hands it back through ``ray.train.get_checkpoint``.
``resume_from`` names a training-state file to start from instead (one committed from an
earlier machine, say). Each epoch reports the test metric and a checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pdray import ablation, attacks, classifiers, data, pixelcnn, zoo
from pdray.errors import PdrayError
from pdray.evaluate import bits_per_dim, predict

RECIPES = ("normal", "adv-fgsm", "adv-bim", "label-smoothing")


@dataclass
class ClassifierConfig:
    dataset: str = "fmnist"
    arch: str = "resnet"
    recipe: str = "normal"
    epochs: int = 10
    batch_size: int = 128          # global; split across workers
    lr: float = 0.1                # SGD + Nesterov, linear warm-up then cosine decay
    weight_decay: float = 5e-4
    smoothing: float = 0.1         # label-smoothing eps (Warde-Farley & Goodfellow)
    adv_fraction: float = 0.5      # Kurakin et al.: replace this share of each batch
    seed: int = 0
    max_steps: int = 0             # > 0: stop after this many steps (tests, smoke runs)
    eval_images: int = 10000       # test images scored after each epoch
    data_dir: str | None = None
    resume_from: str | None = None

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.arch}-{self.recipe}"

    def validate(self) -> "ClassifierConfig":
        data.parse_dataset(self.dataset)
        classifiers.parse_arch(self.arch)
        if self.recipe not in RECIPES:
            raise PdrayError(f"Unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise PdrayError("epochs and batch_size must be at least 1.")
        return self


@dataclass
class Scaling:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    runs_dir: str = "runs"
    max_failures: int = 3           # a lost worker (a preempted node) restarts from the last checkpoint


# ---- shared by every training loop ---------------------------------------------------------

def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def start_state(resume_from: str | None, driver_cwd: str = ".") -> dict | None:
    """The training state to continue from: Ray's last checkpoint of this run, else the
    file named by resume_from (relative to the driver's folder: Ray Train workers run
    elsewhere), else None (a fresh start)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if resume_from:
        return torch.load(Path(driver_cwd) / resume_from, map_location="cpu", weights_only=True)
    return None


def load_data(dataset: str, data_dir: str | None, driver_cwd: str):
    """The dataset, with a relative data_dir taken from the driver's folder, as resume_from."""
    return data.load(dataset, Path(driver_cwd) / data_dir if data_dir else None)


def report(metrics: dict, state: dict) -> None:
    """Report an epoch's metrics; rank 0 attaches the checkpoint."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def worker_batches(n: int, batch_size: int, seed: int, epoch: int):
    """This worker's share of a seeded per-epoch permutation, in local batches."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    local = max(1, batch_size // world)
    steps = n // batch_size
    for s in range(steps):
        yield s, perm[s * batch_size:(s + 1) * batch_size][rank * local:(rank + 1) * local]


def unwrap(model):
    """The model inside DistributedDataParallel, if prepare_model wrapped it."""
    return model.module if hasattr(model, "module") else model


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random shifts (reflect padding + crop) and horizontal flips, per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if flip:
        mask = torch.rand(b, generator=gen) < 0.5
        out[mask] = out[mask].flip(3)
    return out


def fit(loop, config: dict, name: str, scaling: Scaling):
    """Run ``loop`` on Ray Train workers and return the final ray.train.Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pdray.cluster import init_ray, require_gpus

    resume_from = config.get("resume_from")
    if resume_from and not Path(resume_from).is_file():
        raise PdrayError(f"--resume-from {resume_from}: no such training-state file.")
    init_ray()
    if scaling.use_gpu:
        require_gpus(scaling.num_workers)
    runs = scaling.runs_dir  # a local folder, or a URI such as s3://... on a cluster
    if "://" not in runs:
        Path(runs).mkdir(parents=True, exist_ok=True)
        runs = str(Path(runs).resolve())
    trainer = TorchTrainer(
        loop, train_loop_config={**config, "driver_cwd": os.getcwd()},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker,
                                  **({"GPU": 1} if scaling.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=runs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=scaling.max_failures)))
    return trainer.fit()


def finish(result, name: str, ship: bool) -> dict:
    """Turn the run's last checkpoint into a weights file (and a manifest entry if shipped)."""
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    ckpt = {k: state[k] for k in ("kind", "dataset", "arch", "recipe", "config", "metrics")}
    if "train_config" in state:
        ckpt["train_config"] = state["train_config"]
    ckpt["state_dict"] = state["model"]
    wall = state["wall_time_s"]
    if ship:
        return zoo.export(ckpt, name, epochs=state["epoch"], wall_time_s=wall)
    return {"name": name, "epochs": state["epoch"], "wall_time_s": wall, "metrics": state["metrics"]}


# ---- classifiers ---------------------------------------------------------------------------

def classifier_loop(config: dict) -> None:
    """One Ray Train worker's training of a classifier with one of the Table 1 recipes."""
    import ray.train.torch

    driver_cwd = config.pop("driver_cwd", ".")
    cfg = ClassifierConfig(**config)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # as in pixelcnn_loop
    d = load_data(cfg.dataset, cfg.data_dir, driver_cwd)
    train_x, train_y = d.fit.images, d.fit.labels
    mean = (train_x.reshape(-1, train_x.shape[-1]).mean(0)).tolist()
    std = (train_x.reshape(-1, train_x.shape[-1]).std(0)).tolist()
    model = classifiers.build(cfg.arch, data.SHAPE[d.dataset], mean, std)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                          weight_decay=cfg.weight_decay)
    state = start_state(cfg.resume_from, driver_cwd)
    epoch, step, wall = 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch, step, wall = state["epoch"], state["step"], state["wall_time_s"]
    model = ray.train.torch.prepare_model(model)
    core = unwrap(model)
    steps_per_epoch = len(train_x) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    pad, flip = (2, True) if d.dataset is data.Dataset.FMNIST else (4, True)
    labels_all = torch.from_numpy(train_y.copy())
    while epoch < cfg.epochs:
        t0 = time.time()
        model.train()
        for s, idx in worker_batches(len(train_x), cfg.batch_size, cfg.seed, epoch):
            x = torch.from_numpy(train_x[idx].transpose(0, 3, 1, 2).copy()).float()
            x = augment(x, pad, flip, gen).to(device)
            y = labels_all[idx].to(device)
            if cfg.recipe in ("adv-fgsm", "adv-bim"):
                k = int(len(x) * cfg.adv_fraction)
                eps = attacks.sample_eps(k, gen)
                x = x.clone()
                x[:k] = attacks.adversarial_batch(core, x[:k], eps, cfg.recipe == "adv-bim")
            logits = model(x)
            if cfg.recipe == "label-smoothing":
                n = logits.shape[1]
                target = torch.full_like(logits, cfg.smoothing / (n - 1))
                target.scatter_(1, y[:, None], 1 - cfg.smoothing)
                loss = torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
            else:
                loss = F.cross_entropy(logits, y)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, warmup=steps_per_epoch // 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {s + 1}/{steps_per_epoch} loss {loss.item():.3f} "
                      f"{time.time() - t0:.0f} s", flush=True)
            if cfg.max_steps and s + 1 >= cfg.max_steps:
                break
        epoch += 1
        wall += time.time() - t0
        n_eval = min(cfg.eval_images, len(d.test.labels))
        core.eval()
        acc = float((predict(core, d.test.images[:n_eval]) == d.test.labels[:n_eval]).mean())
        metrics = {"test_accuracy": acc, "eval_images": n_eval, "epoch": epoch,
                   "loss": loss.item(), "wall_time_s": wall}
        report(metrics, {"kind": "classifier", "dataset": cfg.dataset, "arch": cfg.arch,
                         "recipe": cfg.recipe, "config": asdict(cfg), "metrics": metrics,
                         "model": core.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": epoch, "step": step, "wall_time_s": wall})
        if cfg.max_steps:
            break


def train_classifier(cfg: ClassifierConfig, scaling: Scaling, ship: bool = False) -> dict:
    cfg.validate()
    data.locate(cfg.dataset, cfg.data_dir)  # here, not as a traceback from every worker
    result = fit(classifier_loop, asdict(cfg), cfg.name, scaling)
    return finish(result, cfg.name, ship)


# ---- PixelCNN ------------------------------------------------------------------------------

@dataclass
class PixelCNNConfig:
    dataset: str = "fmnist"
    filters: int = 64
    blocks: int = 6
    dropout: float = 0.0           # CPU-scale runs underfit; PixelCNN++ used 0.5 over 1000s of epochs
    logistic: bool = True          # the head's logistic logit term (pdray.pixelcnn): learns far faster
    head: str = "free"             # "free" logits or a "mixture" of logistics (pdray.pixelcnn)
    mixtures: int = 10
    compile: bool = True           # torch.compile the training forward: ~1.5x faster on CPU
    steps: int = 6000              # total optimiser steps; raise it and rerun to train on
    batch_size: int = 64           # global; split across workers
    lr: float = 1e-3               # Adam, decayed by lr_decay per step (PixelCNN++)
    lr_decay: float = 0.9998
    grad_clip: float = 10.0        # max gradient norm (typical: ~2 bits/dim units); 0: off.
                                   # Two unclipped FMNIST runs had loss spikes (steps ~1040, ~2560)
    ema: float = 0.999             # Polyak averaging of the weights that are evaluated and shipped,
                                   # warmed up as min(ema, (1 + n) / (10 + n)) after n updates
    report_every: int = 300        # steps between checkpoints and test bits/dim
    eval_images: int = 1000        # test images scored at each report
    seed: int = 0
    jpeg_quality: int = 0          # > 0: train and score on JPEG copies (pdray.ablation's control)
    noise: float = 0.0             # > 0: Gaussian noise of this std (levels) on each training
                                   # batch, rounded and clipped; test bits/dim stay on clean images
    data_dir: str | None = None
    resume_from: str | None = None

    @property
    def name(self) -> str:
        return (f"{self.dataset}-pixelcnn" + (f"-{self.head}" if self.head != "free" else "")
                + (f"-jpeg{self.jpeg_quality}" if self.jpeg_quality else "")
                + (f"-noise{self.noise:g}" if self.noise else ""))

    def model_config(self):
        return pixelcnn.Config(channels=data.SHAPE[data.parse_dataset(self.dataset)][2],
                               filters=self.filters, blocks=self.blocks, dropout=self.dropout,
                               logistic=self.logistic, head=self.head, mixtures=self.mixtures)


class BitsPerDim(torch.nn.Module):
    """The PixelCNN's training objective as a module: DDP syncs gradients through a
    module's forward, and the head's ``log_prob`` is far cheaper than its 256-way logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):  # (B, C, H, W) 0..255 -> (B,) bits per dimension
        return self.model.bpd(x)


def pixelcnn_loop(config: dict) -> None:
    """One Ray Train worker's maximum-likelihood training of the PixelCNN."""
    import ray.train.torch
    from torch.optim.swa_utils import AveragedModel

    driver_cwd = config.pop("driver_cwd", ".")
    cfg = PixelCNNConfig(**config)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    # Subnormal floats (after a loss spike, say) make CPU kernels several times slower.
    torch.set_flush_denormal(True)
    d = load_data(cfg.dataset, cfg.data_dir, driver_cwd)
    model = pixelcnn.PixelCNN(cfg.model_config()).to(device)
    def ema_avg(averaged, current, n):
        decay = min(cfg.ema, (1.0 + float(n)) / (10.0 + float(n)))  # early weights fade fast
        return decay * averaged + (1 - decay) * current

    ema = AveragedModel(model, avg_fn=ema_avg, use_buffers=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = start_state(cfg.resume_from, driver_cwd)
    step, wall = 0, 0.0
    if state is not None:
        model.load_state_dict(state["train_model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, wall = state["step"], state["wall_time_s"]
    objective = ray.train.torch.prepare_model(BitsPerDim(model))
    core = unwrap(objective).model
    forward = torch.compile(objective) if cfg.compile else objective
    train_x, test_x = d.fit.images, d.test.images
    if cfg.jpeg_quality:
        train_x, test_x = ablation.jpeg(train_x, cfg.jpeg_quality), ablation.jpeg(test_x, cfg.jpeg_quality)
    per_epoch = len(train_x) // cfg.batch_size
    noise = torch.Generator().manual_seed(cfg.seed)

    def checkpoint(train_bpd: float | None) -> None:
        n_eval = min(cfg.eval_images, len(test_x))
        bpd = float(bits_per_dim(ema.module.eval(), test_x[:n_eval]).mean())
        bpd_raw = float(bits_per_dim(core.eval(), test_x[:n_eval]).mean())
        metrics = {"test_bpd": bpd, "test_bpd_raw": bpd_raw, "eval_images": n_eval,
                   "step": step, "epoch": step / per_epoch, "train_bpd": train_bpd,
                   "wall_time_s": wall}
        print(f"step {step}: test bpd {bpd:.4f} (averaged weights), {bpd_raw:.4f} "
              f"(last weights) on {n_eval} images", flush=True)
        report(metrics, {"kind": "pixelcnn", "dataset": cfg.dataset, "arch": "pixelcnn",
                         "recipe": None, "config": asdict(cfg.model_config()),
                         "train_config": asdict(cfg), "metrics": metrics,
                         "model": ema.module.state_dict(), "train_model": core.state_dict(),
                         "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": round(step / per_epoch, 3), "step": step,
                         "wall_time_s": wall})

    if step >= cfg.steps:  # a saved state at or past --steps: report it as is, to ship it
        checkpoint(state["metrics"].get("train_bpd"))
        return
    t0 = time.time()
    while step < cfg.steps:
        epoch, s = divmod(step, per_epoch)
        batches = worker_batches(len(train_x), cfg.batch_size, cfg.seed, epoch)
        for s_i, idx in batches:
            if s_i < s:
                continue  # resume mid-epoch at the same batch
            model.train()
            x = torch.from_numpy(train_x[idx].transpose(0, 3, 1, 2).copy())
            if cfg.noise:
                x = (x + torch.randn(x.shape, generator=noise) * cfg.noise).round().clamp(0, 255).to(torch.uint8)
            x = x.to(device)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * cfg.lr_decay ** step
            loss = forward(x).mean()  # through the wrapped module, so DDP syncs
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(),
                                                       cfg.grad_clip or float("inf"))
            opt.step()
            ema.update_parameters(core)
            step += 1
            if step % 20 == 0:
                print(f"step {step}/{cfg.steps} train bpd {loss.item():.3f} grad norm "
                      f"{float(grad_norm):.2f} {(time.time() - t0) / 20:.2f} s/step", flush=True)
                wall += time.time() - t0
                t0 = time.time()
            if step % cfg.report_every == 0 or step == cfg.steps:
                wall += time.time() - t0
                checkpoint(loss.item())
                t0 = time.time()
            if step >= cfg.steps:
                break


def check_resumable(cfg: PixelCNNConfig, scaling: Scaling) -> None:
    """A resumed run must build the model it was trained as: say so here, in one
    paragraph, rather than as a worker's state-dict traceback."""
    ray_states = sorted(Path(scaling.runs_dir, cfg.name).glob("checkpoint_*/state.pt"))
    source = ray_states[-1] if ray_states else (
        Path(cfg.resume_from) if cfg.resume_from and Path(cfg.resume_from).is_file() else None)
    if source is None:
        return
    try:
        trained = torch.load(source, map_location="cpu", weights_only=True)["config"]
        trained = asdict(pixelcnn.Config(**trained))
    except Exception as e:
        raise PdrayError(f"Cannot read the training state {source} to resume from ({e}).") from None
    wanted = asdict(cfg.model_config())
    if trained != wanted:
        raise PdrayError(
            f"{source} holds a training state of a different model ({trained}) than the options "
            f"ask for ({wanted}). Rerun with matching options, or move "
            f"{source.parent.parent if source in ray_states else source} aside to start afresh.")


def train_pixelcnn(cfg: PixelCNNConfig, scaling: Scaling, ship: bool = False) -> dict:
    if cfg.head not in pixelcnn.HEADS:
        raise PdrayError(f"Unknown PixelCNN head {cfg.head!r}: choose one of {', '.join(pixelcnn.HEADS)}.")
    data.locate(cfg.dataset, cfg.data_dir)  # here, not as a traceback from every worker
    check_resumable(cfg, scaling)
    result = fit(pixelcnn_loop, asdict(cfg), cfg.name, scaling)
    out = finish(result, cfg.name, ship)
    if ship:  # p-values rank against these; computing them is a one-off per checkpoint
        from pdray import detect

        detect.store_train_log_likelihoods(cfg.name, cfg.data_dir)
    return out
