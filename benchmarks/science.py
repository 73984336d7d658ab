"""Does MLCSD earn its place? A resumable grid of training methods judged by the cascade a user deploys (issue 25).

    python benchmarks/science.py run --out runs/science --regime-set session --seeds 0 1 2 [--threads 1]
    python benchmarks/science.py run --out runs/science --shard 1/2 &   # two 1-thread processes ...
    python benchmarks/science.py run --out runs/science --shard 2/2     # ... split one grid
    python benchmarks/science.py report --out runs/science --json docs/science.json \
        --md docs/science_table.md --plot docs/science.png

One cell of the grid: ``run --regimes low-data --methods mlcsd --seeds 0``.

Can anything beat CE on the cascade? (six methods, ten seeds, two small regimes; four 1-thread shards):

    python benchmarks/science.py run --out runs/cascade --regime-set cascade --seeds 0 1 2 3 4 5 6 7 8 9 \
        --statistics torch --shard 1/4 &    # ... to 4/4
    python benchmarks/science.py throughput --regime-set cascade --json docs/cascade_throughput.json  # quiet cores
    python benchmarks/science.py report --out runs/cascade --json docs/cascade.json --md docs/cascade_table.md

``report`` sets every method against CE (paired by seed), adds the speed-up ``calibrate --max-drop 0.5pt``
certifies on the held-out frames, and each method's training seconds per run and throughput against CE.

**run.** Every (regime, method, seed) writes ``OUT/<regime>/<method>/seed<k>.json`` (write-then-rename)
when it is complete; a rerun skips finished runs (and refuses one recorded with another config), and a
run interrupted mid-training resumes from its ``last.pt``. The grid is seed-major (seed 0 of every cell,
then seed 1, ...), so an interrupted grid still covers every cell; ``--shard K/N`` takes every N-th run.
One run:

1. train with the product's trainer (fast Fashion-MNIST recipe, width 1/4, 8 exits, the method's loss);
   label noise, where a regime asks for it, is applied to the *training* labels only (`symmetric_noise`);
2. eval as ``edgeexit eval`` does: per-exit test accuracy and the MSDNet budgeted curve;
3. export to ONNX as ``edgeexit export`` does (parity checked, held-out frames stored in the artifact);
4. the calibrated cascade: every exit's max-softmax confidence and prediction, computed by the runtime's
   own `Cascade.exit_statistics` on the ONNX units, on the artifact's stored held-out frames and on the
   test split; at 40/50/70 % of the full model's latency (30 % is infeasible here, see
   BUDGET_FRACTIONS), thresholds chosen by the product's
   `cross_fitted` on the held-out frames (as ``edgeexit calibrate --budget 50%`` chooses them) and
   their accuracy and predicted latency on the test split.

**One cost model for every run.** Every run has the same architecture, so the latency of its units
does not depend on the method or the weights. It is measured once (the first run's artifact, ONNX
Runtime, 1 thread, the runtime's profiling exactly as ``calibrate`` does it), saved in
``OUT/costmodel.json`` and used by every run: the methods are compared under identical costs, and
timing noise between runs cannot favour one of them. A run of another architecture is refused.

**report.** Collects every run into one JSON (``{"runs": [{"regime", "method", "seed", "exit_accuracy",
"cascade", "seconds", ...}]}``) and a markdown table: per regime and method the mean ± 95 % t-interval
over seeds, and the paired (by seed) differences MLCSD − SD and MLCSD − CE with their t-intervals,
each called "win"/"loss" when the interval excludes 0, else "tie".
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# The issue asks for 30/50/70 %: on this CPU the cheapest cascade (segment 1 + head 1 + per-frame
# overhead) costs 35-39 % of the full model, so 30 % is infeasible for every method; 40 % replaces it.
BUDGET_FRACTIONS = (0.4, 0.5, 0.7)
BUDGET_PCTS = tuple(round(100 * f) for f in BUDGET_FRACTIONS)
_PCT_TEXT = "/".join(str(p) for p in BUDGET_PCTS)
FORMAT = "edgeexit-science-run"
COSTMODEL_FORMAT = "edgeexit-science-costmodel"
VERSION = 1
NOISE_STREAM = 0x5C1E  # the label-noise generator is seeded by (seed, NOISE_STREAM): one draw per seed

# name -> (the trainer's --method, loss overrides). mlcsd-frozen: the released code's fixed teacher
# weights; mlcsd-a5: the paper's α = 5 in place of the fast recipe's 0.5 (β stays the recipe's).
METHODS = {
    "ce": ("ce", {}),
    "sd": ("sd", {}),
    "byot": ("byot", {}),
    "mlcsd": ("mlcsd", {}),
    "mlcsd-frozen": ("mlcsd", {"teacher_weights": "frozen"}),
    "mlcsd-a5": ("mlcsd", {"alpha": 5.0}),
    # Methods that might beat CE on the cascade. ce-2stage: the first fifth of the epochs trains the trunk
    # and the final exit only (TWO_STAGE_SHARE); mlcsd-frozen-gate: the best distillation method of the
    # earlier grid, distilling only on batches whose teachers' mean confidence reaches 0.8.
    "ce-ge": ("ce", {"gradient_equilibrium": True}),
    "l2w": ("l2w", {}),
    "l2w-ge": ("l2w", {"gradient_equilibrium": True}),
    "ce-2stage": ("ce", {"two_stage": "share"}),
    "mlcsd-frozen-gate": ("mlcsd", {"teacher_weights": "frozen", "distill_gate": 0.8}),
}
FIVE = ("ce", "sd", "byot", "mlcsd", "mlcsd-frozen")
SIX = ("ce", "ce-ge", "l2w", "l2w-ge", "ce-2stage", "mlcsd-frozen-gate")
TWO_STAGE_SHARE = 0.2
MAX_DROP = 0.005  # the --max-drop 0.5pt promise whose certified speed-up the report compares
STATISTICS = {
    "onnx": "ONNX Runtime units through the runtime's Cascade.exit_statistics (max-softmax), on the artifact's "
    "stored held-out frames and the test split",
    "torch": "the PyTorch model's per-exit logits (max-softmax) on the held-out frames export stores and the test "
    "split; agreement with ONNX Runtime checked once (costmodel.json torch_vs_onnx)",
}


class ScienceError(Exception):
    """Bad usage or input: one line, exit 2."""


@dataclass(frozen=True)
class Regime:
    """A named preset. ``images``: training images (None: all 55,000 left after the held-out split);
    ``noise``: symmetric label-noise rate on the training labels; ``heldout``: held-out images (None:
    the trainer's 5,000); ``test_images``: test images evaluated (None: all 10,000)."""

    images: int | None
    epochs: int
    noise: float = 0.0
    width: float = 0.25
    exits: int = 8
    heldout: int | None = None
    test_images: int | None = None
    parity_images: int = 256  # export's ONNX-vs-PyTorch parity check (the product's default)
    methods: tuple[str, ...] = FIVE
    selection_images: int | None = None  # held-out images the trainer selects the best epoch on (None: all)


_SMOKE = dict(
    images=256, epochs=1, width=0.125, heldout=400, test_images=500, parity_images=32, methods=("ce", "mlcsd")
)

# One table of every preset. "issue": the regimes issue 25 names. "session": the same questions scaled to a
# 2-core CPU (the lead sizes them after timing one run; --override changes any field). "smoke": a minute
# end to end, for tests and for checking a set-up.
REGIME_SETS: dict[str, dict[str, Regime]] = {
    "issue": {
        "full-short": Regime(images=None, epochs=5, methods=(*FIVE, "mlcsd-a5")),
        "low-data": Regime(images=5000, epochs=30),
        "label-noise": Regime(images=None, epochs=5, noise=0.2),
        "long": Regime(images=None, epochs=20),
    },
    "session": {  # what one 3-hour session on the 2-core CPU fit beside other work (12k-20k images seen per run)
        "full-short": Regime(images=20000, epochs=1),
        "low-data": Regime(images=5000, epochs=3),
        "label-noise": Regime(images=12000, epochs=1, noise=0.2),
    },
    # Can any method beat CE on the cascade? Ten seeds of six methods in about 90 minutes of a share of the
    # 2-core CPU that other work was also using: two small regimes (one of 5 epochs), an 800-image held-out
    # split (calibration; model selection on its first 400), 1,500 test images.
    "cascade": {
        "five-epochs": Regime(images=500, epochs=5, heldout=800, test_images=1500, selection_images=400, methods=SIX),
        "one-epoch": Regime(images=2000, epochs=1, heldout=800, test_images=1500, selection_images=400, methods=SIX),
    },
    "smoke": {
        "smoke": Regime(**_SMOKE),
        "smoke-noise": Regime(**_SMOKE, noise=0.2),
    },
}
_INT_FIELDS = ("images", "epochs", "exits", "heldout", "test_images", "parity_images", "selection_images")


def apply_override(regimes: dict[str, Regime], text: str) -> dict[str, Regime]:
    """``low-data:epochs=10`` (several ``key=value`` may follow, comma-separated; ``images=all``)."""
    name, sep, assigns = text.partition(":")
    if not sep or name not in regimes:
        raise ScienceError(f"--override {text}: write REGIME:key=value with REGIME one of {', '.join(regimes)}")
    changes: dict = {}
    for item in assigns.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in (*_INT_FIELDS, "noise", "width"):
            raise ScienceError(
                f"--override {text}: '{item}' is not key=value with key one of images, epochs, noise, width, "
                "exits, heldout, test_images, parity_images"
            )
        try:
            if value.strip() in ("all", "none") and key in ("images", "heldout", "test_images"):
                changes[key] = None
            elif key in _INT_FIELDS:
                changes[key] = int(value)
            else:
                changes[key] = float(value)
        except ValueError:
            raise ScienceError(f"--override {text}: {key} must be a number, got '{value}'") from None
    regime = replace(regimes[name], **changes)
    check_regime(name, regime)
    return {**regimes, name: regime}


def check_regime(name: str, r: Regime) -> None:
    if r.epochs < 1 or (r.images is not None and r.images < 1):
        raise ScienceError(f"regime {name}: epochs and images must be at least 1")
    if not (0.0 <= r.noise < 1.0):
        raise ScienceError(f"regime {name}: noise must be within 0..1, got {r.noise}")
    if not (math.isfinite(r.width) and r.width > 0):
        raise ScienceError(f"regime {name}: width must be positive, got {r.width}")
    if r.parity_images < 1:
        raise ScienceError(f"regime {name}: parity_images must be at least 1")
    for key in ("heldout", "test_images"):
        v = getattr(r, key)
        if v is not None and v < 40:
            raise ScienceError(f"regime {name}: {key} must be at least 40, got {v}")


# --- the grid ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    regime: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.regime}/{self.method}/seed{self.seed}"


def grid(regimes: dict[str, Regime], methods: list[str] | None, seeds: list[int]) -> list[Cell]:
    """Seed-major: seed 0 of every (regime, method), then seed 1, ... ``methods`` None: each regime's own."""
    cells = []
    for seed in seeds:
        for name, r in regimes.items():
            for m in methods if methods is not None else r.methods:
                cells.append(Cell(name, m, seed))
    return cells


def shard(cells: list[Cell], spec: str | None) -> list[Cell]:
    """``K/N`` (K = 1..N): every N-th run starting at the K-th, so each shard walks the grid seed-major too."""
    if spec is None:
        return cells
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ScienceError(f"--shard must be K/N (e.g. 1/2), got '{spec}'") from None
    if not 1 <= k <= n:
        raise ScienceError(f"--shard K/N needs 1 <= K <= N, got '{spec}'")
    return cells[k - 1 :: n]


def method_loss(method: str, r: Regime) -> dict:
    """The method's loss overrides for regime ``r`` (a two-stage start as a share of its epochs)."""
    _, loss = METHODS[method]
    return {k: (TWO_STAGE_SHARE * r.epochs if v == "share" else v) for k, v in loss.items()}


def run_config(regime_name: str, r: Regime, method: str, seed: int, threads: int) -> dict:
    """The exact configuration of one run (what a rerun must match to count as the same run)."""
    from edgeexit.train.trainer import TrainConfig

    base, _ = METHODS[method]
    cfg = TrainConfig.from_recipe("fashion-mnist", base, out="unused", epochs=r.epochs, width=r.width, exits=r.exits)
    lc = replace(cfg.recipe.loss, **method_loss(method, r))
    return {
        "regime": regime_name,
        "method": method,
        "train_method": base,
        "seed": seed,
        "dataset": "fashion-mnist",
        "images": r.images,
        "epochs": r.epochs,
        "noise": r.noise,
        "noise_kind": "symmetric" if r.noise else None,
        "width": r.width,
        "exits": r.exits,
        "heldout": r.heldout,
        "test_images": r.test_images,
        "parity_images": r.parity_images,
        **({"selection_images": r.selection_images} if r.selection_images is not None else {}),
        "alpha": lc.alpha,
        "beta": lc.beta,
        "gamma": lc.gamma,
        "temperature": lc.temperature,
        "teacher_weights": lc.teacher_weights,
        **_new_options(lc, base),
        "lr": cfg.recipe.lr,
        "batch_size": cfg.recipe.batch_size,
        "schedule": cfg.recipe.schedule,
        "threads": threads,
    }


def _new_options(lc, base: str) -> dict:
    """The training options added after the first grid, recorded only where set (or, for l2w, used): a
    run of that grid, which had none of them, still matches its config."""
    out = {k: getattr(lc, k) for k, off in NEW_OPTIONS if getattr(lc, k) != off}
    if base == "l2w":
        out.update({k: getattr(lc, k) for k in ("target_budget", "meta_interval", "meta_epsilon", "meta_lr")})
    return out


NEW_OPTIONS = (("gradient_equilibrium", False), ("two_stage", 0.0), ("distill_gate", 0.0))


# --- label noise -------------------------------------------------------------------------------------------


def symmetric_noise(labels: np.ndarray, rate: float, seed: int, num_classes: int) -> np.ndarray:
    """Each label, with probability ``rate``, replaced by one of the *other* classes uniformly (symmetric
    noise, flip-to-other form: the realised rate is ``rate`` in expectation). Deterministic per seed:
    every method of a seed sees the same noisy labels, so methods are compared on the same data."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, NOISE_STREAM])
    flip = rng.random(len(labels)) < rate
    offset = rng.integers(1, num_classes, len(labels))
    return np.where(flip, (labels + offset) % num_classes, labels).astype(labels.dtype)


@contextmanager
def noisy_training_labels(rate: float, seed: int, record: dict):
    """While inside: the trainer's training split gets `symmetric_noise` labels. The held-out split (model
    selection, calibration) and the test split are loaded elsewhere and never touched. ``record`` receives
    the realised noise rate."""
    if rate <= 0:
        yield
        return
    import torch

    from edgeexit.train import trainer

    original = getattr(trainer, "prepare_data", None)
    if original is None:
        raise ScienceError("this edgeexit's trainer has no prepare_data to apply label noise through")

    def prepare(cfg, *args, **kwargs):
        train_set, val_set, split = original(cfg, *args, **kwargs)
        clean = train_set.labels.numpy()
        noisy = symmetric_noise(clean, rate, seed, train_set.num_classes)
        train_set.labels = torch.from_numpy(noisy)  # a new tensor: the loaded dataset itself is untouched
        record.update(rate=rate, realised=float(np.mean(noisy != clean)), images=int(len(clean)), kind="symmetric")
        return train_set, val_set, split

    trainer.prepare_data = prepare
    try:
        yield
    finally:
        trainer.prepare_data = original


# --- the shared cost model ---------------------------------------------------------------------------------


ARCH_KEYS = ("exits", "width", "in_chans", "num_classes", "input_size", "stem")


def architecture(art) -> dict:
    """The keys that fix the network's cost, as JSON holds them (a typed config's tuples become lists),
    so a grid's runs compare equal to the cost model written in costmodel.json."""
    c = art.model.config
    return json.loads(json.dumps({k: c.get(k) for k in ARCH_KEYS}))


