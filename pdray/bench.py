"""Benchmarks: ratios measured in one process on the same model, images and batch.

``purify``: the reference (Algorithm 1, one full pass per sub-pixel) against the fast
incremental purifier. A full reference run costs 3072 full passes per CIFAR-10 batch, so
it is timed on its first ``reference_steps`` sub-pixels and extrapolated: every step is
the same full forward pass, so its cost per step is constant. Agreement comes from full
runs of both on ``agreement_images`` images.

``deepfool``: foolbox's L2 DeepFool loop against pdray's (``attacks.l2_deepfool``) on the
same classifier and images, in process CPU time, and how far their images differ.

``pipeline``: the Ray pipeline against the bare stage loop on the same workload.

``adaptive``: an adaptive attack on every shipped classifier of a dataset at every
eps_attack in one batch (``attacks.through_defense``, as the pipeline runs it) against one
call per classifier and eps_attack, in process CPU time, and whether their images agree.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

from pdray import data, purify, zoo
from pdray.cluster import init_ray, torch_device
from pdray.config import (GPU_PURIFY_BATCH, THROUGH_DEFENSE, Attack, Defense, EvalConfig,
                          RunOptions, defaults, eps_attack_for, eps_defend_for, parse_attack,
                          parse_dataset, pixelcnn_name)
from pdray.errors import PdrayError, parse_choice
from pdray.monitor import PeakMemory, peak_rss_mb
from pdray.pixelcnn import bits_per_dim
from pdray.pixels import to_nchw


def _timed(fn, clock=time.perf_counter):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = clock()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, clock() - t


class _ArtProbabilities(torch.nn.Module):
    """The PixelCNN as ART's PixelDefend reads it. ART takes the output of the wrapped
    module's last child (``get_activations(layer=-1)``), so the probabilities must come out
    of a child, not of ``forward``, flattened in its input's (H, W, C) order. Inputs are
    (v + 0.5) / 255: ART truncates x * 255 to uint8, and floor recovers v here alike."""

    class Softmax(torch.nn.Module):
        def forward(self, logits):  # (N, C, H, W, 256) -> (N, H*W*C*256)
            return torch.softmax(logits, -1).permute(0, 2, 3, 1, 4).reshape(len(logits), -1)

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.softmax = self.Softmax()

    def forward(self, x):  # (N, H, W, C) in [0, 1]
        return self.softmax(self.model(torch.floor(x * 255).long().permute(0, 3, 1, 2)))


def art_pixeldefend(model, images: np.ndarray, eps_defend: int, batch_size: int) -> np.ndarray:
    """IBM ART 1.20.1's PixelDefend around the same PixelCNN, on the model's device, for
    comparison. It is not Algorithm 1 but ``purify.one_pass``. Under numpy 2 it crashes
    (OverflowError) on any pixel within eps of 0 or 255, because ``x - eps`` is computed in
    uint8; giving it eps as a numpy int64 after construction (its check wants a Python int)
    makes that arithmetic int64. Any failure of ART's is a PdrayError: it is a comparison,
    not pdray's purifier."""
    try:
        from art.defences.preprocessor import PixelDefend
        from art.estimators.classification import PyTorchClassifier
    except Exception as e:  # missing, or broken by its own dependencies
        raise PdrayError(f"--art needs IBM ART 1.20.1, which does not import here "
                         f"({type(e).__name__}: {e}): pip install "
                         f"adversarial-robustness-toolbox==1.20.1, or rerun without --art."
                         ) from None
    device = next(model.parameters()).device
    try:
        estimator = PyTorchClassifier(_ArtProbabilities(model), loss=torch.nn.CrossEntropyLoss(),
                                      input_shape=images.shape[1:], nb_classes=256,
                                      clip_values=(0.0, 1.0),
                                      device_type="cpu" if device.type == "cpu" else "gpu")
        defense = PixelDefend(eps=eps_defend, pixel_cnn=estimator, batch_size=batch_size)
        defense.eps = np.int64(eps_defend)  # the uint8 wrap-around fix described above
        out, _ = defense((images.astype(np.float32) + 0.5) / 255.0)
    except Exception as e:  # a third-party comparison: its failure is a message, not a traceback
        raise PdrayError(f"IBM ART's PixelDefend failed ({type(e).__name__}: {e}); the fast and "
                         f"reference purifiers are unaffected. Rerun without --art.") from None
    return np.rint(out * 255.0).astype(np.uint8)


