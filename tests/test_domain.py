"""One home per domain word: dataset names, image suffixes, image-count flags, shared option help."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest

from edgeexit.errors import UserError

PACKAGE = Path(__file__).resolve().parent.parent / "edgeexit"


def _string_constants(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


# ---- dataset names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, name",
    [
        ("cifar10", "cifar10"),
        ("CIFAR10", "cifar10"),
        ("Cifar-10", "cifar10"),
        ("CIFAR-100", "cifar100"),
        ("Fashion-MNIST", "fashion-mnist"),
        ("fashion_mnist", "fashion-mnist"),
        ("Tiny-ImageNet-200", "tiny-imagenet"),
        ("photos/train", "photos/train"),  # a path to an ImageFolder is returned as given
        ("CIFAR10x", "CIFAR10x"),
    ],
)
def test_canonical_dataset(spelling, name):
    from edgeexit.data import NAMED, canonical_dataset

    assert canonical_dataset(spelling) == name
    assert (canonical_dataset(spelling) in NAMED) == (name in NAMED)
    assert canonical_dataset(Path(spelling)) == str(Path(name))


def test_the_named_datasets_are_spelled_in_one_module():
    """Only data/names.py lists the datasets' aliases; datasets.py (the loaders, their statistics) is
    the only other module that may name one, and no module keeps its own tuple of them."""
    allowed = {PACKAGE / "data" / "names.py", PACKAGE / "data" / "datasets.py"}
    spelled = {
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p not in allowed and {"cifar10", "cifar100"} & set(_string_constants(p))
    }
    assert spelled == set()
    aliases = [p for p in PACKAGE.rglob("*.py") if "cifar-10" in _string_constants(p)]
    assert aliases == [PACKAGE / "data" / "names.py"]


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_every_spelling_of_a_named_dataset_gets_the_same_recipe(tmp_path, stem):
    """`--data CIFAR10 --stem imagenet` used to pick the fine-tuning recipe (a case-sensitive
    comparison in the trainer) while `--data cifar10 --stem imagenet` did not."""
    from edgeexit.train.trainer import TrainConfig

    configs = [TrainConfig.from_recipe(d, "ce", out=str(tmp_path / d), stem=stem) for d in ("cifar10", "CIFAR10")]
    assert configs[0].recipe == configs[1].recipe
    assert configs[1].data == "cifar10"  # what the checkpoint and split record
    r = configs[1].recipe
    assert (r.epochs, r.crop, r.normalize, r.backbone_lr_scale, r.stem) == (240, "pad", "dataset", 1.0, stem)


def test_fashion_mnist_spelled_otherwise_gets_the_cpu_recipe(tmp_path):
    from edgeexit.train.recipes import get_recipe
    from edgeexit.train.trainer import TrainConfig

    cfg = TrainConfig.from_recipe("Fashion-MNIST", "ce", out=str(tmp_path / "r"))
    assert cfg.recipe == get_recipe("fashion-mnist", "ce") and cfg.recipe.epochs == 2
    assert get_recipe("FASHION_MNIST", "ce").epochs == 2 and get_recipe("cifar10", "ce").epochs == 240


def _cifar10(root: Path) -> Path:
    rng = np.random.default_rng(3)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [(i + j) % 10 for j in range(4)]}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                                  b"labels": [1, 2, 3]}))  # fmt: skip
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_an_upper_case_named_dataset_is_not_sized_as_an_image_folder(tmp_path):
    """prepare_data recorded a 224-px split.image_size for 32-px CIFAR spelled 'CIFAR10' (it was taken
    for a folder); now both spellings give the same split."""
    from edgeexit.train.trainer import TrainConfig, prepare_data

    root = _cifar10(tmp_path / "data")
    splits = []
    for d in ("cifar10", "CIFAR10"):
        cfg = TrainConfig.from_recipe(d, "ce", out=str(tmp_path / d), stem="imagenet", data_dir=str(root), val_size=4)
        train, val, split = prepare_data(cfg)
        assert train.input_size == [32, 32] and len(train) == 16 and len(val) == 4
        splits.append(split)
    assert splits[0] == splits[1]
    assert splits[1]["image_size"] is None and splits[1]["dataset"] == "cifar10"


def test_resuming_a_run_recorded_under_another_spelling_is_the_same_run(tmp_path):
    from edgeexit.train.trainer import _check_same_run

    _check_same_run(tmp_path / "last.pt", {"data": "CIFAR10"}, {"data": "cifar10"})
    with pytest.raises(UserError, match="--data cifar100"):
        _check_same_run(tmp_path / "last.pt", {"data": "cifar100"}, {"data": "cifar10"})


# ---- image suffixes ---------------------------------------------------------------------------


def test_image_suffixes_have_one_home():
    from edgeexit.data import folder
    from edgeexit.runtime import sources

    assert folder.IMAGE_EXTS is sources.IMAGE_EXTS
    homes = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IMAGE_EXTS" for t in node.targets):
                homes.append(p.relative_to(PACKAGE))
    assert homes == [Path("runtime/sources.py")]


def test_run_reads_every_suffix_an_image_folder_trains_on(tmp_path):
    """A GIF was an image for ImageFolder training but not for `run` on a folder (two lists)."""
    from PIL import Image

    from edgeexit.data.folder import index_image_folder
    from edgeexit.runtime.sources import iter_frames

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((9, 7, 3), 40 if cls == "a" else 200, np.uint8)).save(tmp_path / cls / "x.gif")
    frames, order = iter_frames(str(tmp_path))
    got = list(frames)
    assert [name for name, _ in got] == ["x.gif", "x.gif"] and order == "RGB"
    assert got[0][1].shape == (9, 7, 3) and int(got[0][1].mean()) == 40
    classes, files, _ = index_image_folder(tmp_path)
    assert list(classes) == ["a", "b"] and len(files) == 2


# ---- the command line: one name per image count, shared option definitions --------------------


def _commands():
    import typer

    from edgeexit.cli import app

    return typer.main.get_command(app).commands


def _options(command: str) -> dict[str, str]:
    return {p.opts[0]: p.help or "" for p in _commands()[command].params if p.param_type_name == "option"}


def test_every_image_count_is_spelled_with_images():
    counts = {
        name: sorted(o for o in _options(name) if o.endswith("images") or "limit" in o or "samples" in o)
        for name in _commands()
    }
    assert {k: v for k, v in counts.items() if v} == {
        "train": ["--eval-images", "--train-images"],
        "eval": ["--images"],
        "export": ["--calib-images", "--int8-images", "--parity-images"],
        "calibrate": ["--images", "--verify-images"],
        "bench": ["--images"],
        "quickstart": ["--test-images", "--train-images"],
    }


@pytest.mark.parametrize("command", ["train", "export", "calibrate"])
def test_each_option_field_is_named_as_its_flag(command):
    """``--verify-images`` sets ``verify_images``: no table translates between the two. Left out: what
    is not an option of the job (--json, --restore) and --budget, whose text (5ms or 50%) sets one of
    two fields."""
    import dataclasses

    from edgeexit.calibrate.options import CalibrationOptions
    from edgeexit.export.exporter import ExportOptions
    from edgeexit.train.losses import LossConfig
    from edgeexit.train.recipes import Recipe
    from edgeexit.train.trainer import TrainConfig

    classes = {"train": (TrainConfig, Recipe, LossConfig), "export": (ExportOptions,),
               "calibrate": (CalibrationOptions,)}  # fmt: skip
    fields = {f.name for c in classes[command] for f in dataclasses.fields(c)}
    flags = set(_options(command)) - {"--json", "--restore", "--budget"}
    assert sorted(f for f in flags if f[2:].replace("-", "_") not in fields) == []
    assert {"budget_ms", "budget_fraction"} <= fields if command == "calibrate" else True


def test_backend_device_and_precision_are_one_definition_each():
    from edgeexit.runtime.backends import BACKENDS

    shared = {"--backend": ("calibrate", "run", "bench"), "--device": ("train", "eval"),
              "--precision": ("calibrate", "run", "bench")}  # fmt: skip
    for option, commands in shared.items():
        helps = {_options(c)[option] for c in commands}
        assert len(helps) == 1, (option, helps)
    backend_help = _options("run")["--backend"]
    assert all(b in backend_help.replace(",", " ").replace(".", " ").split() for b in BACKENDS)
    assert "cuda:N" in _options("eval")["--device"]


def test_renamed_args_maps_each_old_spelling_and_notes_it_once(capsys):
    from edgeexit.cli import renamed_args

    args = ["a.edgeexit", "--limit", "30", "--verify-limit=40", "--limit", "50", "--", "--limit"]
    assert renamed_args("calibrate", args) == [
        "a.edgeexit", "--images", "30", "--verify-images=40", "--images", "50", "--", "--limit"]  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("--limit is now --images") == 1 and err.count("--verify-limit is now --verify-images") == 1
    assert renamed_args("bench", ["--limit", "3"]) == ["--limit", "3"]  # only the command's own renames


@pytest.mark.parametrize(
    "old, value, new",
    [
        ("--limit-train", "0", "--train-images"),
        ("--limit-eval", "-3", "--eval-images"),
        ("--limit-train=-7", None, "--train-images"),
    ],  # fmt: skip
)
def test_an_old_spelling_still_reaches_its_option(tmp_path, old, value, new):
    """`train --limit-train 0` is `train --train-images 0`: refused naming the new flag, with a note."""
    from typer.testing import CliRunner

    from edgeexit.cli import app

    args = ["train", old, *([value] if value is not None else []), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, args)
    got = value if value is not None else old.split("=")[1]
    assert res.exit_code == 2, res.output
    assert f"{new} must be at least 1, got {got}" in res.output
    assert f"{old.split('=')[0]} is now {new}" in res.output
    assert not (tmp_path / "r").exists()


def test_help_shows_only_the_one_spelling():
    from edgeexit.cli import RENAMED

    for command, table in RENAMED.items():
        options = _options(command)
        assert set(table.values()) <= set(options), command
        assert not set(table) & set(options), command


# ---- stems, layouts and teacher weights: checked where they are defined -----------------------


@pytest.mark.parametrize(
    "overrides, field, problem",
    [
        ({"exits": 5}, "exits", "must be 4, 8 or 9, got 5"),
        ({"stem": "resnet"}, "stem", "must be cifar or imagenet, got 'resnet'"),
        ({"teacher_weights": "magic"}, "teacher_weights", "must be 'learned' or 'frozen', got 'magic'"),
    ],
)
def test_model_and_loss_settings_are_checked_once_and_named_as_flags(tmp_path, overrides, field, problem):
    """models / losses own the check (ConfigError names the field); the trainer only names the flag."""
    from edgeexit.models import MultiExitConfig
    from edgeexit.models.multiexit import ConfigError
    from edgeexit.train.losses import LossConfig
    from edgeexit.train.trainer import TrainConfig

    with pytest.raises(ConfigError) as info:
        LossConfig(**overrides) if field == "teacher_weights" else MultiExitConfig(**overrides)
    assert (info.value.field, info.value.problem) == (field, problem)
    with pytest.raises(UserError) as info:
        TrainConfig.from_recipe("fashion-mnist", "mlcsd", out=str(tmp_path / "r"), **overrides)
    assert str(info.value) == f"--{field.replace('_', '-')} {problem}"


def test_calibrate_names_a_renamed_flag_as_it_is_now(artifact_copy):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    for args, message in (
        (["--verify-images", "3"], "--verify-images must be at least 20, got 3"),
        (["--verify-limit", "5"], "--verify-images must be at least 20, got 5"),
        (["--metric", "p50"], "--metric must be mean or p95, got 'p50'"),  # the options' own phrasing
    ):
        res = CliRunner().invoke(app, ["calibrate", str(artifact_copy), "--budget", "50%", *args])
        assert res.exit_code == 2 and message in res.output, res.output


# ---- complexity guard -------------------------------------------------------------------------


def test_no_function_is_more_complex_than_pyproject_allows():
    """ruff's C901 at pyproject's max-complexity (12) over the package, benchmarks and tests; the
    exemptions are `# noqa: C901` at the function, and this counts them so new ones are deliberate."""
    import subprocess
    import sys

    root = PACKAGE.parent
    if subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (the dev extra)")
    assert "max-complexity = 12" in (root / "pyproject.toml").read_text()
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "concise",
                          "edgeexit", "benchmarks", "tests"], cwd=root, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stdout
    exempt = [p for d in ("edgeexit", "benchmarks", "tests") for p in (root / d).rglob("*.py")
              for line in p.read_text().splitlines() if "def " in line and line.endswith("# noqa: C901")]  # fmt: skip
    assert len(exempt) <= 9, exempt
