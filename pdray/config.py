"""Every choice and every default, once: the Enums that users' strings become, the
paper's settings per dataset, the shipped models' names, and the dataclasses that say
what a run or a training computes. Light on purpose (no torch): the CLI reads its
defaults from here.

One validation style: a config's ``resolved()`` returns a new config whose defaults are
filled in and whose every choice is checked, or raises a PdrayError naming the bad value.
The configs keep plain strings (``Enum.value``), so they go into JSON as they are.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from enum import Enum

from pdray.errors import PdrayError, parse_choice


# ---- the choices ---------------------------------------------------------------------------

class Dataset(str, Enum):
    FMNIST = "fmnist"
    CIFAR10 = "cifar10"


class Attack(str, Enum):
    RAND = "rand"
    FGSM = "fgsm"
    BIM = "bim"
    DEEPFOOL = "deepfool"
    CW = "cw"
    BPDA = "bpda"            # adaptive, through a defense; not one of the paper's attacks
    BPDA_SOFT = "bpda-soft"  # BPDA with a soft Algorithm 1's gradient (pdray.purify.surrogate)


class Schedule(str, Enum):
    """The adaptive attacks' step sizes (pdray.attacks._ascend)."""
    CONSTANT = "constant"  # one level per step, as BIM
    HALVING = "halving"    # APGD-style: eps / 4, halved where the loss stalls


class Images(str, Enum):
    """Which images an evaluation attacks: the test set, or the validation images (the
    held-out tail of the training split) for choosing settings without touching it."""
    TEST = "test"
    VALIDATION = "validation"


class Defense(str, Enum):
    NONE = "none"
    SQUEEZE = "squeeze"
    PIXELDEFEND = "pixeldefend"
    ADAPTIVE = "adaptive"


class Recipe(str, Enum):
    """How a Table 1 classifier is trained."""
    NORMAL = "normal"
    ADV_FGSM = "adv-fgsm"
    ADV_BIM = "adv-bim"
    LABEL_SMOOTHING = "label-smoothing"


class Arch(str, Enum):
    RESNET = "resnet"
    VGG = "vgg"


class Head(str, Enum):
    """The PixelCNN's output head (pdray.pixelcnn)."""
    FREE = "free"
    MIXTURE = "mixture"


class Method(str, Enum):
    """The purifier's implementation (pdray.purify)."""
    FAST = "fast"
    REFERENCE = "reference"


class Purifier(str, Enum):
    """How the ablation purifies (pdray.ablation): Algorithm 1, or L-BFGS-B on the same
    likelihood from the input (Appendix E's alternative), which asks whether the most likely
    image near the input is a clean one whatever the optimiser."""
    GREEDY = "greedy"
    LBFGSB = "lbfgsb"


class Device(str, Enum):
    """Where torch runs (pdray.cluster.torch_device): auto is CUDA when torch sees a GPU."""
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def parse_dataset(name: str | Dataset) -> Dataset:
    return parse_choice(Dataset, name, "dataset")


def parse_attack(name: str | Attack) -> Attack:
    return parse_choice(Attack, name, "attack")


def check_eps(eps: int, what: str = "eps_attack") -> int:
    """A perturbation bound in whole pixel levels, 0..255."""
    if isinstance(eps, float) and not eps.is_integer() or not 0 <= eps <= 255:
        raise PdrayError(f"{what} must be a whole number of pixel levels in 0..255; got {eps}.")
    return int(eps)


def choices(kind: type[Enum]) -> str:
    """'a, b or c': the values of an Enum, for help texts."""
    values = [k.value for k in kind]
    return ", ".join(values[:-1]) + " or " + values[-1]


# ---- the paper's settings ------------------------------------------------------------------

# Attacks through a defense: the purifier stage makes them, one per defense row.
THROUGH_DEFENSE = [Attack.BPDA.value, Attack.BPDA_SOFT.value]
PAPER_ATTACKS = [a.value for a in Attack if a.value not in THROUGH_DEFENSE]
DEFENSES = [d.value for d in Defense]
# CIFAR-10: Table 1; Fashion-MNIST as recalled in FIELD-NOTES.
EPS_ATTACK = {Dataset.FMNIST: [8, 25], Dataset.CIFAR10: [2, 8, 16]}
EPS_DEFEND = {Dataset.FMNIST: 32, Dataset.CIFAR10: 16}
# The fast purifier steps through the pixels one at a time whatever the batch, so on a GPU
# images/s grows with the batch; bench/gpu-check.sh measures 256 and 1024.
GPU_PURIFY_BATCH = 1024