def bench_purify(dataset: str, n_images: int | None = None, batch_size: int | None = None,
                 eps_defend: int | None = None, reference_steps: int = 32,
                 agreement_images: int = 2, data_dir=None, model_name: str | None = None,
                 art: bool = False, device: str = "auto") -> dict:
    """``eps_defend`` defaults to the paper's for the dataset; ``batch_size`` to the
    evaluation's on the CPU and GPU_PURIFY_BATCH on a GPU; ``n_images`` to one batch."""
    ds = parse_dataset(dataset)
    eps_defend = eps_defend_for(ds, eps_defend)
    device = torch_device(device)
    if batch_size is None:
        batch_size = (GPU_PURIFY_BATCH if device.type == "cuda"
                      else defaults(EvalConfig)["purify_batch"])
    n_images = batch_size if n_images is None else n_images
    if n_images < 1 or batch_size < 1 or reference_steps < 1 or agreement_images < 0:
        raise PdrayError("n-images, batch-size and reference-steps must be at least 1.")
    model_name = model_name or pixelcnn_name(ds)
    model, _ = zoo.load(model_name, device)
    d = data.load(ds, data_dir)
    images = d.test.images[:n_images]
    h, w, c = images.shape[1:]
    subpixels = h * w * c
    batch = images[:batch_size]
    x, eps = to_nchw(batch, device), torch.full((len(batch),), eps_defend, device=device)
    with torch.inference_mode():
        model(x)  # warm-up
        _, forward_s = _timed(lambda: model(x))
    fast_out, fast_s = _timed(lambda: purify.pixeldefend(model, images, eps_defend,
                                                         batch_size=batch_size))
    _, ref_part_s = _timed(lambda: purify.reference_batch(model, x, eps, steps=reference_steps))
    batches = -(-len(images) // batch_size)
    reference_s = ref_part_s / reference_steps * subpixels * batches
    # The fast purifier's images as timed, in their batch: on a GPU the batch size can change
    # the float kernels, hence a near-tie's decision.
    reference_out = purify.pixeldefend(model, images[:agreement_images], eps_defend,
                                       method="reference")
    agree = reference_out == fast_out[:agreement_images]
    extra = {}
    if art:
        art_out, art_s = _timed(lambda: art_pixeldefend(model, images, eps_defend, batch_size))
        one = purify.one_pass(model, images, eps_defend, batch_size=batch_size)
        n = agreement_images
        extra = {"art_s": round(art_s, 3), "bpd_art": float(bits_per_dim(model, art_out).mean()),
                 "art_agreement_with_one_pass": _mean(art_out == one),
                 "art_agreement_with_reference": _mean(art_out[:n] == reference_out),
                 "one_pass_agreement_with_reference": _mean(one[:n] == reference_out),
                 "art_note": "ART is one pass (every value from the model's output for the "
                             "unpurified image), Algorithm 1 sequential, so they differ; "
                             "art_agreement_with_one_pass 1.0 says ART reads the model's "
                             "probabilities"}
    return {
        "dataset": ds.value, "data": d.name, "model": model_name, "device": str(device),
        "images": len(images), "batch_size": batch_size, "eps_defend": eps_defend,
        "fast_s": round(fast_s, 3), "fast_images_per_s": round(len(images) / fast_s, 2),
        "reference_s": round(reference_s, 1),
        "reference_extrapolated": True, "reference_steps_timed": reference_steps,
        "subpixels_per_image": subpixels, "speedup": round(reference_s / fast_s, 1),
        "agreement": _mean(agree),
        "agreement_subpixels": int(agree.size),
        "forward_s": round(forward_s, 4), "forward_equivalents": round(fast_s / forward_s / batches, 2),
        "bpd_input": float(bits_per_dim(model, images).mean()),
        "bpd_fast": float(bits_per_dim(model, fast_out).mean()),
        "peak_mem_mb": round(peak_rss_mb(), 1),
        **({"peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
           if device.type == "cuda" else {}),
        "torch_threads": torch.get_num_threads(), **extra,
    }


def bench_deepfool(classifier: str, n_images: int = 20, steps: int | None = None,
                   data_dir=None) -> dict:
    """CPU seconds of this process (the bench pins torch to one thread, as the attacker
    actors run) so that other work on the machine does not tilt the ratio."""
    import foolbox as fb

    from pdray import attacks

    steps = defaults(EvalConfig)["deepfool_steps"] if steps is None else steps
    if n_images < 1 or steps < 1:
        raise PdrayError("n-images and steps must be at least 1.")
    dataset = zoo.entry(classifier)["dataset"]
    zoo.require(classifier, "classifier", dataset)
    model, _ = zoo.load(classifier)
    d = data.load(dataset, data_dir)
    images, labels = d.test.images[:n_images], d.test.labels[:n_images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (ref, ref_found), foolbox_s = _timed(lambda: attacks._foolbox(
            fb.attacks.L2DeepFoolAttack(steps=steps, candidates=10), model, images, labels, None),
            clock=time.process_time)
        (ours, found), pdray_s = _timed(lambda: attacks.l2_deepfool(model, images, labels,
                                                                    steps=steps), clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    return {"classifier": classifier, "data": d.name, "images": len(images), "steps": steps,
            "foolbox_cpu_s": round(foolbox_s, 2), "pdray_cpu_s": round(pdray_s, 2),
            "speedup": round(foolbox_s / pdray_s, 2),
            "identical_images": _mean((ref == ours).reshape(len(ours), -1).all(1)),
            "max_abs_diff_levels": float(np.abs(ref - ours).max()),
            "found_agreement": _mean(ref_found == found), "found": int(found.sum())}


def bench_adaptive(dataset: str, attack: str = "bpda-soft", n_images: int = 4,
                   steps: int = 2, defense: str = "pixeldefend", data_dir=None) -> dict:
    """CPU seconds of this process on one torch thread (as one purifier actor runs), so
    that other work on the machine does not tilt the ratio. The defense is the shipped
    PixelCNN's at the paper's eps_defend; both sides make the same images."""
    from pdray import attacks

    ds = parse_dataset(dataset)
    if parse_attack(attack).value not in THROUGH_DEFENSE:
        raise PdrayError(f"bench adaptive times {' and '.join(THROUGH_DEFENSE)}; got {attack}.")
    if n_images < 1 or steps < 1:
        raise PdrayError("n-images and steps must be at least 1.")
    d = data.load(ds, data_dir)
    names = [e["name"] for e in zoo.manifest()
             if e["kind"] == "classifier" and e["dataset"] == ds.value]
    models = [zoo.load(n)[0] for n in names]
    pixelcnn = zoo.load(pixelcnn_name(ds))[0]
    images, labels = d.test.images[:n_images], d.test.labels[:n_images]
    eps_list, eps_defend = eps_attack_for(ds, None), eps_defend_for(ds, None)
    defense = parse_choice(Defense, defense, "defense").value
    threshold = zoo.adaptive_threshold(pixelcnn_name(ds))["bpd"] \
        if defense == Defense.ADAPTIVE.value else None
    aim = {"defend": purify.defender(pixelcnn, defense, eps_defend, threshold=threshold,
                                     batch_size=len(models) * len(eps_list) * n_images)} \
        if parse_attack(attack) is Attack.BPDA else \
        {"surrogate": purify.surrogate(pixelcnn, defense, eps_defend, threshold=threshold)}
    options = dict(bpda_steps=steps, image_ids=np.arange(n_images), **aim)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        apart, apart_s = _timed(lambda: [[attacks.through_defense(attack, [m], images, labels,
                                                                  [e], **options)[0][0]
                                          for e in eps_list] for m in models],
                                clock=time.process_time)
        together, together_s = _timed(lambda: attacks.through_defense(
            attack, models, images, labels, eps_list, **options), clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    same = np.concatenate([(a == b).reshape(n_images, -1).all(1)
                           for x, y in zip(apart, together) for a, b in zip(x, y)])
    return {"dataset": ds.value, "attack": attack, "defense": defense, "classifiers": names,
            "eps_attack": eps_list, "images": n_images, "steps": steps,
            "rows_per_batch": len(models) * len(eps_list) * n_images,
            "apart_cpu_s": round(apart_s, 2), "together_cpu_s": round(together_s, 2),
            "speedup": round(apart_s / together_s, 2), "identical_images": _mean(same)}


def _mean(agree: np.ndarray) -> float | None:
    """The fraction of sub-pixels that agree; None when none were compared."""
    return float(agree.mean()) if agree.size else None


def bench_pipeline(dataset: str = "fmnist", n_images: int = 512, shards: int = 16,
                   attack_names: tuple[str, ...] = ("fgsm",), eps_attack: tuple[int, ...] = (8,),
                   defenses: tuple[str, ...] = ("none", "pixeldefend"), data_dir=None,
                   out: str | None = None) -> dict:
    """The Ray pipeline, as ``pdray eval`` runs it by default (one attacker, a purifier
    pool that grows into the CPUs the attacks free), against the bare loop over the same
    stage code, images and settings. Ray itself is started before the clock starts;
    starting the actor processes and loading models in them is timed."""
    from pdray import pipeline  # Ray's second of start-up, which bench purify does without

    cfg = pipeline.resolve(EvalConfig(
        dataset=dataset, n_images=n_images, shards=shards, attacks=list(attack_names),
        eps_attack=list(eps_attack), defenses=list(defenses), save_images=0))
    data.locate(cfg.dataset, data_dir)  # a missing dataset fails before Ray starts
    init_ray()
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as mem:
        _, pipeline_s = _timed(lambda: pipeline.run(
            cfg, RunOptions(out=out or tmp, data_dir=data_dir, gpus="0"),
            log=lambda *_: None))
    shards_ids = [s.tolist() for s in data.shard_indices(cfg.n_images, cfg.shards)]

    def bare():
        attack = pipeline.AttackStage(asdict_cfg, shards_ids, data_dir)
        purifier = pipeline.PurifierStage(asdict_cfg)
        rows = 0
        for k in range(len(shards_ids)):
            rows += len(purifier(attack({"shard": np.array([k])}))["shard"])
        return rows

    asdict_cfg = asdict(cfg)
    rows, bare_s = _timed(bare)
    return {"dataset": cfg.dataset, "images": cfg.n_images, "shards": cfg.shards,
            "attacks": cfg.attacks, "eps_attack": cfg.eps_attack, "defenses": cfg.defenses,
            "rows": rows, "pipeline_s": round(pipeline_s, 2), "bare_s": round(bare_s, 2),
            "pipeline_images_per_s": round(cfg.n_images / pipeline_s, 3),
            "bare_images_per_s": round(cfg.n_images / bare_s, 3),
            "overhead": round(pipeline_s / bare_s - 1, 3),
            "extra_s": round(pipeline_s - bare_s, 2),
            "pipeline_peak_pss_mb": mem.peak_mb,
            "note": "pipeline_s includes starting the actor processes and loading the models in "
                    "each; bare_s runs the same stage classes in this process, one after the "
                    "other; extra_s that stays put as images grow is fixed start-up",
            "torch_threads_bare": torch.get_num_threads()}
