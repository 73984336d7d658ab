"""`edgeexit` command line: train, eval, export, engines, calibrate, run, bench, info, quickstart.

Heavy libraries (torch, onnx, onnxruntime, tensorrt, cv2, matplotlib) are imported inside the
commands, so `edgeexit --help` is fast and works without the optional extras.
Exit codes: 0 success, 1 failure while working, 2 bad usage or bad input (one-line reason).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperCommand

from edgeexit import __version__
from edgeexit.errors import UserError
from edgeexit.util import esc


def _flags_without_type() -> None:
    """Typer's rich help prints a flag (--quiet, --force, --version) with the type column ``<bool>``, as
    if it took a value; a flag takes none, so its type column is left empty (only the help changes)."""
    from typer.core import TyperOption

    show = getattr(TyperOption, "display_type_rich", None)
    if show is None or getattr(show, "_edgeexit", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and not getattr(self, "count", False) else show(self, ctx)

    display_type_rich._edgeexit = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_type()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Train multi-exit image classifiers and run them as early-exit cascades calibrated on your device to a "
    "latency budget or an accuracy promise.\n\n"
    "Flow: [bold]train[/] → model.pt → [bold]export[/] → NAME.edgeexit/ → [bold]calibrate[/] --budget 5ms → "
    "[bold]run[/] / Cascade in your app. [bold]quickstart[/] does all of it on Fashion-MNIST.",
)


# stdout carries data (tables, per-frame lines, JSON) made of class names, file names and paths:
# markup off, so every such string prints as given. stderr keeps markup for edgeexit's own styling;
# every foreign string put into a stderr message goes through `edgeexit.util.esc`.
class _Console(Console):
    """A console that never fails on a message: text that is not valid markup (a foreign ``[/]`` a job
    put into a progress line without `esc`) prints as given instead of raising MarkupError."""

    def print(self, *objects, **kwargs) -> None:
        from rich.errors import MarkupError

        try:
            super().print(*objects, **kwargs)
        except MarkupError:
            super().print(*objects, **{**kwargs, "markup": False})


console = _Console(stderr=True)
out_console = _Console(markup=False)


def _fail(code: int, message: str) -> None:
    from rich.text import Text

    # a Text, never markup: the message (paths, option values, class names) prints as given
    console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _outputs(**paths) -> None:
    """Refuse every output file option (--json, --plot, --save-video ...) before the work starts:
    a folder, a device node or a FIFO there is exit 2 with its option named, and nothing is touched."""
    from edgeexit.util import check_output_path

    for option, path in paths.items():
        if path is not None:
            check_output_path(path, "--" + option.replace("_", "-"))


def command(fn):
    """Turn expected failures into one-line messages: UserError → exit 2, anything else → exit 1.

    Set EDGEEXIT_DEBUG=1 to see the traceback of an unexpected failure.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as e:
            _fail(2, str(e))
        except KeyboardInterrupt:
            _fail(1, "interrupted")
        except Exception as e:
            if os.environ.get("EDGEEXIT_DEBUG"):
                raise
            from edgeexit.errors import describe

            _fail(1, describe(e))

    return wrapper