def eps_attack_for(dataset: str | Dataset, eps_attack: list[int] | None = None) -> list[int]:
    """``eps_attack`` checked, or the paper's for the dataset."""
    return [check_eps(e) for e in (eps_attack or EPS_ATTACK[parse_dataset(dataset)])]


def eps_defend_for(dataset: str | Dataset, eps_defend: int | None = None) -> int:
    """``eps_defend`` checked, or the paper's for the dataset."""
    return check_eps(EPS_DEFEND[parse_dataset(dataset)] if eps_defend is None else eps_defend,
                     "eps_defend")


# The smaller commands' defaults (pdray detect, ablate, adaptive-threshold, models evaluate).
PROBE_EPS_ATTACK = 8        # the eps_attack both datasets' tables share
PROBE_ATTACKS = (Attack.FGSM.value, Attack.BIM.value)  # the ablation's, by default
LBFGSB_MAXITER = 50         # the ablation's L-BFGS-B purifier (the README's Appendix E runs' too)
DETECT_IMAGES = 500         # first N test images that Claim 1's detection attacks and scores
VALIDATION_IMAGES = 256     # first N validation images (adaptive's threshold, the ablation)
METRIC_IMAGES = 1000        # first N test images a shipped model's metric is recomputed on


# ---- the shipped models' names -------------------------------------------------------------

def classifier_name(dataset: str | Dataset, arch: str = Arch.RESNET.value,
                    recipe: str = Recipe.NORMAL.value) -> str:
    """fmnist-resnet-normal, cifar10-vgg-normal, ...; the default is the normal ResNet."""
    return f"{parse_dataset(dataset).value}-{arch}-{recipe}"


def pixelcnn_name(dataset: str | Dataset, head: str = Head.FREE.value,
                  jpeg_quality: int = 0, noise: float = 0.0, context_noise: float = 0.0,
                  dilations: tuple = ()) -> str:
    """fmnist-pixelcnn, fmnist-pixelcnn-mixture, fmnist-pixelcnn-jpeg44, cifar10-pixelcnn-noise8,
    cifar10-pixelcnn-ctxnoise8, cifar10-pixelcnn-dil1-2-4-8-1-2..."""
    return (f"{parse_dataset(dataset).value}-pixelcnn" + (f"-{head}" if head != Head.FREE else "")
            + (f"-jpeg{jpeg_quality}" if jpeg_quality else "") + (f"-noise{noise:g}" if noise else "")
            + (f"-ctxnoise{context_noise:g}" if context_noise else "")
            + ("-dil" + "-".join(map(str, dilations)) if dilations else ""))


def defaults(cls) -> dict:
    """A config dataclass's defaults by field name (what the CLI shows)."""
    return {f.name: f.default if f.default_factory is MISSING else f.default_factory()
            for f in fields(cls)}


