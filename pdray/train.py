"""Training on Ray Train: data-parallel TorchTrainer workers, CPU here, GPUs on a cluster.

The steps themselves (the recipes, the PixelCNN's likelihood) are pdray.recipes; this is
the shell around them: one worker loop per model, checkpoints, resume, export.

A run lives in ``runs_dir/<name>/`` (Ray Train's storage). Starting the same run again
resumes from its last checkpoint: Ray hands it back through ``ray.train.get_checkpoint``.
``resume_from`` names a training-state file to start from instead (one committed from an
earlier machine, say). Each epoch reports the test metric and a checkpoint; a classifier
also saves one every ``checkpoint_every`` steps, to resume mid-epoch exactly.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pdray import ablation, classifiers, data, detect, pixelcnn, recipes, zoo
from pdray.classifiers import predict
from pdray.cluster import init_ray, require_gpus
from pdray.config import ClassifierConfig, PixelCNNConfig, Scaling
from pdray.errors import PdrayError
from pdray.pixelcnn import bits_per_dim
from pdray.pixels import to_nchw


# ---- shared by every training loop ---------------------------------------------------------

def start_state(resume_from: str | None, driver_cwd: str = ".") -> dict | None:
    """The training state to continue from: Ray's last checkpoint of this run, else the
    file named by resume_from (relative to the driver's folder: Ray Train workers run
    elsewhere), else None (a fresh start)."""
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
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def worker_batches(n: int, batch_size: int, seed: int, epoch: int):
    """This worker's share of the epoch's batches (``recipes.batches``)."""
    ctx = ray.train.get_context()
    return recipes.batches(n, batch_size, seed, epoch, ctx.get_world_rank(), ctx.get_world_size())


def unwrap(model):
    """The model inside DistributedDataParallel, if prepare_model wrapped it."""
    return model.module if hasattr(model, "module") else model


def fit(loop, config: dict, name: str, scaling: Scaling):
    """Run ``loop`` on Ray Train workers and return the final ray.train.Result."""
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


def finish(result, cfg: ClassifierConfig | PixelCNNConfig, ship: bool) -> dict:
    """Turn the run's last checkpoint into a weights file (and a manifest entry if shipped,
    with the data its metric was measured on)."""
    name = cfg.name
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
        trained_on = data.load(cfg.dataset, cfg.data_dir).provenance()
        if getattr(cfg, "jpeg_quality", 0):
            trained_on["jpeg_quality"] = cfg.jpeg_quality
        return zoo.export(ckpt, name, epochs=state["epoch"], wall_time_s=wall,
                          trained_on=trained_on)
    return {"name": name, "epochs": state["epoch"], "wall_time_s": wall, "metrics": state["metrics"]}


# ---- classifiers ---------------------------------------------------------------------------

def classifier_loop(config: dict) -> None:
    """One Ray Train worker's training of a classifier with one of the Table 1 recipes."""
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
    opt = recipes.classifier_optimizer(model, cfg)
    state = start_state(cfg.resume_from, driver_cwd)
    epoch, done, step, wall, metrics = 0, 0, 0, 0.0, {}
    gen = torch.Generator()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch, step, wall = state["epoch"], state["step"], state["wall_time_s"]
        done, metrics = state.get("batches_done", 0), state["metrics"]
    if state is not None and "generator" in state:  # mid-epoch states carry their RNGs
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    else:
        gen.manual_seed(cfg.seed * 1000 + epoch)
    model = ray.train.torch.prepare_model(model)
    core = unwrap(model)
    steps_per_epoch = len(train_x) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    pad, flip = (2, True) if d.dataset is data.Dataset.FMNIST else (4, True)
    labels_all = torch.from_numpy(train_y.copy())

    def checkpoint(report_metrics: dict) -> None:
        report(report_metrics, {"kind": "classifier", "dataset": cfg.dataset, "arch": cfg.arch,
                                "recipe": cfg.recipe, "config": asdict(cfg), "metrics": metrics,
                                "model": core.state_dict(), "optimizer": opt.state_dict(),
                                "epoch": epoch, "batches_done": done, "step": step,
                                "wall_time_s": wall, "generator": gen.get_state(),
                                "torch_rng": torch.get_rng_state()})

    if epoch >= cfg.epochs:  # a saved state at or past --epochs: report it as is, to ship it
        checkpoint(metrics)
        return
    while epoch < cfg.epochs:
        t0 = started = time.time()
        model.train()
        for s, idx in worker_batches(len(train_x), cfg.batch_size, cfg.seed, epoch):
            if s < done:
                continue  # resume mid-epoch at the same batch
            x = recipes.augment(to_nchw(train_x[idx]).float(), pad, flip, gen).to(device)
            loss = recipes.classifier_loss(model, x, labels_all[idx].to(device), cfg, gen, core)
            recipes.sgd_step(opt, loss, recipes.lr_at(step, total, cfg.lr,
                                                      warmup=steps_per_epoch // 2))
            step, done = step + 1, s + 1
            if step % 50 == 0:
                print(f"epoch {epoch + 1} step {s + 1}/{steps_per_epoch} loss {loss.item():.3f} "
                      f"{time.time() - started:.0f} s", flush=True)
            if cfg.max_steps and s + 1 >= cfg.max_steps:
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and done < steps_per_epoch:
                wall, t0 = wall + time.time() - t0, time.time()
                checkpoint({"epoch": epoch + done / steps_per_epoch, "step": step,
                            "loss": loss.item(), "wall_time_s": wall})
        epoch, done = epoch + 1, 0
        wall += time.time() - t0
        n_eval = min(cfg.eval_images, len(d.test.labels))
        core.eval()
        acc = float((predict(core, d.test.images[:n_eval]) == d.test.labels[:n_eval]).mean())
        metrics = {"test_accuracy": acc, "eval_images": n_eval, "epoch": epoch,
                   "loss": loss.item(), "wall_time_s": wall}
        checkpoint(metrics)
        if cfg.max_steps:
            break


def train_classifier(cfg: ClassifierConfig, scaling: Scaling, ship: bool = False) -> dict:
    cfg = cfg.resolved()
    data.locate(cfg.dataset, cfg.data_dir)  # here, not as a traceback from every worker
    result = fit(classifier_loop, asdict(cfg), cfg.name, scaling)
    return finish(result, cfg, ship)


# ---- PixelCNN ------------------------------------------------------------------------------

def model_config(cfg: PixelCNNConfig) -> pixelcnn.Config:
    """The PixelCNN a training config builds."""
    return pixelcnn.Config(channels=data.SHAPE[data.Dataset(cfg.dataset)][2],
                           filters=cfg.filters, blocks=cfg.blocks, dropout=cfg.dropout,
                           logistic=cfg.logistic, head=cfg.head, mixtures=cfg.mixtures,
                           dilations=cfg.dilations)


def pixelcnn_loop(config: dict) -> None:
    """One Ray Train worker's maximum-likelihood training of the PixelCNN."""
    driver_cwd = config.pop("driver_cwd", ".")
    cfg = PixelCNNConfig(**config)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    # Subnormal floats (after a loss spike, say) make CPU kernels several times slower.
    torch.set_flush_denormal(True)
    d = load_data(cfg.dataset, cfg.data_dir, driver_cwd)
    model = pixelcnn.PixelCNN(model_config(cfg)).to(device)
    ema = recipes.averaged(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = start_state(cfg.resume_from, driver_cwd)
    step, wall = 0, 0.0
    if state is not None:
        model.load_state_dict(state["train_model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, wall = state["step"], state["wall_time_s"]
    objective = ray.train.torch.prepare_model(recipes.BitsPerDim(model))
    core = unwrap(objective).model
    forward = torch.compile(objective) if cfg.compile else objective
    train_x, test_x = d.fit.images, d.test.images
    if cfg.jpeg_quality:
        train_x, test_x = ablation.jpeg(train_x, cfg.jpeg_quality), ablation.jpeg(test_x, cfg.jpeg_quality)
    per_epoch = len(train_x) // cfg.batch_size
    noise = torch.Generator().manual_seed(cfg.seed)

    def batch(idx) -> tuple[torch.Tensor, torch.Tensor | None]:  # (targets, context)
        x = to_nchw(train_x[idx], device)
        x = recipes.noisy(x, cfg.noise, noise) if cfg.noise else x
        return x, recipes.noisy(x, cfg.context_noise, noise) if cfg.context_noise else None

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
                         "recipe": None, "config": asdict(model_config(cfg)),
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
        for s_i, idx in worker_batches(len(train_x), cfg.batch_size, cfg.seed, epoch):
            if s_i < s:
                continue  # resume mid-epoch at the same batch
            x, context = batch(idx)
            loss, grad_norm = recipes.pixelcnn_step(forward, core, ema, opt, x, step, cfg,
                                                    context)
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
    wanted = asdict(model_config(cfg))
    if trained != wanted:
        raise PdrayError(
            f"{source} holds a training state of a different model ({trained}) than the options "
            f"ask for ({wanted}). Rerun with matching options, or move "
            f"{source.parent.parent if source in ray_states else source} aside to start afresh.")


def train_pixelcnn(cfg: PixelCNNConfig, scaling: Scaling, ship: bool = False) -> dict:
    cfg = cfg.resolved()
    data.locate(cfg.dataset, cfg.data_dir)  # here, not as a traceback from every worker
    check_resumable(cfg, scaling)
    result = fit(pixelcnn_loop, asdict(cfg), cfg.name, scaling)
    out = finish(result, cfg, ship)
    if ship:  # p-values rank against these; computing them is a one-off per checkpoint
        detect.store_train_log_likelihoods(cfg.name, cfg.data_dir)
    return out