def measure_costmodel(artifact: Path, repeats: int, measured_from: str) -> dict:
    """Profile ``artifact`` as ``calibrate`` does (ONNX Runtime, 1 thread): unit latencies, the decision,
    the per-frame overhead and, on a runner that fuses, every exit group."""
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.device import fingerprint
    from edgeexit.runtime.manifest import load_calibration_frames
    from edgeexit.runtime.plan import exit_group_name
    from edgeexit.runtime.profiling import frame_overhead_ms, fused_frame_overhead_ms, profile_exit_groups

    t0 = time.perf_counter()
    with Cascade.load(artifact, backend="onnxruntime", threads=1) as cascade:
        stored = load_calibration_frames(cascade.artifact)
        frame = stored["frames"][stored["calibration"][0]]
        x = cascade.preprocessor.batch(frame[None])[0]
        profile = cascade.profile(x, repeats=repeats)
        groups = None
        if cascade.options.fuse and cascade.runner.info.fuses:
            groups = profile_exit_groups(cascade, x, repeats)
            overhead = fused_frame_overhead_ms(cascade, frame, groups[exit_group_name(0, 0)]["p50_ms"])
        else:
            overhead = frame_overhead_ms(cascade, frame, {n: v["p50_ms"] for n, v in profile["units"].items()})
        device = fingerprint(cascade.runner.info)
        k = cascade.num_exits
        arch = architecture(cascade.artifact)
        agreement = torch_onnx_agreement(cascade, stored)
    payload = {
        "format": COSTMODEL_FORMAT,
        "version": VERSION,
        "architecture": arch,
        "num_exits": k,
        "backend": "onnxruntime-cpu",
        "threads": 1,
        "metric": "mean",
        "units": profile["units"],
        "decision": profile["decision"],
        "overhead_ms": overhead,
        "groups": groups,
        "repeats": repeats,
        "measured_from": measured_from,
        "torch_vs_onnx": agreement,
        "device": device,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "measured once on the first run's artifact and shared by every run: all runs have this "
        "architecture, so the methods are compared under identical costs",
    }
    cost = cost_model(payload)
    payload["full_ms"], payload["min_ms"] = cost.full_ms(), cost.min_ms()
    return payload


