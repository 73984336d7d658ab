"""Method-agnostic trainer: the task computes the loss; this file moves data and weights.

- The training set is uint8: in memory (on CUDA, the whole set moves to the GPU once), or, for a
  large ImageFolder, memory-mapped from the decoded-once cache (edgeexit.data.folder) and gathered
  per batch. Crops and flips are batched tensor ops (no DataLoader workers). On CUDA:
  channels_last + bf16 autocast; on CPU: fp32.
- Every epoch's shuffling and augmentation come from a generator seeded by (seed, epoch), so
  ``--resume`` continues exactly: 1 + 1 epochs resumed equal 2 epochs straight.
- ``last.pt`` (resume state) is written atomically every epoch; ``model.pt`` holds the weights with
  the best average exit accuracy on the held-out split (the test split never chooses anything).
- Under ``torchrun`` (WORLD_SIZE > 1) it runs DistributedDataParallel: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from edgeexit.data import ImageDataset, augment, load_dataset, normalize, random_resized_crop, split_train_val
from edgeexit.data.names import canonical_dataset, is_named
from edgeexit.errors import UserError
from edgeexit.models import MultiExitConfig, build_model
from edgeexit.models.multiexit import ConfigError, check_architecture
from edgeexit.train.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
from edgeexit.train.evaluation import anytime_accuracy, exit_outputs
from edgeexit.train.losses import METHODS, LossConfig, build_task
from edgeexit.train.recipes import Recipe, get_recipe, parse_normalize
from edgeexit.train.torch_device import resolve_device
from edgeexit.util import ContentionGuard


class TrainingError(Exception):
    """Training stopped (e.g. a NaN loss); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    data: str = "fashion-mnist"
    method: str = "ce"  # docs/lab-notebook.md §8: MLCSD did not beat it for the cascade
    out: str = "runs/exp"
    data_dir: str | None = None
    seed: int = 0
    train_images: int | None = None
    eval_images: int | None = None
    device: str = "auto"
    resume: bool = False
    force: bool = False  # train into a folder that already holds a run, replacing it
    # On CPU, drop to one thread while other processes want the cores (util.ContentionGuard).
    # Off for bit-exact reproducibility: results depend (in the last bits) on the thread count.
    adapt_threads: bool = True
    init: str | None = None  # torchvision ResNet18 state_dict to start the backbone from
    strict: bool = False  # ImageFolder: a bad image file is an error (default: skipped, named)
    cache_dir: str | None = None  # ImageFolder: where the decoded-once cache lives (shared by ranks)
    # A torchvision architecture with exits at its stage boundaries (models.backbones); None: the
    # multi-exit ResNet18 of --exits/--stem
    backbone: str | None = None
    exit_layout: str = "stages"  # with --backbone: stages, or dense (also inside long stages)
    freeze_trunk: bool = False  # with --backbone and --init: train only the early exit heads
    # torchrun: how long ranks wait for each other at rendezvous and in collectives (torch's default is
    # 30 min, which a stale WORLD_SIZE in a shell turned into a silent half-hour hang)
    dist_timeout: float = 5.0
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:  # paths as plain strings: the config is stored in checkpoints
        self.data = canonical_dataset(self.data)
        t = self.dist_timeout
        if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and 0 < t <= 1440):
            raise UserError(f"--dist-timeout must be a number of minutes within (0, 1440], got {t!r}")
        for name in ("out", "data_dir", "cache_dir", "init"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                setattr(self, name, os.fspath(v))

    @classmethod
    def from_recipe(cls, data: str, method: str, **overrides) -> TrainConfig:
        """The recipe for (data, method) with ``overrides`` (None keeps the recipe's value); every
        option is validated here, once, for the CLI and the Python API alike."""
        if method not in METHODS:
            raise UserError(f"unknown --method '{method}': use one of {', '.join(METHODS)}")
        if overrides.get("backbone") is not None:
            for name in ("exits", "stem"):
                if overrides.get(name) is not None:
                    raise UserError(
                        f"{flag(name)} sets the ResNet18 layout; with --backbone exits sit at the network's "
                        "stage boundaries (--exit-layout stages|dense)"
                    )
        data = canonical_dataset(data)  # 'CIFAR10' is cifar10 for the recipe, the split and the checkpoint
        # from ImageNet weights, or the ImageNet stem on a folder of photos: the fine-tuning recipe
        finetune = overrides.get("init") is not None or (overrides.get("stem") == "imagenet" and not is_named(data))
        recipe = get_recipe(data, method, finetune=finetune)
        recipe_fields, loss_fields, run_fields = {}, {}, {}
        for name, v in overrides.items():
            if name in Recipe.__dataclass_fields__:
                if v is not None:  # None: keep the recipe's value
                    recipe_fields[name] = v
            elif name in LossConfig.__dataclass_fields__:
                if v is not None:
                    loss_fields[name] = v
            else:
                run_fields[name] = v
        if "epochs" in recipe_fields and recipe.schedule == "multistep" and "milestones" not in recipe_fields:
            # Scale the paper's milestones (150/180/210 of 240) to a shorter run.
            scale = recipe_fields["epochs"] / recipe.epochs
            recipe_fields["milestones"] = [max(1, round(m * scale)) for m in recipe.milestones]
        with _named_flag():
            recipe = replace(recipe, loss=replace(recipe.loss, **loss_fields), **recipe_fields)
        cfg = cls(data=data, method=method, recipe=recipe, **run_fields)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Every option checked once (for the CLI and the Python API alike); errors name the flag."""
        _check_model_options(self.recipe)
        _check_backbone_options(self)
        if self.init is not None and not Path(self.init).is_file():
            from edgeexit.models.pretrained import TORCHVISION_HINT

            raise UserError(f"--init {self.init}: no such file. {TORCHVISION_HINT}")
        _check_numbers(self)
        out = Path(self.out)
        if any(p.is_file() for p in (out, *out.parents)):
            raise UserError(f"--out {out}: a file is in the way; the run folder must be a folder")
        has_run = (out / "model.pt").exists() or (out / "last.pt").exists()
        if has_run and not (self.resume or self.force):
            raise UserError(f"{out} already holds a run (model.pt/last.pt): pass --resume to continue it or --force")


def flag(field_name: str) -> str:
    """The `edgeexit train` flag of a TrainConfig / Recipe / LossConfig field (what errors name): the
    field is the flag, ``train_images`` is ``--train-images``."""
    return "--" + field_name.replace("_", "-")


@contextmanager
def _named_flag():
    """The models' and losses' ConfigError (which names a field) as a UserError naming the flag."""
    try:
        yield
    except ConfigError as e:
        raise UserError(f"{flag(e.field)} {e.problem}") from None


def _check_model_options(r: Recipe) -> None:
    with _named_flag():  # layouts and stems are checked in models, once (teacher weights: LossConfig)
        check_architecture(r.exits, r.stem)
    try:
        parse_normalize(r.normalize)
    except ValueError as e:
        raise UserError(f"--normalize {e}") from None
    if r.image_size is not None and not 8 <= r.image_size <= 1024:
        raise UserError(f"--image-size must be within 8..1024, got {r.image_size}")


def _check_backbone_options(cfg: TrainConfig) -> None:
    if cfg.backbone is None:
        for name in ("freeze_trunk",):
            if getattr(cfg, name):
                raise UserError(f"{flag(name)} adds exits to a torchvision network: pass --backbone NAME")
        if cfg.exit_layout != "stages":
            raise UserError("--exit-layout places the exits of a --backbone network: pass --backbone NAME")
        return
    from edgeexit.models.backbones import BACKBONES, LAYOUTS

    if cfg.backbone not in BACKBONES:
        raise UserError(f"unknown --backbone '{cfg.backbone}': use one of {', '.join(BACKBONES)}")
    if cfg.exit_layout not in LAYOUTS:
        raise UserError(f"--exit-layout must be {' or '.join(LAYOUTS)}, got '{cfg.exit_layout}'")
    if cfg.method not in ("ce", "sd", "l2w"):
        # byot and mlcsd mix every exit's pooled features, which need one size at every exit; a
        # backbone's early heads are narrower than its final features
        raise UserError(f"--method {cfg.method} is for the ResNet18 layouts; with --backbone use ce, sd or l2w")
    if cfg.freeze_trunk and cfg.recipe.loss.two_stage:
        raise UserError("--two-stage trains the trunk first, which --freeze-trunk keeps as loaded: pass one of them")
    if cfg.freeze_trunk and cfg.init is None:
        raise UserError("--freeze-trunk adds exits to a network you trained: pass its state_dict with --init FILE")


def _check_numbers(cfg: TrainConfig) -> None:
    r, loss = cfg.recipe, cfg.recipe.loss
    counts = {"epochs": r.epochs, "batch_size": r.batch_size, "val_size": r.val_size,
              "train_images": cfg.train_images, "eval_images": cfg.eval_images}  # fmt: skip
    for name, v in counts.items():
        if v is not None and v < 1:
            raise UserError(f"{flag(name)} must be at least 1, got {v}")
    for name, v in (("width", r.width), ("lr", r.lr), ("temperature", loss.temperature)):
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"{flag(name)} must be a positive number, got {v}")
    for name, v in (("alpha", loss.alpha), ("beta", loss.beta), ("gamma", loss.gamma)):
        if not (math.isfinite(v) and v >= 0):
            raise UserError(f"{flag(name)} must be a number >= 0, got {v}")
    if loss.two_stage and loss.two_stage >= r.epochs:
        raise UserError(
            f"--two-stage {loss.two_stage:g} leaves no joint training in {r.epochs} epochs: use fewer than --epochs"
        )
    if loss.distill_gate and cfg.method not in ("sd", "byot", "mlcsd"):
        raise UserError(f"--distill-gate gates distillation (sd, byot, mlcsd); --method {cfg.method} distils nothing")


def lr_at(recipe: Recipe, epoch_progress: float) -> float:
    """Learning rate at a fractional epoch (warm-up, then multistep or cosine)."""
    if recipe.warmup_epochs > 0 and epoch_progress < recipe.warmup_epochs:
        return recipe.lr * (epoch_progress + 1e-3) / recipe.warmup_epochs
    if recipe.schedule == "cosine":
        t = (epoch_progress - recipe.warmup_epochs) / max(1e-9, recipe.epochs - recipe.warmup_epochs)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    drops = sum(1 for m in recipe.milestones if epoch_progress >= m)
    return recipe.lr * (recipe.lr_gamma**drops)


TORCHRUN_VARS = "WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"


def check_dist_env(environ=os.environ) -> tuple[int, int, int] | None:
    """(world, rank, local rank) of a torchrun environment, None outside one (no WORLD_SIZE, or 1).
    What would fail or hang at rendezvous is a UserError naming the variables: a WORLD_SIZE that is
    not a positive integer, one without RANK (left over in a shell), a rank outside the world, no
    MASTER_ADDR/MASTER_PORT."""
    if environ.get("WORLD_SIZE") is None:
        return None
    fix = f"start training with torchrun (it sets {TORCHRUN_VARS}), or unset WORLD_SIZE if it is left over"

    def integer(name: str, lo: int, hi: int) -> int:
        raw = environ.get(name)
        if raw is None or not raw.strip():
            raise UserError(f"WORLD_SIZE={environ['WORLD_SIZE']} is set but {name} is not: {fix}")
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"{name}={raw!r} is not an integer: {fix}") from None
        if not lo <= value <= hi:
            raise UserError(f"{name}={value} is outside {lo}..{hi} (WORLD_SIZE={environ['WORLD_SIZE']}): {fix}")
        return value

    world = integer("WORLD_SIZE", 1, 1 << 20)
    if world == 1:
        return None
    rank, local = integer("RANK", 0, world - 1), integer("LOCAL_RANK", 0, world - 1)
    if not environ.get("MASTER_ADDR"):
        raise UserError(f"WORLD_SIZE={world} is set but MASTER_ADDR is not: {fix}")
    integer("MASTER_PORT", 1, 65535)
    return world, rank, local


def _distributed(timeout_min: float = 5.0) -> tuple[int, int]:
    from datetime import timedelta

    env = check_dist_env()
    if env is not None and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
        except (RuntimeError, ValueError) as e:  # DistStoreError (a timeout) is a RuntimeError
            raise UserError(
                f"the {env[0]} torchrun processes did not meet within --dist-timeout {timeout_min:g} min "
                f"(rank {env[1]}; check {TORCHRUN_VARS} on every node): {str(e).splitlines()[0][:200]}"
            ) from None
        if torch.cuda.is_available():
            torch.cuda.set_device(env[2])
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# A mapped training set up to this size is copied to the GPU once, as the in-memory path does.
GPU_RESIDENT_BYTES = 4 << 30


def prepare_data(cfg: TrainConfig, world: int = 1) -> tuple[ImageDataset, ImageDataset, dict]:
    from edgeexit.models.multiexit import NATURAL_SIZE
    from edgeexit.train.recipes import normalization_for

    r = cfg.recipe
    size = None
    if not is_named(cfg.data):  # an ImageFolder: its images are brought to the training size
        side = r.image_size or (224 if cfg.backbone else NATURAL_SIZE[r.stem])
        size = [side, side]
    elif r.image_size is not None:
        raise UserError(f"--image-size is for ImageFolder data; {cfg.data} has a fixed size")
    # Several processes (torchrun): the decoded cache, built once under a file lock, even when small.
    full = load_dataset(
        cfg.data,
        "train",
        cfg.data_dir,
        image_size=size,
        strict=cfg.strict,
        cache_dir=cfg.cache_dir,
        cache="always" if world > 1 and size is not None else "auto",
    )
    try:
        full.mean, full.std = normalization_for(r.normalize, full.in_chans, full.mean, full.std)
    except ValueError as e:
        raise UserError(f"--normalize {e}") from None
    val_size = cfg.recipe.val_size if cfg.recipe.val_size is not None else max(1, min(5000, len(full) // 5))
    if val_size > len(full) // 2:
        raise UserError(
            f"--val-size {val_size} is more than half of the {len(full)} training images: use 1..{len(full) // 2}"
        )
    train_idx, val_idx = split_train_val(len(full), val_size, cfg.seed)
    if cfg.train_images:
        train_idx = train_idx[: cfg.train_images]
    split = {
        "val_indices_seed": cfg.seed,
        "val_size": int(val_size),
        "num_train_total": len(full),
        "dataset": cfg.data,
        "data_dir": cfg.data_dir,
        "image_size": size,  # how ImageFolder images were brought to the training size
        "mean": list(full.mean),  # the normalisation the model was trained with
        "std": list(full.std),
        "class_names": list(full.class_names),
    }
    if cfg.cache_dir:
        split["cache_dir"] = cfg.cache_dir
    # A mapped set stays mapped (views, nothing copied); the in-memory sets are copied as before.
    return full.subset(train_idx, view=full.mapped), full.subset(val_idx, view=full.mapped), split


@torch.no_grad()
def heldout_accuracy(model, val: ImageDataset, limit: int | None, device) -> list[float]:
    """Every exit's accuracy on the held-out split (its first ``limit`` images), for model selection."""
    data = val.subset(np.arange(min(len(val), limit)), view=val.mapped) if limit else val
    # 512 small images per batch; fewer large ones (224 px: 53), so activations stay ~1/4 GB
    batch = int(min(512, max(16, 8_000_000 // (val.in_chans * val.input_size[0] * val.input_size[1]))))
    return anytime_accuracy(exit_outputs(model, data, batch, device)["correct"])


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    train_set: ImageDataset
    val_set: ImageDataset
    split: dict
    model: torch.nn.Module
    task: torch.nn.Module
    opt: torch.optim.Optimizer
    start_epoch: int = 0
    best: float = -1.0
    history: list = field(default_factory=list)
    throughput: list = field(default_factory=list)


def train(cfg: TrainConfig, console=None, progress: bool = True) -> dict:
    """Train and write ``model.pt`` (best on held-out) and ``last.pt`` (resume state) into cfg.out."""
    run = _setup(cfg)
    r = cfg.recipe
    ts = run.train_set
    resident = not ts.mapped or (run.device.type == "cuda" and len(ts) * ts.images[0].numel() <= GPU_RESIDENT_BYTES)
    if resident:  # the in-memory path: the whole set on the device (GPU-resident on CUDA)
        images = ts.materialize().images.to(run.device)
    else:  # mapped from the decoded cache: each batch gathered from the page cache
        images = None
    labels = ts.labels.to(run.device)
    module = run.task
    if run.world > 1:
        loss = r.loss  # stage one leaves the early heads out; l2w's weight net gets no gradient from the loss
        module = torch.nn.parallel.DistributedDataParallel(
            run.task,
            device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=loss.two_stage > 0 or bool(run.task.meta_parameters()),
        )
    per_rank = len(run.train_set) // run.world
    steps = per_rank // r.batch_size
    if steps == 0:
        raise UserError(f"{len(run.train_set)} training images are fewer than one batch of {r.batch_size} per process")
    with _progress_bar(console, progress and run.rank == 0) as prog:
        for epoch in range(run.start_epoch, r.epochs):
            bar, loss, epoch_time, seen = _train_epoch(run, module, prog, epoch, images, labels, steps)
            run.throughput.append(seen * run.world / epoch_time)
            if run.rank == 0:
                _end_epoch(run, prog, bar, epoch, loss, epoch_time)
            if run.world > 1:
                dist.barrier()
    return {
        "history": run.history,
        "best_val_average": run.best,
        "images_per_s": float(np.mean(run.throughput)) if run.throughput else 0.0,
        "out": str(run.out),
        "rank": run.rank,
        "world_size": run.world,
    }


def _setup(cfg: TrainConfig) -> _Run:
    rank, world = _distributed(cfg.dist_timeout)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    r = cfg.recipe
    torch.manual_seed(cfg.seed)
    train_set, val_set, split = prepare_data(cfg, world)
    if cfg.backbone is not None:
        model = _backbone_model(cfg, train_set)
    else:
        model = _resnet_model(cfg, train_set)
    task = build_task(cfg.method, model, r.loss).to(device)
    opt = _optimizer(task, model, r)
    run = _Run(cfg, rank, world, device, Path(cfg.out), train_set, val_set, split, model, task, opt)
    if cfg.resume:
        _resume(run)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return run


def _backbone_model(cfg: TrainConfig, train_set: ImageDataset):
    from edgeexit.models.backbones import BackboneConfig, BackboneNet, load_torchvision_weights

    bcfg = BackboneConfig(
        backbone=cfg.backbone,
        width=cfg.recipe.width,
        in_chans=train_set.in_chans,
        num_classes=train_set.num_classes,
        input_size=train_set.input_size,
        layout=cfg.exit_layout,
        freeze_trunk=cfg.freeze_trunk,
    )
    model = BackboneNet(bcfg)
    if cfg.init is not None:
        from edgeexit.models.pretrained import load_init_file

        load_torchvision_weights(model, load_init_file(cfg.init))
    return model


def _resnet_model(cfg: TrainConfig, train_set: ImageDataset):
    r = cfg.recipe
    mcfg = MultiExitConfig(
        exits=r.exits,
        width=r.width,
        in_chans=train_set.in_chans,
        num_classes=train_set.num_classes,
        input_size=train_set.input_size,
        stem=r.stem,
    )
    model = build_model(mcfg)
    if cfg.init is not None:
        from edgeexit.models.pretrained import load_init_file, load_torchvision_resnet18

        load_torchvision_resnet18(model, load_init_file(cfg.init), include_fc=mcfg.num_classes == 1000)
    return model


def _optimizer(task, model, r: Recipe) -> torch.optim.Optimizer:
    """SGD with weight decay on weights only; the backbone's groups carry ``lr_scale`` (a pretrained
    backbone learns slower than fresh heads)."""
    backbone = {id(p) for p in model.segments.parameters()}
    # a meta-learning task updates these itself; any module may be the task (a bare model: none)
    own = {id(p) for p in getattr(task, "meta_parameters", list)()}
    groups = []
    for in_backbone in (True, False):
        params = [
            p for p in task.parameters() if p.requires_grad and id(p) not in own and (id(p) in backbone) == in_backbone
        ]
        scale = r.backbone_lr_scale if in_backbone else 1.0
        groups += [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": r.weight_decay, "lr_scale": scale},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale},
        ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=r.lr, momentum=r.momentum, nesterov=False)


def _resume(run: _Run) -> None:
    last = run.out / "last.pt"
    if not last.is_file():
        raise UserError(f"--resume: no {last} to resume from")
    ckpt = load_checkpoint(last)
    ts = ckpt.get("train_state")
    if ts is None:
        raise UserError(f"{last} has no training state to resume from")
    _check_same_run(last, ckpt.get("train_config") or {}, _plain(run.cfg))
    _check_same_split(last, ckpt, run.split)
    run.task.load_state_dict(ts["task"])
    run.opt.load_state_dict(ts["optimizer"])
    if ts.get("meta_optimizer") is not None and hasattr(run.task, "meta_opt"):
        run.task.meta_opt.load_state_dict(ts["meta_optimizer"])
    run.start_epoch, run.best, run.history = int(ts["epoch"]), float(ts["best"]), list(ts["history"])
    if run.start_epoch >= run.cfg.recipe.epochs:
        raise UserError(f"{last} already finished {run.start_epoch} epochs; raise --epochs to continue")


# Settings that change the model or its task: a run can only be resumed with the same ones.
_RESUME_KEYS = (
    ("data",),
    ("method",),
    ("recipe", "exits"),
    ("recipe", "width"),
    ("recipe", "stem"),
    ("recipe", "image_size"),
    ("seed",),
    ("recipe", "loss", "teacher_weights"),
    ("backbone",),
    ("exit_layout",),
    ("freeze_trunk",),
)


def _check_same_run(last: Path, saved: dict, now: dict) -> None:
    for keys in _RESUME_KEYS:
        a, b = saved, now
        for k in keys:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if keys == ("data",) and isinstance(a, str) and isinstance(b, str):  # a run saved as 'CIFAR10'
            a, b = canonical_dataset(a), canonical_dataset(b)
        if a is not None and a != b:
            name = flag(keys[-1])
            raise UserError(f"--resume: {last} was trained with {name} {a}, not {b}; resume with the same {name}")


def _check_same_split(last: Path, ckpt: dict, now: dict) -> None:
    """The held-out split is never redrawn on resume: the same seed, size and images, or exit 2
    naming what changed (a class folder added or removed, images added, another --seed)."""
    saved = ckpt.get("split") or {}
    old_classes, new_classes = list(ckpt.get("class_names") or []), list(now.get("class_names") or [])
    if old_classes and new_classes and old_classes != new_classes:
        added = [c for c in new_classes if c not in old_classes]
        gone = [c for c in old_classes if c not in new_classes]
        what = (
            f"class folder '{added[0]}' was added"
            if added
            else f"class folder '{gone[0]}' is gone"
            if gone
            else "the class folders are in another order"
        )
        raise UserError(f"--resume: {what} since {last} was trained: train a new run (--out) or --force")
    for key, flag in (("val_indices_seed", "--seed"), ("val_size", "--val-size")):
        if key in saved and int(saved[key]) != int(now[key]):
            raise UserError(
                f"--resume: {last} drew its held-out split with {flag} {saved[key]}, not {now[key]}: "
                f"resume with {flag} {saved[key]} (a new split would hold out images it trained on)"
            )
    if "num_train_total" in saved and int(saved["num_train_total"]) != int(now["num_train_total"]):
        raise UserError(
            f"--resume: {now['dataset']} has {now['num_train_total']} training images but {last} was trained on "
            f"{saved['num_train_total']}: the held-out split cannot be kept; train a new run (--out) or --force"
        )


def _progress_bar(console, show: bool):
    """A bar per epoch on a terminal; one line per epoch in a log file (edgeexit/progress.py)."""
    from edgeexit.progress import progress

    return progress(console, "loss {task.fields[loss]:.3f}  {task.fields[ips]:.0f} img/s", show=show)


def _train_epoch(run: _Run, module, prog, epoch: int, images, labels, steps: int) -> tuple:
    """One epoch; returns (its progress bar, last logged loss, seconds, images seen by this process)."""
    r, device, n = run.cfg.recipe, run.device, len(labels)
    per_rank = n // run.world
    gen = torch.Generator().manual_seed(run.cfg.seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)[run.rank * per_rank : (run.rank + 1) * per_rank]
    perm = perm.to(device) if images is not None else perm  # each rank reads only its own shard
    # meta batches (l2w) from their own stream: the training batches stay those of every other method
    meta_gen = torch.Generator().manual_seed((run.cfg.seed * 100_003 + epoch) * 7 + run.rank + META_STREAM)
    run.task.train()
    guard = None
    if run.cfg.adapt_threads and device.type == "cpu":
        guard = ContentionGuard(torch.get_num_threads, torch.set_num_threads)
    bar = prog.add_task(f"epoch {epoch + 1}/{r.epochs}", total=steps, loss=0.0, ips=0.0)
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    for step in range(steps):
        idx = perm[step * r.batch_size : (step + 1) * r.batch_size]
        xb, idx = _batch(run, images, idx, gen)
        loss = _step(run, module, xb, labels[idx], epoch, step, steps)
        if run.task.meta_due(epoch * steps + step):
            midx = torch.randint(0, n, (r.batch_size,), generator=meta_gen)
            midx = midx.to(device) if images is not None else midx
            xm, midx = _batch(run, images, midx, meta_gen)
            run.task.meta_step(xb, labels[idx], xm, labels[midx], run.opt.param_groups[0]["lr"])
        seen += len(idx)
        if guard is not None:  # a read of /proc/loadavg: microseconds against a training step
            guard.check()
        if step % 10 == 0 or step == steps - 1:
            loss_sum = float(loss.detach())
            if device.type == "cuda":
                torch.cuda.synchronize()
            ips = seen * run.world / max(1e-9, time.perf_counter() - t0)
            prog.update(bar, completed=step + 1, loss=loss_sum, ips=ips)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if guard is not None and guard.reduced:
        torch.set_num_threads(guard.full)
    return bar, loss_sum, time.perf_counter() - t0, seen


META_STREAM = 0x4D57


def _batch(run: _Run, images, idx, gen) -> tuple:
    """The training images ``idx`` on the device, augmented (from ``gen``) and normalised; and ``idx`` there."""
    r, device = run.cfg.recipe, run.device
    if images is not None:
        xb = images[idx]
    else:
        xb = run.train_set.take(idx).to(device, non_blocking=True)
        idx = idx.to(device)
    if r.augment and r.crop == "resized":
        xb = random_resized_crop(xb, gen, flip=r.flip)
    elif r.augment:
        xb = augment(xb, gen, pad=r.pad, flip=r.flip)
    xb = normalize(xb, run.train_set.mean, run.train_set.std)
    if device.type == "cuda":
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, idx


def _step(run: _Run, module, xb, yb, epoch: int, step: int, steps: int):
    lr = lr_at(run.cfg.recipe, epoch + step / steps)
    for g in run.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    run.task.set_progress(epoch + step / steps)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
        loss = module(xb, yb)["loss"]
    if not torch.isfinite(loss):
        raise TrainingError(
            f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} (lr {lr:.4g}); "
            f"stopped — the last good checkpoint in {run.out} is kept. Try a lower --lr."
        )
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    return loss


def _end_epoch(run: _Run, prog, bar, epoch: int, loss: float, epoch_time: float) -> None:
    """Validate on the held-out split; write model.pt (when best) and last.pt, atomically."""
    cfg = run.cfg
    val_acc = heldout_accuracy(run.model, run.val_set, cfg.eval_images, run.device)
    avg = float(np.mean(val_acc))
    run.history.append(
        {
            "epoch": epoch + 1,
            "val_exit_accuracy": val_acc,
            "val_average": avg,
            "loss": loss,
            "images_per_s": run.throughput[-1],
            "epoch_time_s": epoch_time,
        }
    )
    prog.update(bar, description=f"epoch {epoch + 1}/{cfg.recipe.epochs} val avg {avg:.3f} final {val_acc[-1]:.3f}")
    metrics = {
        "val_exit_accuracy": val_acc,
        "val_average": avg,
        "epoch": epoch + 1,
        "images_per_s": run.throughput[-1],
        "history": run.history,
    }
    common = dict(
        preprocessing=run.train_set.preprocessing(),
        class_names=run.train_set.class_names,
        split=run.split,
        dataset=cfg.data,
    )
    extra = {"method": cfg.method, "train_config": _plain(cfg)}
    if avg > run.best:
        run.best = avg
        atomic_torch_save(make_checkpoint(run.model, metrics=metrics, extra=extra, **common), run.out / "model.pt")
    state = {
        "task": {k: v.detach().cpu().clone() for k, v in run.task.state_dict().items()},
        "optimizer": run.opt.state_dict(),
        "meta_optimizer": run.task.meta_opt.state_dict() if hasattr(run.task, "meta_opt") else None,
        "epoch": epoch + 1,
        "best": run.best,
        "history": run.history,
    }
    atomic_torch_save(
        make_checkpoint(run.model, metrics=metrics, extra={**extra, "train_state": state}, **common),
        run.out / "last.pt",
    )


def _plain(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("resume", None)
    d.pop("force", None)
    d.pop("adapt_threads", None)
    return d