def _check_device(device: str) -> None:
    """--device before any work: auto, cpu, cuda or cuda:N with N a GPU torch sees (mps, meta, cpu:5
    are refused in one line, not found deep inside torch)."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", device):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'")
    if device.startswith("cuda:"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device[5:]) >= count:
            raise UserError(f"--device {device}: torch sees {count} CUDA device(s) (cuda:0..cuda:{max(count - 1, 0)})")


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


RESNET18_PARAMS = 11.2e6  # at width 1.0; parameters grow with width squared


def _check_width(width: float | None) -> None:
    """--width whose weights, gradients and optimizer state (16 bytes a parameter) cannot fit in
    half the memory available is refused before anything is allocated."""
    import math

    if width is None:
        return
    if not (math.isfinite(width) and width > 0):
        raise UserError(f"--width must be a positive number, got {width}")
    need = RESNET18_PARAMS * width * width * 16
    have = _available_memory()
    if need > have / 2:
        raise UserError(
            f"--width {width:g} needs about {need / 2**30:.0f} GiB for the weights and optimizer state alone; "
            f"this machine has {have / 2**30:.0f} GiB available (ResNet18 is width 1.0)"
        )


def _check_training(json_out: Path | None, device: str, width: float | None, out: Path) -> None:
    """`train`'s mistakes found before the first epoch: --json, --device, --width, and a run folder
    (--out) that cannot take model.pt (a file or /dev/null in the way, read-only)."""
    from edgeexit.util import check_output_path

    _outputs(json=json_out)
    _check_device(device)
    _check_width(width)
    for name in ("model.pt", "last.pt"):
        check_output_path(out / name, f"--out {out}:")


def _write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    from edgeexit.util import atomic_write_text, strict_json

    atomic_write_text(path, strict_json(payload))
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)  # a path stays one line


def _parse_budget(text: str) -> tuple[float | None, float | None]:
    """(ms, None) or (None, share of the full model's latency) for every ``--budget``."""
    from edgeexit.util import parse_budget

    return parse_budget(text) if text else (None, None)


def _run_budget_ms(artifact: Path, budget: str) -> float | None:
    """`run --budget`: a time, or a share of the full model's latency that calibrate predicted, with
    calibrate's meaning: when calibrate measured a frame size (--frame-size), the budget covers the
    frame, and the cascade (what the controller holds) gets it less the measured preprocessing."""
    budget_ms, fraction = _parse_budget(budget)
    if budget_ms is None and fraction is None:
        return None
    from edgeexit.runtime.artifact import Artifact

    cal = Artifact.load(artifact).calibration  # the frame's preprocessing checked there: a number of ms >= 0
    frame = cal.frame if cal is not None else None
    pre = frame.preprocess if frame is not None and frame.covers_frame else None
    frame_ms = (pre.of(cal.metric) or 0.0) if pre is not None and cal is not None else 0.0
    if fraction is not None:
        full = cal.full_model_ms if cal is not None else None
        if full is None:
            raise UserError(f"--budget {budget} is a share of the full model's latency, which calibrate records: "
                            "calibrate this artifact first, or give a time (5ms)")  # fmt: skip
        budget_ms = fraction * (full + frame_ms)
    if frame_ms and frame is not None:
        size = "x".join(str(v) for v in frame.size)
        if budget_ms - frame_ms <= 0:
            raise UserError(f"--budget {budget} is used up by converting a {size} frame ({frame_ms:.3f} ms when "
                            "calibrated) before the cascade starts: give more time")  # fmt: skip
        console.print(f"budget {budget_ms:.3f} ms per {size} frame: {frame_ms:.3f} ms preprocessing (as calibrated), "
                      f"{budget_ms - frame_ms:.3f} ms for the cascade", markup=False, highlight=False)  # fmt: skip
        budget_ms -= frame_ms
    return budget_ms


# Earlier spellings of renamed options, per command: they still work (rewritten to the one name
# before parsing, with a one-line note on stderr), so scripts written against them keep running.
RENAMED = {
    "train": {"--limit-train": "--train-images", "--limit-eval": "--eval-images"},
    "eval": {"--limit-eval": "--images"},
    "export": {"--parity-samples": "--parity-images"},
    "calibrate": {"--limit": "--images", "--verify-limit": "--verify-images"},
    "quickstart": {"--limit-train": "--train-images"},
}


def renamed_args(command: str, args: list[str]) -> list[str]:
    """``args`` with each earlier spelling of an option (``RENAMED``) replaced by its one name
    (``--old=V`` too, nothing after ``--``); one note per spelling used."""
    table, out, noted = RENAMED.get(command, {}), [], set()
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        old, eq, value = arg.partition("=")
        if old in table:
            if old not in noted:
                noted.add(old)
                console.print(f"note: {old} is now {table[old]} (the old spelling still works)", highlight=False)
            arg = table[old] + eq + value
        out.append(arg)
    return out


class _RenamedOptions(TyperCommand):
    """A command that still accepts the earlier spellings of its renamed options (`RENAMED`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, renamed_args(self.name or "", args))


def _load_cascade(artifact: Path, backend: str, precision: str | None, **options):
    """`run` and `bench`: the artifact's cascade on --backend, at --precision when given (else the
    backend's default), with its backend's reason printed."""
    from edgeexit.runtime import Cascade

    cascade = Cascade.load(artifact, backend=backend, **options, **({"precision": precision} if precision else {}))
    console.print(f"backend {cascade.runner.info.name} ({cascade.backend_info['why']})", highlight=False, markup=False)
    return cascade


def version_callback(value: bool) -> None:
    if value:
        out_console.print(f"edgeexit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


DataOpt = Annotated[
    str,
    typer.Option(
        "--data", help="fashion-mnist, cifar10, cifar100, tiny-imagenet, or a path to an ImageFolder (class folders)."
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Where datasets live (Fashion-MNIST is also found in /usr/share/datasets/fashion-mnist)."
    ),
]
Int8Opt = Annotated[
    bool,
    typer.Option(
        "--int8", help="Also write INT8 Q/DQ units (static quantization), checked per exit against FP32 accuracy."
    ),
]
Int8ImagesOpt = Annotated[int, typer.Option("--int8-images", help="Held-out images that calibrate INT8.")]
Int8MethodOpt = Annotated[
    str, typer.Option("--int8-method", help="INT8 activation ranges: minmax, entropy or percentile.")
]
PrecisionOpt = Annotated[
    str | None, typer.Option(help="Units to run: fp32, int8 (after export --int8), fp16 (TensorRT); default fp32.")
]
BACKEND_HELP = (
    "auto (TensorRT engines on a GPU, else ONNX Runtime), tensorrt, onnxruntime, onnxruntime-cuda, "
    "onnxruntime-cpu, torch."
)
BackendOpt = Annotated[str, typer.Option("--backend", help=BACKEND_HELP)]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device: auto, cpu, cuda or cuda:N.")]
ProfileBatchOpt = Annotated[
    int, typer.Option("--batch-opt", help="Batch the TensorRT profile is tuned for (1: camera, frame by frame).")
]
CalibImagesOpt = Annotated[
    int,
    typer.Option(
        "--calib-images",
        help="Held-out images stored in the artifact (uint8) so `calibrate` needs no torch or dataset; 0: none.",
    ),
]
BudgetOpt = Annotated[
    str,
    typer.Option(
        help="Latency budget per image: 5ms, 800us, 0.005s, or 50% (of the full model's latency measured here)."
    ),
]
MaxDropOpt = Annotated[
    str,
    typer.Option(
        "--max-drop",
        help="Fastest plan losing at most this much accuracy vs the full model on new images, with "
        "--confidence: 0.5pt or 0.005. With --budget: the cheapest plan meeting both.",
    ),
]
ExitsOpt = Annotated[
    int | None,
    typer.Option(
        help="8 = paper layout (two taps per stage), 4 = stage outputs, 9 = paper layout plus a cheap first "
        "exit inside block 1 (stem + one conv: the low-latency end)."
    ),
]
StemOpt = Annotated[
    str | None,
    typer.Option(
        help="cifar (3x3 conv, no max-pool; the paper's) or imagenet (torchvision ResNet18's 7x7 + max-pool)."
    ),
]
ImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", help="ImageFolder training size (default: 32 cifar, 224 imagenet stem).")
]
InitOpt = Annotated[
    str | None,
    typer.Option(
        help="Start the backbone from a torchvision state_dict: ResNet18's (e.g. resnet18-f37072fd.pth from "
        "~/.cache/torch/hub/checkpoints), or with --backbone that architecture's (your fine-tuned network); "
        "implies the fine-tuning recipe. Nothing is downloaded."
    ),
]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="dataset (the training images' mean/std), imagenet (ImageNet's: the default with --init) or MEAN/STD "
        "on the 0..1 pixel scale, one value or one per channel (0.5/0.25, 0.49,0.48,0.45/0.25,0.24,0.26): what "
        "your --init network was trained with.",
    ),
]
BackboneOpt = Annotated[
    str | None,
    typer.Option(
        help="A torchvision network with exits at its stage boundaries: resnet18/34/50, mobilenet_v2, "
        "mobilenet_v3_small/large, efficientnet_b0/b1/b2, regnet_y_400mf/800mf, convnext_tiny (default: "
        "the multi-exit ResNet18 of --exits/--stem)."
    ),
]
ExitLayoutOpt = Annotated[
    str, typer.Option("--exit-layout", help="With --backbone: stages (one exit per stage) or dense.")
]
FreezeTrunkOpt = Annotated[
    bool,
    typer.Option(
        "--freeze-trunk",
        help="With --backbone and --init: train only the early exits; the final exit stays your network.",
    ),
]
AdaptThreadsOpt = Annotated[
    bool,
    typer.Option(
        "--adapt-threads/--fixed-threads",
        help="On CPU, drop to one thread while other processes want the cores (fixed: bit-exact runs).",
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        help="ce (every exit on the labels; the default, docs/results.md), sd, byot, mlcsd, or l2w (CE with "
        "meta-learned sample weights for the exits a --target-budget cascade hands each image)."
    ),
]
TwoStageOpt = Annotated[
    float | None,
    typer.Option("--two-stage", help="Epochs of trunk + final exit only before training every exit (any method)."),
]
GradientEquilibriumOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-equilibrium", help="The trunk gets the mean, not the sum, of the exits' gradients (IMTA)."
    ),
]
DistillGateOpt = Annotated[
    float | None,
    typer.Option(
        "--distill-gate", help="sd/byot/mlcsd: distil only on batches whose teacher's mean confidence is this."
    ),
]
TargetBudgetOpt = Annotated[
    str | None,
    typer.Option("--target-budget", help="l2w: the budget the weights train for, a share of the full model (50%)."),
]
MetaIntervalOpt = Annotated[
    int | None, typer.Option("--meta-interval", help="l2w: steps between updates of the weight net (default 10).")
]
TeacherWeightsOpt = Annotated[
    str | None,
    typer.Option("--teacher-weights", help="mlcsd: 'learned' (default) or 'frozen' (the authors' released code)."),
]
ValSizeOpt = Annotated[
    int | None,
    typer.Option("--val-size", help="Held-out images taken from the training set for model selection and calibration."),
]
TrainImagesOpt = Annotated[
    int | None, typer.Option("--train-images", help="Train on the first N training images only.")
]
EvalImagesOpt = Annotated[
    int | None, typer.Option("--eval-images", help="Validate every epoch on the first N held-out images only.")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="ImageFolder: a bad image file (corrupt, truncated, ...) is an error, not skipped."),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="ImageFolder: where large sets are decoded once (default ~/.cache/edgeexit/datasets; "
        "$EDGEEXIT_CACHE_DIR). On several nodes, a folder on the shared filesystem.",
    ),
]


@app.command(cls=_RenamedOptions)
@command
def train(
    data: DataOpt = "fashion-mnist",
    method: MethodOpt = "ce",
    exits: ExitsOpt = None,
    width: Annotated[float | None, typer.Option(help="Channel width multiplier (1.0 = ResNet18).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (recipe default: 240 paper, 2 Fashion-MNIST).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Batch size per process.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (SGD, momentum 0.9).")] = None,
    teacher_weights: TeacherWeightsOpt = None,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature T.")] = None,
    alpha: Annotated[float | None, typer.Option(help="KD weight α.")] = None,
    beta: Annotated[float | None, typer.Option(help="Feature weight β.")] = None,
    gamma: Annotated[float | None, typer.Option(help="Weight of the non-final exits' CE (γ).")] = None,
    val_size: ValSizeOpt = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Random crop + flip.")] = None,
    train_images: TrainImagesOpt = None,
    eval_images: EvalImagesOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for weights, split, shuffling and augmentation.")] = 0,
    device: DeviceOpt = "auto",
    out: Annotated[Path, typer.Option(help="Run folder: model.pt (best) and last.pt (resume).")] = Path("runs/exp"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt exactly.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a run already in OUT.")] = False,
    adapt_threads: AdaptThreadsOpt = True,
    stem: StemOpt = None,
    image_size: ImageSizeOpt = None,
    init: InitOpt = None,
    normalize: NormalizeOpt = None,
    backbone: BackboneOpt = None,
    exit_layout: ExitLayoutOpt = "stages",
    freeze_trunk: FreezeTrunkOpt = False,
    data_dir: DataDirOpt = None,
    strict: StrictOpt = False,
    cache_dir: CacheDirOpt = None,
    dist_timeout: Annotated[
        float, typer.Option(help="torchrun: minutes the processes wait for each other (torch's default: 30).")
    ] = 5.0,
    two_stage: TwoStageOpt = None,
    gradient_equilibrium: GradientEquilibriumOpt = False,
    distill_gate: DistillGateOpt = None,
    target_budget: TargetBudgetOpt = None,
    meta_interval: MetaIntervalOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Train a multi-exit ResNet18 (or a torchvision --backbone) with MLCSD or a baseline; writes OUT/model.pt.

    Example: edgeexit train --data fashion-mnist --method mlcsd --exits 8 --width 0.25 --epochs 2 --out runs/x
    """
    _check_training(json_out, device, width, out)
    from edgeexit.train.trainer import TrainConfig

    options = dict(  # each flag under its TrainConfig / Recipe / LossConfig name (validated once there)
        exits=exits, width=width, epochs=epochs, batch_size=batch_size, lr=lr, teacher_weights=teacher_weights,
        temperature=temperature, alpha=alpha, beta=beta, gamma=gamma, val_size=val_size, augment=augment,
        train_images=train_images, eval_images=eval_images, seed=seed, device=device, out=out, resume=resume,
        force=force, adapt_threads=adapt_threads, stem=stem, image_size=image_size, init=init, normalize=normalize,
        data_dir=data_dir, strict=strict, cache_dir=cache_dir, backbone=backbone, exit_layout=exit_layout,
        dist_timeout=dist_timeout, freeze_trunk=freeze_trunk, two_stage=two_stage,
        gradient_equilibrium=gradient_equilibrium or None, distill_gate=distill_gate, meta_interval=meta_interval,
        target_budget=None if target_budget is None else _parse_share("--target-budget", target_budget))  # fmt: skip
    _train_and_report(TrainConfig.from_recipe(data, method, **options), out, json_out)


def _train_and_report(cfg, out: Path, json_out: Path | None) -> None:
    from edgeexit.train.trainer import TrainingError
    from edgeexit.train.trainer import train as run_train

    try:
        result = run_train(cfg, console=console)
    except TrainingError as e:
        _fail(1, str(e))
    if result["rank"] == 0:
        _report_training(result, out, json_out)


def _parse_share(name: str, text: str) -> float:
    """'50%' or '0.5' -> 0.5 (the range is checked where the option is defined)."""
    t = text.strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"cannot read {name} '{text}': write it like 50% or 0.5") from None