def torch_onnx_agreement(cascade, stored: dict, n: int = 1000) -> dict:
    """The artifact's ONNX units against its PyTorch weights on ``n`` stored held-out frames, both fed the
    runtime's preprocessing: per-exit prediction agreement and the largest max-softmax difference."""
    import torch

    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint

    decide = np.concatenate([stored["calibration"], stored["verification"]])[:n]
    x = cascade.preprocessor.batch(stored["frames"][decide])
    onnx = cascade.exit_statistics(x)
    model = model_from_checkpoint(load_checkpoint(cascade.artifact.to_json()["model"]["checkpoint"]))
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(x))
        conf, pred = torch.stack(logits, 1).softmax(2).max(2)
    return {
        "frames": int(len(x)),
        "prediction_agreement": [float(v) for v in (pred.numpy() == onnx["prediction"]).mean(axis=0)],
        "max_abs_confidence_diff": float(np.abs(conf.numpy() - onnx["confidence"]).max()),
    }


def cost_model(payload: dict):
    from edgeexit.calibrate.optimizer import CostModel

    return CostModel.from_timings(
        payload["num_exits"],
        payload["units"],
        "mean_ms",
        payload["decision"]["mean_ms"],
        payload["overhead_ms"],
        payload["groups"],
    )


def read_costmodel(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScienceError(f"{path} is not a readable cost model ({e}): remove it to measure again") from None
    if not isinstance(payload, dict) or payload.get("format") != COSTMODEL_FORMAT:
        raise ScienceError(f"{path} is not a science cost model (format {COSTMODEL_FORMAT}): remove it")
    payload["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # which cost model a run used
    return payload


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shared_costmodel(path: Path, artifact: Path, repeats: int, measured_from: str, say) -> dict:
    """The cost model at ``path``; measured from ``artifact`` by whichever process gets there first (a lock
    file, so two shards never profile at once; a lock left by a dead process is taken over)."""
    lock = path.with_name(path.name + ".lock")
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and not _alive(holder):
                lock.unlink(missing_ok=True)
            else:
                time.sleep(1.0)
            continue
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            if not path.exists():
                say(f"  measuring the shared cost model on {artifact} (ONNX Runtime, 1 thread) ...")
                from edgeexit.util import atomic_write_json

                atomic_write_json(path, measure_costmodel(artifact, repeats, measured_from))
        finally:
            lock.unlink(missing_ok=True)
    return read_costmodel(path)


# --- one run -----------------------------------------------------------------------------------------------


@dataclass
class Context:
    out: Path
    regimes: dict[str, Regime]
    threads: int
    repeats: int
    keep_artifacts: bool
    costmodel_path: Path
    statistics: str = "onnx"
    say: object = print


def run_path(out: Path, cell: Cell) -> Path:
    return out / cell.regime / cell.method / f"seed{cell.seed}.json"


def finished(out: Path, cell: Cell, config: dict) -> bool:
    """A finished run of ``cell`` with this config? One with another config is an error, not a skip."""
    path = run_path(out, cell)
    if not path.exists():
        return False
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ScienceError(f"{path} is not readable JSON: remove it to run {cell.key} again") from None
    old = done.get("config", {})
    diff = [k for k in config if k != "threads" and old.get(k) != config[k]]
    if diff:
        k = diff[0]
        raise ScienceError(
            f"{path} was run with {k}={old.get(k)!r}, not {config[k]!r}: use another --out or remove the file"
        )
    return True


def _train(cell: Cell, r: Regime, config: dict, work: Path, threads: int) -> tuple[dict, float, bool]:
    """Train (or resume) into ``work``; returns (label-noise record, wall seconds, resumed)."""
    from edgeexit.train.checkpoint import load_checkpoint
    from edgeexit.train.trainer import TrainConfig, train

    stamp = work / "config.json"
    same = stamp.exists() and json.loads(stamp.read_text()) == config
    resume = same and (work / "last.pt").exists()
    if resume:
        state = load_checkpoint(work / "last.pt").get("train_state") or {}
        if int(state.get("epoch", 0)) >= r.epochs and (work / "model.pt").exists():
            done = json.loads((work / "trained.json").read_text()) if (work / "trained.json").exists() else {}
            return done.get("noise", {}), float(done.get("train_s", 0.0)), True
    from edgeexit.util import atomic_write_json

    atomic_write_json(stamp, config)
    base, _ = METHODS[cell.method]
    loss = method_loss(cell.method, r)
    cfg = TrainConfig.from_recipe(
        "fashion-mnist",
        base,
        out=str(work),
        seed=cell.seed,
        epochs=r.epochs,
        train_images=r.images,
        width=r.width,
        exits=r.exits,
        val_size=r.heldout,
        eval_images=r.selection_images,
        resume=resume,
        force=not resume,
        adapt_threads=False,  # a fixed thread count: results do not depend on the load of the machine
        **loss,
    )
    noise: dict = {}
    t0 = time.perf_counter()
    with noisy_training_labels(r.noise, cell.seed, noise):
        train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    atomic_write_json(work / "trained.json", {"noise": noise, "train_s": seconds, "resumed": resume})
    return noise, seconds, resume


def evaluate_run(checkpoint: Path, test_images: int | None) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """What ``edgeexit eval`` computes (per-exit test accuracy, the MSDNet budgeted curve with thresholds
    from the held-out split), from one PyTorch pass over each split; also the torch exit statistics on the
    held-out frames export stores (in calibrate's order) and the test split, and the test frames (uint8 NHWC)."""
    from edgeexit.data import load_dataset, split_calibration
    from edgeexit.data.datasets import load_heldout
    from edgeexit.export.exporter import ExportOptions
    from edgeexit.models import count_unit_cost, cumulative_exit_flops
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint
    from edgeexit.train.evaluation import anytime_accuracy, budgeted_curve, exit_outputs

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    test = load_dataset("fashion-mnist", "test")
    test.mean, test.std = list(ckpt["preprocessing"]["mean"]), list(ckpt["preprocessing"]["std"])
    if test_images is not None:
        test = test.subset(np.arange(min(test_images, len(test))))
    val = load_heldout(ckpt["split"])
    out_test, out_val = exit_outputs(model, test), exit_outputs(model, val)
    cum = cumulative_exit_flops(count_unit_cost(model))
    acc = anytime_accuracy(out_test["correct"])
    ev = {
        "exits": [
            {"exit": i + 1, "accuracy": a, "cumulative_flops": c} for i, (a, c) in enumerate(zip(acc, cum, strict=True))
        ],
        "budgeted": budgeted_curve(out_val["confidence"], out_test["confidence"], out_test["correct"], cum),
    }
    # the held-out frames export stores (write_calibration_frames' selection), in calibrate's order
    n = min(ExportOptions().calib_images, len(val))
    rng = np.random.default_rng(ckpt["split"].get("val_indices_seed", 0))
    stored = np.sort(rng.permutation(len(val))[:n])
    calib, verify = split_calibration(np.arange(n), 0)
    decide = stored[np.concatenate([calib, verify])]
    stats = {
        "heldout": {k: out_val[k][decide] for k in ("confidence", "prediction")},
        "heldout_labels": out_val["labels"][decide],
        "test": {k: out_test[k] for k in ("confidence", "prediction")},
        "architecture": json.loads(json.dumps({k: ckpt["config"].get(k) for k in ARCH_KEYS})),
    }
    frames = test.images.permute(0, 2, 3, 1).contiguous().numpy()
    return ev, stats, frames, out_test["labels"]


def onnx_statistics(artifact: Path, test_frames: np.ndarray, threads: int) -> dict:
    """Every exit's max-softmax confidence and prediction through the ONNX units (the runtime's own
    `exit_statistics`, as calibrate collects them) on the artifact's stored held-out frames and the test frames."""
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames

    with Cascade.load(artifact, backend="onnxruntime", threads=threads, policy="max_softmax") as cascade:
        stored = load_calibration_frames(cascade.artifact)
        decide = np.concatenate([stored["calibration"], stored["verification"]])  # calibrate's order
        held = cascade.exit_statistics(cascade.preprocessor.batch(stored["frames"][decide]))
        test = cascade.exit_statistics(cascade.preprocessor.batch(test_frames))
        arch = architecture(cascade.artifact)
    return {"heldout": held, "heldout_labels": stored["labels"][decide], "test": test, "architecture": arch}


def calibrated_cascade(stats: dict, test_labels: np.ndarray, costmodel: dict) -> dict:
    """At each budget fraction: thresholds by the product's `cross_fitted` on the held-out frames, and
    their accuracy and predicted latency on the test split (and MSDNet's thresholds beside them)."""
    from edgeexit.calibrate.optimizer import cross_fitted, evaluate, msdnet_baseline
    from edgeexit.errors import UserError

    cost = cost_model(costmodel)
    conf = stats["heldout"]["confidence"]
    correct = stats["heldout"]["prediction"] == stats["heldout_labels"][:, None]
    t_conf = stats["test"]["confidence"]
    t_correct = stats["test"]["prediction"] == test_labels[:, None]
    full_ms = cost.full_ms()
    budgets = []
    for f in BUDGET_FRACTIONS:
        budget = f * full_ms
        row: dict = {"fraction": f, "budget_ms": budget}
        try:
            fit = cross_fitted(conf, correct, cost, budget, "mean", seed=0)
        except UserError as e:
            budgets.append({**row, "test_accuracy": None, "infeasible": str(e)})
            continue
        test = evaluate(t_conf, t_correct, cost, fit.solution.thresholds, "mean")
        base = msdnet_baseline(conf, correct, cost, budget, "mean")
        base_test = evaluate(t_conf, t_correct, cost, base.thresholds, "mean") if base is not None else None
        row.update(
            chosen=fit.chosen,
            thresholds=fit.solution.plan.to_list(),
            evaluated_exits=fit.solution.evaluated_exits,
            out_of_fold=fit.out_of_fold,
            heldout_accuracy=fit.solution.accuracy,
            heldout_latency_ms=fit.solution.mean_ms,
            test_accuracy=test.accuracy,
            test_latency_ms=test.mean_ms,
            test_exit_shares=test.exit_shares,
            msdnet_test_accuracy=base_test.accuracy if base_test else None,
            msdnet_test_latency_ms=base_test.mean_ms if base_test else None,
        )
        budgets.append(row)
    return {
        "budgets": budgets,
        "accuracy": {f"{round(100 * b['fraction'])}": b["test_accuracy"] for b in budgets},
        "max_drop": max_drop_promise(conf, correct, t_conf, t_correct, cost),
        "full_ms": full_ms,
        "min_ms": cost.min_ms(),
        "final_exit_test_accuracy": float(t_correct[:, -1].mean()),
        "thresholds_from": f"cross_fitted on {len(conf)} stored held-out frames (5 folds, seed 0), metric mean",
        "cost_model": "shared: OUT/costmodel.json, measured once; every run and method uses the same costs",
        "heldout_frames": int(len(conf)),
        "test_images": int(len(test_labels)),
    }


def max_drop_promise(conf, correct, t_conf, t_correct, cost) -> dict:
    """``calibrate --max-drop 0.5pt`` on the held-out frames (the product's `certify`: fixed-sequence tests
    at 95 %): the speed-up over the full model it certifies, and that plan's accuracy drop on test."""
    from edgeexit.calibrate.optimizer import evaluate
    from edgeexit.calibrate.promise import certify

    p = certify(conf, correct, cost, MAX_DROP, 0.95)
    full = float(t_correct[:, -1].mean())
    if p.thresholds is None:  # only the full model is certified
        return {"max_drop": MAX_DROP, "speedup": 1.0, "latency_ms": cost.full_ms(), "test_drop": 0.0}
    test = evaluate(t_conf, t_correct, cost, p.thresholds, "mean")
    return {
        "max_drop": MAX_DROP,
        "speedup": float(cost.full_ms() / p.latency_ms),
        "latency_ms": p.latency_ms,
        "drop_bound": p.drop_bound,
        "test_drop": full - float(test.accuracy),
        "family": list(p.family or []),
    }


def run_one(cell: Cell, ctx: Context) -> dict:
    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.util import atomic_write_json

    r = ctx.regimes[cell.regime]
    config = run_config(cell.regime, r, cell.method, cell.seed, ctx.threads)
    work = run_path(ctx.out, cell).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()
    noise, train_s, resumed = _train(cell, r, config, work, ctx.threads)

    t0 = time.perf_counter()
    ev, torch_stats, frames, labels = evaluate_run(work / "model.pt", r.test_images)
    eval_s = time.perf_counter() - t0

    artifact, export_s = work / "model.edgeexit", 0.0
    if ctx.statistics == "onnx" or not ctx.costmodel_path.exists():  # torch: one export, for the cost model
        t0 = time.perf_counter()
        export_checkpoint(work / "model.pt", out=artifact, force=True, parity_images=r.parity_images)
        export_s = time.perf_counter() - t0
    costmodel = shared_costmodel(ctx.costmodel_path, artifact, ctx.repeats, cell.key, ctx.say)
    t0 = time.perf_counter()
    stats = onnx_statistics(artifact, frames, ctx.threads) if ctx.statistics == "onnx" else torch_stats
    if stats["architecture"] != costmodel["architecture"]:
        raise ScienceError(
            f"{cell.key} has architecture {stats['architecture']} but {ctx.costmodel_path} was measured on "
            f"{costmodel['architecture']}: use another --out (one architecture per grid)"
        )
    cascade = calibrated_cascade(stats, labels, costmodel)
    calibrate_s = time.perf_counter() - t0
    cascade["statistics"] = STATISTICS[ctx.statistics]
    cascade["cost_model_sha256"] = costmodel["sha256"]
    exit_acc = [e["accuracy"] for e in ev["exits"]]
    if ctx.statistics == "onnx":  # the same test images through ONNX Runtime and PyTorch
        agree = (stats["test"]["prediction"] == torch_stats["test"]["prediction"]).mean(axis=0)
        cascade["onnx_torch_prediction_agreement"] = [float(v) for v in agree]
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "regime": cell.regime,
        "method": cell.method,
        "seed": cell.seed,
        "config": config,
        "label_noise": noise or None,
        "exit_accuracy": exit_acc,
        "average_exit_accuracy": float(np.mean(exit_acc)),
        "cumulative_flops": [e["cumulative_flops"] for e in ev["exits"]],
        "budgeted": [{k: p[k] for k in ("q", "expected_flops", "accuracy")} for p in ev["budgeted"]],
        "cascade": cascade,
        "seconds": {
            "train": round(train_s, 2),
            "eval": round(eval_s, 2),
            "export": round(export_s, 2),
            "calibrate": round(calibrate_s, 2),
            "total": round(time.perf_counter() - t_run, 2),
            "training_resumed": resumed,
        },
        "checkpoint": str(work / "model.pt"),
    }
    atomic_write_json(run_path(ctx.out, cell), payload)
    if not ctx.keep_artifacts:  # model.pt stays (it reproduces the run); the rest is rebuilt from it
        import shutil

        shutil.rmtree(artifact, ignore_errors=True)
        (work / "last.pt").unlink(missing_ok=True)
    return payload


def cmd_costmodel(args) -> int:
    """Measure OUT/costmodel.json from ``--checkpoint`` (exported to a temporary artifact). Runs finished
    with an earlier cost model keep theirs (their sha256 says which); report warns when they differ."""
    import shutil
    import tempfile

    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.util import atomic_write_json

    path = Path(args.out) / "costmodel.json"
    if path.exists() and not args.force:
        raise ScienceError(f"{path} exists: pass --force to measure it again")
    if args.repeats < 1:
        raise ScienceError("--repeats must be at least 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".costmodel-", dir=path.parent))
    try:
        artifact = tmp / "model.edgeexit"
        export_checkpoint(args.checkpoint, out=artifact)
        atomic_write_json(path, measure_costmodel(artifact, args.repeats, str(args.checkpoint)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cm = read_costmodel(path)
    print(f"{path}: full model {cm['full_ms']:.3f} ms, cheapest cascade {cm['min_ms']:.3f} ms")
    return 0


def cmd_run(args) -> int:
    import torch

    regimes = REGIME_SETS[args.regime_set]
    for text in args.override or []:
        regimes = apply_override(regimes, text)
    if args.regimes:
        unknown = [n for n in args.regimes if n not in regimes]
        if unknown:
            raise ScienceError(f"unknown regime '{unknown[0]}' in set {args.regime_set}: use {', '.join(regimes)}")
        regimes = {n: regimes[n] for n in args.regimes}
    if args.methods:
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise ScienceError(f"unknown method '{unknown[0]}': use {', '.join(METHODS)}")
    if args.threads < 1 or args.repeats < 1:
        raise ScienceError("--threads and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ctx = Context(
        out=out,
        regimes=regimes,
        threads=args.threads,
        repeats=args.repeats,
        keep_artifacts=args.keep_artifacts,
        costmodel_path=Path(args.costmodel) if args.costmodel else out / "costmodel.json",
        statistics=args.statistics,
    )
    cells = shard(grid(regimes, args.methods, args.seeds), args.shard)
    print(f"{len(cells)} runs ({args.regime_set}: {', '.join(regimes)}; shard {args.shard or 'all'}) -> {out}")
    for i, cell in enumerate(cells, 1):
        config = run_config(cell.regime, regimes[cell.regime], cell.method, cell.seed, args.threads)
        if finished(out, cell, config):
            print(f"[{i}/{len(cells)}] {cell.key}: done, skipped", flush=True)
            continue
        p = run_one(cell, ctx)
        s, acc = p["seconds"], p["cascade"]["accuracy"]
        print(
            f"[{i}/{len(cells)}] {cell.key}: avg {p['average_exit_accuracy']:.4f} final {p['exit_accuracy'][-1]:.4f} "
            f"cascade@{_PCT_TEXT} " + "/".join("-" if v is None else f"{v:.4f}" for v in acc.values()) + f"; train "
            f"{s['train']:.0f}s eval {s['eval']:.0f}s export {s['export']:.0f}s calibrate {s['calibrate']:.0f}s",
            flush=True,
        )
    return 0


# --- report ------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (Lentz; Numerical Recipes §6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Student t quantile by bisection on the CDF (no scipy needed)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_interval(values) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the 95 % t-interval, n); the half-width is None with fewer than 2 values, the
    mean None with none (an infeasible budget in every run)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        return (float(v.mean()) if n else None), None, n
    half = t_quantile(0.975, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return float(v.mean()), half, n


def verdict(mean: float, half: float | None) -> str:
    if half is None:
        return "n/a"
    if mean - half > 0:
        return "win"
    if mean + half < 0:
        return "loss"
    return "tie"


def _speedup(r: dict) -> float | None:
    md = r["cascade"].get("max_drop")
    return None if md is None else md["speedup"]


METRICS = (
    ("average exit", lambda r: float(np.mean(r["exit_accuracy"]))),
    ("final exit", lambda r: r["exit_accuracy"][-1]),
    *((f"cascade {p}%", lambda r, p=p: r["cascade"]["accuracy"].get(str(p))) for p in BUDGET_PCTS),
    ("speed-up @0.5pt", _speedup),  # a ratio, not an accuracy (see _cell)
)
RATIO_METRICS = ("speed-up @0.5pt",)
COMPARISONS = (("mlcsd", "sd"), ("mlcsd", "ce"))


def comparisons(methods) -> list[tuple[str, str]]:
    """The first grid's two questions, then every other method against CE."""
    pairs = [(a, b) for a, b in COMPARISONS if a in methods and b in methods]
    return pairs + [(m, "ce") for m in methods if m != "ce" and "ce" in methods and (m, "ce") not in pairs]


def load_runs(out: Path) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(str(out / "*" / "*" / "seed*.json"))):
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ScienceError(f"{path} is not readable JSON ({e})") from None
        if not isinstance(run, dict) or run.get("format") != FORMAT:
            raise ScienceError(f"{path} is not a science run (format {FORMAT})")
        runs.append(run)
    if not runs:
        raise ScienceError(f"no finished runs under {out} (OUT/<regime>/<method>/seed<k>.json): run the grid first")
    return runs


def _values(runs: list[dict], metric) -> dict[int, float]:
    return {r["seed"]: metric(r) for r in runs if metric(r) is not None}


def summarise(runs: list[dict]) -> dict:
    """Per regime: per method the mean ± half-width of every metric; the paired differences."""
    by: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        by.setdefault(r["regime"], {}).setdefault(r["method"], []).append(r)
    out = {}
    for regime, methods in by.items():
        cells = {}
        for m, rs in methods.items():
            cells[m] = {name: mean_interval(list(_values(rs, f).values())) for name, f in METRICS}
        pairs = {}
        for a, b in comparisons(list(methods)):
            row = {}
            for name, f in METRICS:
                va, vb = _values(methods[a], f), _values(methods[b], f)
                seeds = sorted(set(va) & set(vb))
                mean, half, n = mean_interval([va[s] - vb[s] for s in seeds])
                row[name] = {"mean": mean, "half": half, "n": n, "seeds": seeds, "verdict": verdict(mean, half)}
            pairs[f"{a} - {b}"] = row
        config = methods[next(iter(methods))][0]["config"]
        out[regime] = {"methods": cells, "paired": pairs, "config": config, "training": training_cost(methods)}
    return out


def training_cost(methods: dict[str, list[dict]]) -> dict:
    """Per method: training seconds per run (mean ± 95 % half-width), images/s, and the throughput against CE
    paired by seed (CE's seconds over the method's: a run-to-run ratio under whatever load each run saw)."""
    out = {}
    ce = {r["seed"]: r["seconds"]["train"] for r in methods.get("ce", []) if not r["seconds"].get("training_resumed")}
    for m, rs in methods.items():
        fresh = [r for r in rs if not r["seconds"].get("training_resumed") and r["seconds"]["train"] > 0]
        secs = [r["seconds"]["train"] for r in fresh]
        seen = [(r["config"]["images"] or 55000) * r["config"]["epochs"] / r["seconds"]["train"] for r in fresh]
        ratios = [ce[r["seed"]] / r["seconds"]["train"] for r in fresh if r["seed"] in ce]
        mean, half, n = mean_interval(secs)
        out[m] = {
            "train_s": {"mean": mean, "half_width_95": half, "n": n},
            "images_per_s": float(np.mean(seen)) if seen else None,
            "throughput_vs_ce": float(np.exp(np.mean(np.log(ratios)))) if ratios else None,  # geometric mean
            "paired_with_ce": len(ratios),
        }
    return out


def _pct(mean: float | None, half: float | None, n: int, signed: bool = False, scale: float = 100) -> str:
    if mean is None:
        return "–"
    s = f"{scale * mean:+.2f}" if signed else f"{scale * mean:.2f}"
    return f"{s} (n=1)" if half is None else f"{s} ± {scale * half:.2f}"


def _cell(name: str, v: tuple) -> str:
    """A metric's mean ± half-width: accuracies in %, ratios (the speed-up) as ×."""
    if name in RATIO_METRICS:
        return _pct(*v, scale=1) + ("" if v[0] is None else " ×")
    return _pct(*v)


def markdown(summary: dict, costmodel: dict | None, cost_models_used: list[str] | None = None) -> str:
    names = [name for name, _ in METRICS]
    lines = [
        "<!-- written by benchmarks/science.py report; accuracy in % on the Fashion-MNIST test split -->",
        "",
        "Mean ± half-width of the 95 % t-interval over seeds. Cascade: thresholds by `cross_fitted` on the "
        f"held-out frames at {_PCT_TEXT} % of the full model's latency (one shared cost model), accuracy on test.",
        "",
    ]
    if cost_models_used and len(cost_models_used) > 1:
        lines += [
            f"**Warning: the runs used {len(cost_models_used)} different cost models** (costmodel.json was "
            "re-measured during the grid): cascade accuracies are not all under identical costs.",
            "",
        ]
    if costmodel:
        lines += [
            f"Shared cost model: full model {costmodel['full_ms']:.3f} ms, cheapest cascade "
            f"{costmodel['min_ms']:.3f} ms ({costmodel['backend']}, {costmodel['threads']} thread, "
            f"{(costmodel.get('device') or {}).get('cpu', 'CPU')}). A budget below the cheapest cascade "
            "is infeasible and shows as –.",
            "",
        ]
    for regime, s in summary.items():
        c = s["config"]
        images = "all" if c["images"] is None else f"{c['images']:,}"
        noise = f", {100 * c['noise']:.0f} % symmetric label noise (training labels only)" if c["noise"] else ""
        lines += [f"### {regime}: {images} training images, {c['epochs']} epochs{noise}", ""]
        lines += ["| method | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for m, cells in s["methods"].items():
            n = max(v[2] for v in cells.values())
            lines.append(f"| {m} | {n} | " + " | ".join(_cell(k, cells[k]) for k in names) + " |")
        if s["paired"]:
            lines += ["", "| paired difference (pt) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for label, row in s["paired"].items():
                cells = []
                for k in names:
                    d = row[k]
                    if d["n"] == 0:
                        cells.append("–")
                    elif d["half"] is None:
                        cells.append(f"{(1 if k in RATIO_METRICS else 100) * d['mean']:+.2f} (n=1) n/a")
                    else:
                        sc = 1 if k in RATIO_METRICS else 100
                        lo, hi = sc * (d["mean"] - d["half"]), sc * (d["mean"] + d["half"])
                        cells.append(f"{sc * d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] **{d['verdict']}**")
                lines.append(f"| {label.replace(' - ', ' − ')} (n={row[names[0]]['n']}) | " + " | ".join(cells) + " |")
        lines += ["", *_training_lines(s.get("training") or {}), ""]
    return "\n".join(lines)


def _training_lines(cost: dict) -> list[str]:
    if not cost:
        return []
    lines = [
        "| training | runs | seconds per run | images/s | throughput vs CE (paired by seed) |",
        "|---|---|---|---|---|",
    ]
    for m, c in cost.items():
        t = c["train_s"]
        secs = (
            "–"
            if t["mean"] is None
            else f"{t['mean']:.0f}" + ("" if t["half_width_95"] is None else f" ± {t['half_width_95']:.0f}")
        )
        ips = "–" if c["images_per_s"] is None else f"{c['images_per_s']:.0f}"
        ratio = "–" if c["throughput_vs_ce"] is None else f"{c['throughput_vs_ce']:.2f}× (n={c['paired_with_ce']})"
        lines.append(f"| {m} | {t['n']} | {secs} | {ips} | {ratio} |")
    return lines


def plot(summary: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.6), dpi=120, squeeze=False)
    xs = [*BUDGET_PCTS, 100]
    for ax, (regime, s) in zip(axes[0], summary.items(), strict=True):
        for i, (m, cells) in enumerate(s["methods"].items()):
            keys = [*(f"cascade {p}%" for p in BUDGET_PCTS), "final exit"]
            mean = [np.nan if cells[k][0] is None else 100 * cells[k][0] for k in keys]
            err = [0 if cells[k][1] is None else 100 * cells[k][1] for k in keys]
            ax.errorbar([x + (i - 2) * 0.8 for x in xs], mean, yerr=err, marker="o", ms=3, capsize=2, label=m)
        ax.set_title(regime, fontsize=9)
        ax.set_xlabel("budget, % of full model (100: final exit)", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def cmd_report(args) -> int:
    from edgeexit.util import atomic_write_json, atomic_write_text

    out = Path(args.out)
    runs = load_runs(out)
    cm_path = out / "costmodel.json"
    costmodel = read_costmodel(cm_path) if cm_path.exists() else None
    summary = summarise(runs)
    used = sorted({r["cascade"].get("cost_model_sha256") or "?" for r in runs})
    keys = ("regime", "method", "seed", "exit_accuracy", "cascade", "seconds", "config", "label_noise", "budgeted")
    doc = {
        "schema": "runs: one entry per (regime, method, seed); exit_accuracy: per exit, 0-1, test split; "
        f"cascade.accuracy: calibrated cascade test accuracy at {_PCT_TEXT} % of the full model's latency (shared "
        "cost model, thresholds by cross_fitted on held-out frames); seconds: wall time per phase",
        "costmodel": costmodel,
        "cost_models_used": used,
        "runs": [{k: r.get(k) for k in keys} for r in runs],
        "summary": {
            regime: {
                "config": s["config"],
                "methods": {
                    m: {k: {"mean": v[0], "half_width_95": v[1], "n": v[2]} for k, v in cells.items()}
                    for m, cells in s["methods"].items()
                },
                "paired": s["paired"],
                "training": s["training"],
            }
            for regime, s in summary.items()
        },
    }
    if args.json:
        atomic_write_json(args.json, doc)
    text = markdown(summary, costmodel, used)
    if args.md:
        atomic_write_text(args.md, text)
    print(text)
    if args.plot:
        if plot(summary, args.plot):
            print(f"plot: {args.plot}")
        else:
            print("matplotlib is not installed: no plot")
    return 0


def _method_stepper(method: str, regime: Regime, seed: int = 0):
    """``run(n, start)``: n training steps of ``method`` as the trainer takes them (l2w's meta steps every
    meta_interval; a two-stage start's share of the steps in stage one) on random Fashion-MNIST-shaped batches."""
    import torch

    from edgeexit.models import MultiExitConfig, build_model
    from edgeexit.train.losses import build_task
    from edgeexit.train.trainer import TrainConfig, _optimizer

    base, _ = METHODS[method]
    loss = method_loss(method, regime)
    cfg = TrainConfig.from_recipe("fashion-mnist", base, out="unused", epochs=regime.epochs, width=regime.width,
                                  exits=regime.exits, **loss)  # fmt: skip
    r = cfg.recipe
    torch.manual_seed(seed)
    model = build_model(MultiExitConfig(exits=r.exits, width=r.width, in_chans=1, num_classes=10, input_size=[28, 28]))
    task = build_task(base, model, r.loss)
    opt = _optimizer(task, model, r)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(8, r.batch_size, 1, 28, 28, generator=g)
    ys = torch.randint(0, 10, (8, r.batch_size), generator=g)

    def run(n: int, start: int) -> None:
        for i in range(start, start + n):
            # i·37 mod 100 runs through every hundredth: stage one gets its share of any 20 steps in a row
            task.set_progress(regime.epochs * ((i * 37 % 100) / 100))
            x, y = xs[i % 8], ys[i % 8]
            out = task(x, y)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            if task.meta_due(i):
                task.meta_step(x, y, xs[(i + 1) % 8], ys[(i + 1) % 8], 0.02)

    return run


def cmd_throughput(args) -> int:
    """Training images/s of each method, interleaved: every round times ``--steps`` steps of each method in
    turn (1 thread), so each method's ratio to CE is read within a round, then summarised over rounds."""
    import torch

    from edgeexit.util import atomic_write_json

    torch.set_num_threads(1)
    regimes = REGIME_SETS[args.regime_set]
    regime = regimes[args.regime] if args.regime else next(iter(regimes.values()))
    methods = args.methods or list(regime.methods)
    steppers = {m: _method_stepper(m, regime) for m in methods}
    for run in steppers.values():  # warm-up (allocator, first meta step)
        run(args.steps // 2 + 10, 0)
    rows: dict[str, list[float]] = {m: [] for m in methods}
    batch = 32
    for k in range(args.rounds):
        order = methods if k % 2 == 0 else methods[::-1]
        for m in order:
            t0 = time.perf_counter()
            steppers[m](args.steps, k * args.steps)
            rows[m].append(args.steps * batch / (time.perf_counter() - t0))
    out = {"regime": regime.__dict__ | {"methods": list(regime.methods)}, "steps_per_round": args.steps,
           "rounds": args.rounds, "threads": 1, "loadavg_at_end": list(os.getloadavg()), "methods": {}}  # fmt: skip
    for m in methods:
        ratio = [a / b for a, b in zip(rows[m], rows.get("ce", rows[m]), strict=True)]
        mean, half, n = mean_interval(ratio)
        out["methods"][m] = {"images_per_s": rows[m], "median_images_per_s": float(np.median(rows[m])),
                             "vs_ce": {"mean": mean, "half_width_95": half, "n": n}}  # fmt: skip
        print(f"{m:20s} {np.median(rows[m]):7.1f} img/s   vs ce {mean:.3f} ± {half or 0:.3f} (n={n})")
    if args.json:
        atomic_write_json(args.json, out)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or continue) the grid")
    run.add_argument("--out", default="runs/science")
    run.add_argument("--regime-set", default="session", choices=sorted(REGIME_SETS))
    run.add_argument("--regimes", nargs="+", help="regimes of the set (default: all of it)")
    run.add_argument("--methods", nargs="+", help=f"of {', '.join(METHODS)} (default: each regime's own)")
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--shard", help="K/N: this process runs every N-th run starting at the K-th")
    run.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (profiling: always 1)")
    run.add_argument("--override", action="append", help="REGIME:key=value[,key=value] (e.g. low-data:epochs=10)")
    run.add_argument("--repeats", type=int, default=200, help="profiling repetitions per unit (the cost model)")
    run.add_argument("--costmodel", help="a cost model file to use or create (default OUT/costmodel.json)")
    run.add_argument("--keep-artifacts", action="store_true", help="keep each run's exported artifact")
    run.add_argument(
        "--statistics",
        choices=sorted(STATISTICS),
        default="onnx",
        help="exit statistics from every run's ONNX export (default) or from the PyTorch logits (no export per run)",
    )
    cm = sub.add_parser("costmodel", help="(re)measure the shared cost model from a checkpoint (quiet cores!)")
    cm.add_argument("--out", default="runs/science")
    cm.add_argument("--checkpoint", required=True, help="a model.pt of the grid's architecture")
    cm.add_argument("--repeats", type=int, default=200)
    cm.add_argument("--force", action="store_true", help="replace an existing OUT/costmodel.json")
    tp = sub.add_parser("throughput", help="training images/s of each method against CE, interleaved (quiet cores!)")
    tp.add_argument("--regime-set", default="cascade", choices=sorted(REGIME_SETS))
    tp.add_argument("--regime", help="the regime whose recipe and methods are timed (default: the set's first)")
    tp.add_argument("--methods", nargs="+", help=f"of {', '.join(METHODS)} (default: the regime's own)")
    tp.add_argument("--steps", type=int, default=20, help="steps per method per round")
    tp.add_argument("--rounds", type=int, default=5)
    tp.add_argument("--json")
    rep = sub.add_parser("report", help="collect the finished runs into JSON, a markdown table and a plot")
    rep.add_argument("--out", default="runs/science")
    rep.add_argument("--json")
    rep.add_argument("--md")
    rep.add_argument("--plot")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from edgeexit.errors import UserError
    except ImportError:  # pragma: no cover - run outside the project's environment
        print("error: edgeexit is not importable: run with the project's .venv", file=sys.stderr)
        return 2
    try:
        commands = {"run": cmd_run, "report": cmd_report, "costmodel": cmd_costmodel, "throughput": cmd_throughput}
        return commands[args.command](args)
    except (ScienceError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