# ---- the evaluation ------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """What a run computes. Two runs with equal configs produce equal rows."""
    dataset: str = Dataset.FMNIST.value
    images: str = Images.TEST.value
    n_images: int = 64
    shards: int = 4
    attacks: list[str] = field(default_factory=lambda: list(PAPER_ATTACKS))
    eps_attack: list[int] | None = None      # default: the paper's, per dataset
    eps_defend: int | None = None            # default: the paper's, per dataset
    classifiers: list[str] | None = None     # default: the dataset's normal ResNet
    pixelcnn: str | None = None              # default: the dataset's shipped PixelCNN
    defenses: list[str] = field(default_factory=lambda: list(DEFENSES))
    adaptive_threshold: float | None = None  # bits/dim; default: the one chosen on validation data
    seed: int = 0
    save_images: int = 8                     # keep images of image ids below this, for figures
    cw_steps: int = 50
    cw_binary_search_steps: int = 3
    deepfool_steps: int = 50
    bpda_steps: int = 100                    # per restart; Athalye et al.'s BPDA took 100
    bpda_restarts: int = 1                   # the first from the clean image, the rest random
    bpda_schedule: str = Schedule.HALVING.value
    bpda_tau: float = 1.0                    # bpda-soft's temperature: the model's own conditional
    purify_batch: int = 64                   # images per PixelCNN batch (and per call on GPUs)

    def resolved(self) -> EvalConfig:
        """Defaults filled in, choices checked. The models' names are checked against the
        weights by the pipeline, which loads them."""
        ds = parse_dataset(self.dataset)
        attacks = [parse_attack(a).value for a in self.attacks]
        if not attacks:
            raise PdrayError("Choose at least one attack.")
        cfg = replace(self, dataset=ds.value, attacks=attacks,
                      images=parse_choice(Images, self.images, "image set").value,
                      eps_attack=eps_attack_for(ds, self.eps_attack),
                      eps_defend=eps_defend_for(ds, self.eps_defend),
                      defenses=[parse_choice(Defense, d, "defense").value for d in self.defenses],
                      bpda_schedule=parse_choice(Schedule, self.bpda_schedule,
                                                 "BPDA schedule").value,
                      classifiers=list(self.classifiers or [classifier_name(ds)]),
                      pixelcnn=self.pixelcnn or pixelcnn_name(ds))
        if min(cfg.n_images, cfg.purify_batch, cfg.cw_steps, cfg.cw_binary_search_steps,
               cfg.deepfool_steps, cfg.bpda_steps, cfg.bpda_restarts) < 1:
            raise PdrayError("n_images, purify_batch, cw_steps, cw_binary_search_steps, "
                             "deepfool_steps, bpda_steps and bpda_restarts must be at least 1.")
        if not cfg.bpda_tau > 0:
            raise PdrayError(f"bpda_tau must be above 0; got {cfg.bpda_tau}.")
        return cfg

    def rows_per_image(self) -> int:
        """Result rows per image (of a resolved config)."""
        shared = 1 + len(self.eps_attack) * (Attack.RAND.value in self.attacks)
        per_classifier = len(self.eps_attack) * sum(a != Attack.RAND.value for a in self.attacks)
        return (shared + per_classifier) * len(self.classifiers) * len(self.defenses)


@dataclass
class RunOptions:
    """How a run is carried out; not part of what it computes."""
    out: str = "out"
    data_dir: str | None = None
    shard: int | str | None = None  # only these shards: K, A-B, or a comma list of them
    resume: bool = False            # skip shards that have a marker
    num_attackers: int = 1
    num_purifiers: int | None = None  # default: one per GPU, else 1 growing into free CPUs
    attacker_cpus: float = 1.0      # CPUs Ray reserves per actor; on a CPU-only machine the
    purifier_cpus: float = 1.0      # attacks dominate, so give them the cores (purifier 0)
    gpus: str = "auto"              # "auto": a GPU per purifier if the cluster has any; or "0"

    def resolved(self) -> RunOptions:
        if self.num_attackers < 1 or min(self.attacker_cpus, self.purifier_cpus) < 0:
            raise PdrayError(f"--num-attackers must be at least 1 and --attacker-cpus / "
                             f"--purifier-cpus at least 0; got {self.num_attackers}, "
                             f"{self.attacker_cpus} and {self.purifier_cpus}.")
        if self.gpus != "auto" and not str(self.gpus).isdigit():
            raise PdrayError(f"--gpus must be auto or a number of GPUs; got {self.gpus!r}.")
        _parse_shards(self.shard)
        return replace(self)

    def shard_ids(self, n_shards: int) -> list[int]:
        """The shards this run evaluates, in order: those of ``--shard``, else every one."""
        if self.shard is None:
            return list(range(n_shards))
        ids = _parse_shards(self.shard)
        if not all(0 <= k < n_shards for k in ids):
            raise PdrayError(f"--shard must be in 0..{n_shards - 1} for {n_shards} shards; "
                             f"got {self.shard}.")
        return ids