def _report_training(result: dict, out: Path, json_out: Path | None) -> None:
    last = result["history"][-1] if result["history"] else {}
    console.print(
        f"[green]done[/]: {esc(out / 'model.pt')}  best held-out average {result['best_val_average']:.4f}, "
        f"final exit {last.get('val_exit_accuracy', [float('nan')])[-1]:.4f}, "
        f"{result['images_per_s']:.0f} img/s"
    )
    _write_json(json_out, result)


@app.command("eval", cls=_RenamedOptions)
@command
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="model.pt written by `edgeexit train`.")],
    data: Annotated[str | None, typer.Option("--data", help="Dataset (default: the one it was trained on).")] = None,
    images: Annotated[int | None, typer.Option("--images", help="Evaluate on the first N test images.")] = None,
    device: DeviceOpt = "auto",
    plot: Annotated[Path | None, typer.Option(help="Write the budgeted-batch curve as a PNG here.")] = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Anytime accuracy of every exit and the MSDNet budgeted-batch curve on the test split.

    Thresholds for the budgeted curve are chosen on the held-out split recorded in the checkpoint.
    """
    _outputs(plot=plot, json=json_out)
    _check_device(device)
    from edgeexit.train.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data, images, device, data_dir)
    from edgeexit.train.report import budgeted_plot, eval_table

    out_console.print(eval_table(result))
    if plot:
        budgeted_plot(result, plot)
        console.print(f"wrote {plot}", markup=False, highlight=False, soft_wrap=True)
    _write_json(json_out, result)


@app.command(cls=_RenamedOptions)
@command
def export(
    checkpoint: Annotated[Path, typer.Argument(help="model.pt written by `edgeexit train`.")],
    out: Annotated[
        Path | None, typer.Option(help="Artifact folder (default: model.edgeexit beside the checkpoint).")
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx (ONNX files only) or engine (ONNX + one TensorRT plan per unit; needs tensorrt and a GPU).",
        ),
    ] = "onnx",
    half: Annotated[bool, typer.Option("--half", help="Build FP16 TensorRT engines.")] = False,
    batch: Annotated[
        int, typer.Option(help="Largest batch of the TensorRT optimisation profile (--format engine).")
    ] = 64,
    batch_opt: ProfileBatchOpt = 1,
    workspace: Annotated[float, typer.Option(help="TensorRT builder workspace in GiB (--format engine).")] = 2.0,
    opset: Annotated[int, typer.Option(help="ONNX opset (17-20).")] = 17,
    simplify: Annotated[
        bool, typer.Option("--simplify/--no-simplify", help="Simplify each unit with onnxslim.")
    ] = True,
    parity_images: Annotated[int, typer.Option("--parity-images", help="Held-out images for the parity check.")] = 256,
    tolerance: Annotated[float, typer.Option(help="Max abs logit difference ONNX Runtime vs PyTorch.")] = 1e-3,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a previous edgeexit artifact at OUT (never any other folder).")
    ] = False,
    calib_images: CalibImagesOpt = 5000,
    int8: Int8Opt = False,
    int8_images: Int8ImagesOpt = 512,
    int8_method: Int8MethodOpt = "minmax",
    int8_tolerance: Annotated[
        float,
        typer.Option("--int8-tolerance", help="Largest per-exit accuracy drop INT8 vs FP32 (a fraction) that passes."),
    ] = 0.01,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Split the model into per-stage units, write one ONNX file per unit, check parity, build engines.

    The artifact is a folder with manifest.json, seg_KK.onnx and head_KK.onnx (and *.engine). It is
    written to a temporary folder and renamed at the end, so a failed export leaves nothing behind.
    """
    _outputs(json=json_out)
    from edgeexit.export.exporter import export_checkpoint

    options = dict(  # each flag under its own name (ExportOptions validates them, once)
        out=out, format=format, half=half, batch=batch, batch_opt=batch_opt, workspace=workspace, opset=opset,
        simplify=simplify, parity_images=parity_images, tolerance=tolerance, force=force, calib_images=calib_images,
        int8=int8, int8_images=int8_images, int8_method=int8_method, int8_tolerance=int8_tolerance,
        data_dir=str(data_dir) if data_dir else None)  # fmt: skip
    manifest, path = export_checkpoint(checkpoint, console=console, **options)
    from edgeexit.export.report import info_table
    from edgeexit.runtime.artifact import Artifact

    out_console.print(info_table(Artifact.load(path)))
    console.print(f"[green]exported[/] {esc(path)}", soft_wrap=True)
    _write_json(json_out, {"artifact": str(path), "manifest": manifest})


@app.command()
@command
def engines(
    artifact: Annotated[Path, typer.Argument(help="NAME.edgeexit folder written by `edgeexit export`.")],
    half: Annotated[bool, typer.Option("--half", help="FP16 engines (from the artifact's onnx_fp16 units).")] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="INT8 engines (from the artifact's TensorRT Q/DQ units, onnx_int8_trt).")
    ] = False,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch of the optimisation profile.")] = 64,
    batch_opt: ProfileBatchOpt = 1,
    workspace: Annotated[float, typer.Option(help="TensorRT builder workspace in GiB.")] = 2.0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild engines that already run here.")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Build this device's TensorRT engines from the artifact alone (no torch, checkpoint or dataset).

    Plans come from the artifact's own ONNX units (export them on a desktop with --half / --int8 for
    those flavours), are checked exit by exit against the FP32 units on the stored calibration frames
    (CUDA graphs off and on), and only then written into the artifact. Needs TensorRT and cuda-python.
    """
    _outputs(json=json_out)
    from edgeexit.export.tensorrt import build_artifact_engines

    console.print(f"[bold]engines[/] {esc(str(artifact))}")
    gate = build_artifact_engines(
        artifact, half=half, int8=int8, max_batch=max_batch, opt_batch=batch_opt, workspace_gib=workspace,
        force=force, console=console)  # fmt: skip
    console.print(f"[green]engines built[/] {esc(str(artifact))} ({gate['precision']}, gate passed)")
    _write_json(json_out, gate)


FrameSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--frame-size",
        help="WIDTHxHEIGHT of the frames your app passes (e.g. 1920x1080): their preprocessing is measured "
        "here and the budget covers it too. Without it the budget covers the cascade on network-size frames.",
    ),
]
RestoreOpt = Annotated[
    bool,
    typer.Option(
        "--restore",
        help="Put back the calibration the last calibrate replaced (kept in calibration.previous.json); "
        "the current one is kept there instead.",
    ),
]
VerifyImagesOpt = Annotated[
    int | None, typer.Option("--verify-images", help="At most N verification images (default: the whole half).")
]
ProfileRepeatsOpt = Annotated[
    int,
    typer.Option(
        help="Timed calls per piece of the cost model, in interleaved rounds of 4 (at least 24 rounds); "
        "the quietest third of the rounds sets the costs."
    ),
]
RepeatOpt = Annotated[
    int,
    typer.Option(
        "--repeat",
        help="Profile up to N times while the device is too busy to trust a profile (other processes on "
        "the cores: the fastest profiling rounds disagree), pooling the tries' rounds. calibrate says how "
        "busy the device was either way.",
    ),
]
AcceptLoadOpt = Annotated[
    bool,
    typer.Option(
        "--accept-load",
        help="Write the plan even when the device stayed too busy to calibrate reliably; the report's "
        "load block records it. Better: calibrate when the device is as quiet as it runs.",
    ),
]


@app.command(cls=_RenamedOptions)
@command
def calibrate(
    artifact: Annotated[Path, typer.Argument(help="NAME.edgeexit folder written by `edgeexit export`.")],
    budget: BudgetOpt = "",
    max_drop: MaxDropOpt = "",
    confidence: Annotated[float, typer.Option(help="Confidence of the --max-drop promise.")] = 0.95,
    precision: PrecisionOpt = None,
    metric: Annotated[str, typer.Option(help="Budget on the mean or the p95 latency.")] = "mean",
    backend: BackendOpt = "auto",
    data: Annotated[
        str | None, typer.Option("--data", help="Dataset (default: the one the model was trained on).")
    ] = None,
    split: Annotated[str, typer.Option(help="heldout (the training run's held-out split) or test.")] = "heldout",
    images: Annotated[int | None, typer.Option("--images", help="Use at most N images per calibration half.")] = None,
    verify_images: VerifyImagesOpt = None,
    repeats: ProfileRepeatsOpt = 200,
    policy: Annotated[str, typer.Option(help="Confidence: max_softmax, margin or entropy.")] = "max_softmax",
    plot: Annotated[
        Path | None, typer.Option(help="PNG of accuracy vs latency (default: ARTIFACT/calibration.png).")
    ] = None,
    data_dir: DataDirOpt = None,
    frame_size: FrameSizeOpt = None,
    repeat: RepeatOpt = 1,
    accept_load: AcceptLoadOpt = False,
    restore: RestoreOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Measure latency on this device, then choose exit thresholds: the most accurate within --budget,
    or the fastest certified within --max-drop of the full model, or both.

    Every stored held-out frame decides: the budget mode picks optimiser, MSDNet thresholds or the full
    model out of fold (5-fold cross-fitting); --max-drop is a fixed-sequence test at --confidence. The
    verification frames are also run through the real cascade end to end for the measured latency. The
    result, with the certifiable frontier, is written into the artifact's manifest.
    """
    from edgeexit.calibrate.report import calibration_table
    from edgeexit.calibrate.run import run_calibration

    _outputs(plot=plot, json=json_out)
    if restore:
        _restore_calibration(artifact, budget or max_drop)
        return
    if not budget and not max_drop:
        raise UserError("give --budget (e.g. 5ms or 50%), --max-drop (e.g. 0.5pt), or both")
    budget_ms, fraction = _parse_budget(budget)
    from edgeexit.calibrate.options import parse_frame_size

    result = run_calibration(
        artifact, budget_ms=budget_ms, budget_fraction=fraction, confidence=confidence,
        frame_size=parse_frame_size(frame_size) if frame_size else None,
        max_drop=_parse_drop(max_drop) if max_drop else None, precision=precision, metric=metric, backend=backend,
        data=data, split=split,
        images=images, verify_images=verify_images, repeats=repeats, policy=policy, repeat=repeat,
        accept_load=accept_load, data_dir=str(data_dir) if data_dir else None, plot=plot,
        console=console)  # fmt: skip
    out_console.print(calibration_table(result))
    _write_json(json_out, result)