def _parse_shards(spec: int | str | None) -> list[int]:
    """``--shard``'s shards: K, A-B (both included) or a comma list of them, sorted. A range
    lets a run stop at a chosen point (a session's or an allocation's end) with no shard
    half done."""
    if spec is None:
        return []
    ids = set()
    try:
        for part in str(spec).split(","):
            first, _, last = part.strip().partition("-")
            a, b = int(first), int(last or first)
            if a < 0 or b < a:
                raise ValueError
            ids.update(range(a, b + 1))
    except ValueError:
        raise PdrayError(f"--shard takes a shard number K, a range A-B or a comma list of them "
                         f"(e.g. 17 or 30-39,45); got {spec!r}.") from None
    return sorted(ids)


# ---- training ------------------------------------------------------------------------------

@dataclass
class Scaling:
    """Where training runs: Ray Train's workers and its storage."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    runs_dir: str = "runs"
    max_failures: int = 3           # a lost worker (a preempted node) restarts from the last checkpoint


@dataclass
class ClassifierConfig:
    dataset: str = Dataset.FMNIST.value
    arch: str = Arch.RESNET.value
    recipe: str = Recipe.NORMAL.value
    epochs: int = 10
    batch_size: int = 128          # global; split across workers
    lr: float = 0.1                # SGD + Nesterov, linear warm-up then cosine decay
    weight_decay: float = 5e-4
    smoothing: float = 0.1         # label-smoothing eps (Warde-Farley & Goodfellow)
    adv_fraction: float = 0.5      # Kurakin et al.: replace this share of each batch
    seed: int = 0
    max_steps: int = 0             # > 0: stop after this many steps (tests, smoke runs)
    eval_images: int = 10000       # test images scored after each epoch
    checkpoint_every: int = 100    # steps between mid-epoch training states; 0: epoch ends only
    data_dir: str | None = None
    resume_from: str | None = None

    @property
    def name(self) -> str:
        return classifier_name(self.dataset, self.arch, self.recipe)

    def resolved(self) -> ClassifierConfig:
        cfg = replace(self, dataset=parse_dataset(self.dataset).value,
                      arch=parse_choice(Arch, self.arch, "classifier architecture").value,
                      recipe=parse_choice(Recipe, self.recipe, "recipe").value)
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.checkpoint_every < 0:
            raise PdrayError("epochs and batch_size must be at least 1, checkpoint_every at "
                             "least 0.")
        return cfg


@dataclass
class PixelCNNConfig:
    dataset: str = Dataset.FMNIST.value
    filters: int = 64
    blocks: int = 6
    dropout: float = 0.0           # CPU-scale runs underfit; PixelCNN++ used 0.5 over 1000s of epochs
    logistic: bool = True          # the head's logistic logit term (pdray.pixelcnn): learns far faster
    head: str = Head.FREE.value    # "free" logits or a "mixture" of logistics (pdray.pixelcnn)
    mixtures: int = 10
    dilations: tuple = ()          # per block of the stream that sees the rows above; () all 1
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
    context_noise: float = 0.0     # > 0: the same noise on what each sub-pixel is conditioned on
                                   # only, the targets clean: a model that predicts the clean value
                                   # from a perturbed past (purification's situation)
    data_dir: str | None = None
    resume_from: str | None = None

    @property
    def name(self) -> str:
        return pixelcnn_name(self.dataset, self.head, self.jpeg_quality, self.noise,
                             self.context_noise, self.dilations)

    def resolved(self) -> PixelCNNConfig:
        cfg = replace(self, dataset=parse_dataset(self.dataset).value,
                      head=parse_choice(Head, self.head, "PixelCNN head").value)
        if cfg.batch_size < 1 or cfg.report_every < 1:
            raise PdrayError("batch_size and report_every must be at least 1.")
        cfg.dilations = tuple(cfg.dilations)
        if cfg.dilations and (len(cfg.dilations) != cfg.blocks or min(cfg.dilations) < 1):
            raise PdrayError(f"dilations must be one positive integer per block ({cfg.blocks} "
                             f"blocks), e.g. 1,2,4,8,1,2; got {','.join(map(str, cfg.dilations))}.")
        for what, std in (("noise", cfg.noise), ("context_noise", cfg.context_noise)):
            if not 0.0 <= std <= 64.0:
                raise PdrayError(f"{what} must be a std between 0 and 64 levels; got {std}.")
        return cfg