def _restore_calibration(artifact: Path, goal: str) -> None:
    from edgeexit.calibrate.history import describe, restore

    if goal:
        raise UserError("--restore puts an earlier calibration back: give it without --budget or --max-drop")
    restored, replaced = restore(artifact)
    console.print(f"restored: {describe(restored)}", markup=False, highlight=False, soft_wrap=True)
    if replaced is not None:
        console.print(
            f"kept instead: {describe(replaced)} (--restore again puts it back)",
            markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def _parse_drop(text: str) -> float:
    """'0.5pt' (percentage points) or '0.005' (a fraction) → 0.005."""
    t = text.strip().lower()
    scale = 0.01 if t.endswith(("pt", "%")) else 1.0
    t = t.removesuffix("pt").removesuffix("%").strip()
    try:
        value = float(t) * scale
    except ValueError:
        raise UserError(f"cannot read --max-drop '{text}': write it like 0.5pt or 0.005") from None
    if not 0 <= value < 1:  # NaN fails too
        raise UserError(f"--max-drop must be within 0pt..100pt, got '{text}'")
    return value


RunDriftOpt = Annotated[
    bool,
    typer.Option(
        "--drift/--no-drift",
        help="Warn when the frames stop looking like the calibration frames (a label-free e-detector per "
        "stream; docs/design.md).",
    ),
]
RunDriftAlphaOpt = Annotated[
    float,
    typer.Option("--drift-alpha", help="At most one false drift alarm per 1/α sampled frames, on average."),
]
RunDriftEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--drift-every",
        help="Give the drift monitor every N-th frame (default: every frame of a folder of images; every 10th "
        "of a video file, camera or URL, whose neighbouring frames are alike).",
    ),
]
RunJsonlOpt = Annotated[
    Path | None,
    typer.Option(
        "--jsonl",
        help="Write one JSON line per frame, flushed as it is classified: source, frame, class, label, "
        "confidence, exit, preprocess_ms, cascade_ms, total_ms.",
    ),
]
RunBudgetOpt = Annotated[
    str,
    typer.Option(
        help="Hold the mean latency at this budget (5ms, 800us, 0.005s, or 50% of the full model's latency "
        "calibrate predicted) as the device drifts: moves along the calibration's plans."
    ),
]
RunRealtimeOpt = Annotated[
    bool,
    typer.Option(
        "--realtime", help="Play video files at their frame rate, as a camera would: keep only the newest frame."
    ),
]


@app.command()
@command
def run(
    artifact: Annotated[Path, typer.Argument(help="NAME.edgeexit folder.")],
    source: Annotated[
        list[str] | None,
        typer.Option(
            help="A folder of images, a video file, a camera index (0) or a stream URL (rtsp://, http://); "
            "repeat it for several streams, batched together. Default: camera 0."
        ),
    ] = None,
    backend: BackendOpt = "auto",
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="Stop after N frames (per stream).")] = None,
    realtime: RunRealtimeOpt = False,
    fps: Annotated[
        float | None, typer.Option(help="Frame rate for --realtime video files (default: the file's).")
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (live sources).")] = None,
    deadline_ms: Annotated[float | None, typer.Option("--deadline-ms", help="Anytime deadline per frame.")] = None,
    budget: RunBudgetOpt = "",
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-frame lines.")] = False,
    precision: PrecisionOpt = None,
    save_video: Annotated[Path | None, typer.Option("--save-video", help="Write annotated frames to an .mp4.")] = None,
    drift: RunDriftOpt = True,
    drift_alpha: RunDriftAlphaOpt = 1e-4,
    drift_every: RunDriftEveryOpt = None,
    jsonl: RunJsonlOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Classify frames from folders, videos, cameras or stream URLs with the calibrated cascade.

    One folder or video: every frame in order, one line each. Cameras, URLs, --realtime videos or
    several sources: newest frame only per source (older ones counted as dropped), the newest frame
    of every stream run as one batch, a live table per stream. Ctrl-C ends with the summary.
    """
    _outputs(save_video=save_video, json=json_out, jsonl=jsonl)
    # OpenCV's own per-try warnings ("can't open camera by index") repeat what the run's reconnect
    # lines say; a user who set OPENCV_LOG_LEVEL keeps theirs
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    _run_job(artifact, source or ["0"], backend, max_frames, realtime, fps, duration, deadline_ms, budget, quiet,
             precision, save_video, (drift, drift_alpha, drift_every), jsonl, json_out)  # fmt: skip


def _run_job(
    artifact,
    sources,
    backend,
    max_frames,
    realtime,
    fps,
    duration,
    deadline_ms,
    budget,
    quiet,
    precision,
    save_video,
    drift_args,
    jsonl,
    json_out,
) -> None:
    """`run`'s work, after its options: one source in order, or several as streams."""
    from edgeexit.run import JsonLines, run_source, run_streams, summary_table, wants_streams

    drift, drift_alpha, drift_every = drift_args
    streamed = wants_streams(sources, realtime, fps, duration, save_video)  # refuses options that do not mix
    # consecutive frames of a video are nearly the same image, which the monitor's guarantee does not
    # allow for (every frame of a held scene gave ~7,000 false alarms per 10^6 where 100 were allowed):
    # a video read in order is sampled as a live source is, a folder of separate images every frame
    single_video = not streamed and Path(sources[0]).is_file()
    watch = _run_drift_options(artifact, drift, drift_alpha, drift_every, video=single_video)
    cascade = _load_cascade(
        artifact, backend, precision, budget_ms=_run_budget_ms(artifact, budget), drift=None if streamed else watch
    )
    from edgeexit.util import sigterm_as_interrupt

    lines = JsonLines(jsonl) if jsonl is not None else None  # one flushed line per frame, closed below
    try:
        with sigterm_as_interrupt():  # SIGTERM ends the run as Ctrl-C does: with the summary and --json
            if streamed:
                args = (realtime, fps, max_frames, deadline_ms, duration, quiet)
                summary = run_streams(cascade, sources, *args, out_console, console, drift=watch, jsonl=lines)
            else:
                echo = None if quiet else out_console.print
                summary = run_source(
                    cascade, sources[0], max_frames, deadline_ms, save_video, echo, warn=_drift_warning, jsonl=lines
                )
                out_console.print(summary_table(summary))
    finally:
        if lines is not None:
            lines.close()
    _drift_verdict(summary)
    _write_json(json_out, summary)


def _run_drift_options(artifact: Path, on: bool, alpha: float, every: int | None, video: bool = False):
    """`run`'s drift monitor options, or None: off (--no-drift), or unavailable on an artifact whose
    calibration has no drift reference (said, and the run goes on without it). ``video``: one video
    file read in order, sampled every `LIVE_EVERY`-th frame unless --drift-every says otherwise."""
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.monitor import LIVE_EVERY, DriftOptions

    if video and every is None:
        every = LIVE_EVERY

    try:
        options = DriftOptions(alpha=alpha, every=every)
    except ValueError as e:
        raise UserError(str(e).replace("drift alpha", "--drift-alpha").replace("(every)", "(--drift-every)")) from None
    if not on:
        return None
    cal = Artifact.load(artifact).calibration
    if cal is None or cal.drift_reference is None:
        why = "not calibrated" if cal is None else "calibrated before the drift monitor existed"
        console.print(
            f"drift monitor unavailable: this artifact is {why}, so there is no reference to compare the frames "
            "with; `edgeexit calibrate` again to get one",
            markup=False,
            highlight=False,
        )
        return None
    return options


def _drift_warning(message: str) -> None:
    console.print(f"[bold yellow]drift warning[/]: {esc(message)}", highlight=False)


def _drift_verdict(summary: dict) -> None:
    """After the run: each monitored stream's verdict; after an alarm, what no longer holds."""
    blocks = [(summary.get("source"), summary.get("drift"))] if "drift" in summary else []
    blocks += [(s["source"], s.get("drift")) for s in summary.get("streams") or []]
    for source, d in blocks:
        if not d:
            continue
        if d["alarm"]:
            console.print(
                f"[bold yellow]drift[/]: {esc(str(source))}: alarm at frame {d['first_alarm_frame']} "
                f"({d['channel']}) of {d['frames']}: the --max-drop certificate and the calibrated thresholds no "
                "longer apply to these frames; collect labelled frames from this camera and re-calibrate on them "
                "(edgeexit calibrate --data)",
                highlight=False,
            )
        else:
            console.print(
                f"drift: {source}: no alarm in {d['sampled_frames']} sampled frames (e-detector "
                f"{d['statistic']:.3g}, alarm at 1/α = {1 / d['alpha']:.0f})",
                markup=False,
                highlight=False,
            )


@app.command()
@command
def bench(
    artifact: Annotated[Path, typer.Argument(help="NAME.edgeexit folder.")],
    backend: BackendOpt = "auto",
    batch: Annotated[int, typer.Option(help="Batch size for the per-unit timings.")] = 1,
    repeats: Annotated[int, typer.Option(help="Repetitions per unit.")] = 200,
    images: Annotated[int, typer.Option(help="Held-out images for the early-exit latency.")] = 500,
    data_dir: DataDirOpt = None,
    precision: PrecisionOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Per-unit and cumulative per-exit latency; full cascade vs early exit at the current thresholds."""
    _outputs(json=json_out)
    from edgeexit.bench import bench_cascade, bench_table

    cascade = _load_cascade(artifact, backend, precision)
    result = bench_cascade(
        cascade,
        batch=batch,
        repeats=repeats,
        images=images,
        data_dir=str(data_dir) if data_dir else None,
    )
    out_console.print(bench_table(result))
    _write_json(json_out, result)


@app.command()
@command
def info(
    artifact: Annotated[Path, typer.Argument(help="NAME.edgeexit folder (or a model.pt).")],
    json_out: JsonOpt = None,
) -> None:
    """Show an artifact's units, FLOPs, parameters, file sizes, parity, engines and calibration."""
    _outputs(json=json_out)
    if artifact.suffix == ".pt" and artifact.is_file():
        from edgeexit.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(artifact)
        payload = {
            k: ckpt[k] for k in ("config", "preprocessing", "class_names", "metrics", "split", "units") if k in ckpt
        }
        from edgeexit.util import strict_json

        out_console.print_json(strict_json(payload))  # the one writer: NaN/inf metrics print as null
        _write_json(json_out, payload)
        return
    from edgeexit.export.report import info_table
    from edgeexit.runtime.artifact import Artifact

    art = Artifact.load(artifact)
    out_console.print(info_table(art))
    _write_json(json_out, art.to_json())


@app.command(cls=_RenamedOptions)
@command
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the run.")] = Path("runs/quickstart"),
    max_drop: Annotated[
        str,
        typer.Option(
            "--max-drop",
            help="The promise (default): the fastest plan certified within this drop of the full model's accuracy.",
        ),
    ] = "0.5pt",
    budget: Annotated[
        str,
        typer.Option(help="Budget mode instead of the promise: 2ms, or a share of the full model's latency (60%)."),
    ] = "",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
    train_images: Annotated[
        int | None,
        typer.Option(
            "--train-images", help="Train on the first N of the 55,000 training images (after the held-out split)."
        ),
    ] = 20000,
    width: Annotated[float, typer.Option(help="Width multiplier.")] = 0.25,
    test_images: Annotated[
        int, typer.Option("--test-images", min=100, max=10000, help="Test images the summary is measured on.")
    ] = 10000,
    data_dir: DataDirOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a run (model.pt, last.pt, artifact) already in OUT.")
    ] = False,
) -> None:
    """The whole flow on Fashion-MNIST: train → eval → export → calibrate → run, with a summary."""
    from edgeexit.quickstart import run_quickstart

    budget_ms, fraction = _parse_budget(budget)
    run_quickstart(
        out=out,
        budget_ms=budget_ms,
        budget_fraction=fraction,
        max_drop=_parse_drop(max_drop),
        test_images=test_images,
        epochs=epochs,
        train_images=train_images,
        width=width,
        data_dir=str(data_dir) if data_dir else None,
        console=console,
        out_console=out_console,
        force=force,
    )


@app.command()
@command
def doctor(
    artifact: Annotated[Path | None, typer.Argument(help="NAME.edgeexit folder to check against this device.")] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the report to this JSON file; '-' prints it on stdout instead."),
    ] = None,
) -> None:
    """What this machine can run: Python, numpy, ONNX Runtime, TensorRT, CUDA, GPU, Jetson, OpenCV.

    With an artifact: whether its engines fit this device, which backend `auto` picks and why, and
    whether it was calibrated here. Exit 0 when it can run here, 2 with the reason otherwise.
    """
    from edgeexit.doctor import diagnose, doctor_text

    to_stdout = json_out is not None and str(json_out) == "-"
    if not to_stdout:
        _outputs(json=json_out)
    report = diagnose(artifact)
    if to_stdout:
        from edgeexit.util import strict_json

        sys.stdout.write(strict_json(report))
    else:
        for line in doctor_text(report):
            out_console.print(line, highlight=False, soft_wrap=True)
        _write_json(json_out, report)
    if not report["ok"]:
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
