"""What the CLI prints and writes, and what it refuses before the work.

Foreign strings (budgets, paths, class and file names) print as given: markup is off on stdout and
`util.esc` escapes stderr. Every output file (--json, --plot, --save-video, checkpoints) is checked by
`util.check_output_path` before the work and written by `atomic_write`, which never follows a folder,
device or FIFO at the path and removes the temporary files of writers that died. Options are checked
before the first epoch or frame: exit 2 with the input named.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from conftest import cli, dead_pid, edit_manifest
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.errors import UserError
from edgeexit.runtime import Cascade


def device_node(path):
    """A character device like /dev/null (root can make one), else a FIFO: both are not regular."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return path


def one_line(res) -> str:
    return " ".join(res.output.split())


# -- rich markup -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["[/]", "[bold]5ms", "5ms\\"])
def test_a_budget_that_is_markup_prints_as_given(artifact_copy, budget):
    res = cli("calibrate", artifact_copy, "--budget", budget, "--backend", "onnxruntime")
    assert res.exit_code == 2 and f"'{budget}'" in res.output


def test_an_out_path_with_markup_is_named_as_given(tiny_run, tmp_path):
    res = cli("export", tiny_run[0] / "absent[/]x.pt", "--out", tmp_path / "m[/].edgeexit")
    assert res.exit_code == 2 and "absent[/]x.pt" in res.output


@pytest.mark.slow
def test_an_export_into_a_markup_folder_runs_and_names_it_as_given(tiny_run, tmp_path):
    out = tmp_path / "m[/].edgeexit"  # folders "m[" and "].edgeexit"
    res = cli("export", tiny_run[0] / "model.pt", "--out", out, "--parity-samples", "16", "--calib-images", "0")
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").is_file() and f"exported {out}" in res.output.replace("\n", "")


def test_an_artifact_under_a_markup_folder(artifact_copy, tmp_path):
    odd = tmp_path / "a[/]b"  # folders "a[" and "]b"
    odd.mkdir(parents=True)
    shutil.copytree(artifact_copy, odd / "m.edgeexit")
    res = cli("info", odd / "m.edgeexit")
    assert res.exit_code == 0 and "a[/]b" in res.output
    res = cli("run", odd / "absent.edgeexit", "--source", odd)
    assert res.exit_code == 2 and "a[/]b" in res.output


def test_class_names_and_file_names_print_as_given(artifact_copy, test_frames, tmp_path):
    from PIL import Image

    names = ["[/]", "[bold red]Coat", *[f"[link=http://x]c{i}" for i in range(8)]]
    edit_manifest(artifact_copy, lambda m: m.update(class_names=names))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(test_frames[0][i][:, :, 0]).save(folder / f"[red]x{i:02d}.png")
    c = Cascade.load(artifact_copy, backend="onnxruntime")
    res = cli("run", artifact_copy, "--source", folder)
    assert res.exit_code == 0, res.output
    for i in range(12):
        assert f"[red]x{i:02d}.png: {c.predict(test_frames[0][i]).class_name} " in res.output


def test_the_markup_mechanism_covers_every_foreign_string():
    """stdout has markup off; anything put into a stderr message goes through util.esc."""
    from rich.console import Console

    from edgeexit.cli import console, out_console
    from edgeexit.util import esc

    assert out_console._markup is False and console._markup is True
    hostile = ["[/]", "[bold]x", "[red]x.png", "[link=file:///etc/passwd]a[/link]", "\\[x]", "a\\[b]", "[[/]]"]
    for s in hostile:
        rec = Console(record=True, width=400)
        rec.print(f"[bold red]error:[/] {esc(s)} [dim](1s)[/]")
        assert rec.export_text().strip() == f"error: {s} (1s)"
        plain = Console(record=True, width=400, markup=False)
        plain.print(s)
        assert plain.export_text().strip() == s


# -- writes that follow whatever is at the path ------------------------------------------------------
def _json_commands(artifact, run, tmp_path):
    return {
        "train": ["train", "--out", tmp_path / "r"],
        "eval": ["eval", run / "model.pt"],
        "export": ["export", run / "model.pt", "--out", tmp_path / "e.edgeexit"],
        "calibrate": ["calibrate", artifact, "--budget", "50%", "--backend", "onnxruntime"],
        "run": ["run", artifact, "--source", artifact, "--backend", "onnxruntime"],
        "bench": ["bench", artifact, "--backend", "onnxruntime"],
        "info": ["info", artifact],
    }


@pytest.mark.parametrize("target", ["folder", "device"])
@pytest.mark.parametrize("command", ["train", "eval", "export", "calibrate", "run", "bench", "info"])
def test_every_commands_json_onto_a_folder_or_a_device_is_refused(artifact_copy, tiny_run, tmp_path, command, target):
    """The mechanism covers the class: every command, --json onto a folder and a device node."""
    path = tmp_path / "t"
    path.mkdir() if target == "folder" else device_node(path)
    before = os.stat(path)
    res = cli(*_json_commands(artifact_copy, tiny_run[0], tmp_path)[command], "--json", path)
    assert res.exit_code == 2, res.output
    assert "--json" in res.output and (
        "is a folder" in res.output or "is a device" in one_line(res) or "FIFO" in res.output
    )
    after = os.stat(path)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    if target == "folder":
        assert list(path.iterdir()) == []
    assert not (tmp_path / "r").exists() and not (tmp_path / "e.edgeexit").exists()  # no work done


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_plot_onto_a_folder_or_device(artifact_copy, tiny_run, tmp_path, command):
    args = _json_commands(artifact_copy, tiny_run[0], tmp_path)[command]
    for path in (tmp_path / "d", device_node(tmp_path / "n")):
        if not path.exists():
            path.mkdir()
        res = cli(*args, "--plot", path)
        assert res.exit_code == 2 and "--plot" in res.output, res.output


def test_run_save_video_onto_a_device(artifact_copy, tmp_path):
    res = cli("run", artifact_copy, "--source", artifact_copy, "--save-video", device_node(tmp_path / "v.mp4"))
    assert res.exit_code == 2 and "--save-video" in res.output


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    from edgeexit.util import atomic_write_text

    folder = tmp_path / "d"
    folder.mkdir()
    node = device_node(tmp_path / "n")
    os.symlink(node, tmp_path / "link")
    for target in (folder, node, tmp_path / "link"):
        with pytest.raises(UserError, match="nothing was written"):
            atomic_write_text(target, "x")
    assert stat.S_ISCHR(os.stat(node).st_mode) or stat.S_ISFIFO(os.stat(node).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_quickstart_refuses_an_existing_run_without_force(tiny_run, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    shutil.copy(tiny_run[0] / "model.pt", out / "model.pt")
    before = (out / "model.pt").read_bytes()
    res = cli("quickstart", "--out", out)
    assert res.exit_code == 2 and "--force" in res.output
    assert (out / "model.pt").read_bytes() == before


# -- exit 2 with the input named, before the work ----------------------------------------------------
@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--width", "1000", "--out", "{t}/r"], "--width 1000 needs about"),
        (["train", "--device", "mps", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--device", "meta", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--device", "cpu:5", "--out", "{t}/r"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--out", "/dev/null"], "a file is in the way"),
        (["eval", "{t}/model.pt", "--device", "meta"], "--device must be"),
    ],
)
def test_user_mistakes_are_found_before_the_work(tmp_path, args, match):
    res = cli(*[a.format(t=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert match in one_line(res)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_found_before_an_epoch(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    res = cli("train", "--out", out / "r")
    assert res.exit_code == 2 and "not writable" in res.output


def test_a_deadline_on_an_artifact_not_calibrated_on_this_backend(artifact_copy, test_frames, tmp_path):
    from PIL import Image

    Image.fromarray(test_frames[0][0][:, :, 0]).save(tmp_path / "a.png")
    res = cli("run", artifact_copy, "--source", tmp_path, "--deadline-ms", "5", "--backend", "onnxruntime")
    assert res.exit_code == 2 and "calibrate the artifact on this backend" in one_line(res)


# -- leftovers after kill -9 -------------------------------------------------------------------------
def test_the_next_write_removes_a_killed_writers_temporary_files(tmp_path):
    from edgeexit.util import atomic_write_text

    pid = dead_pid()
    stale = [tmp_path / f".model.pt.{pid}.ab12cd.tmp", tmp_path / f".eval.json.{pid}.x.tmp"]
    live = tmp_path / f".model.pt.{os.getpid()}.zz.tmp"  # a live writer's file stays
    other = tmp_path / f".other.json.{pid}.x.tmp"  # another name: its own next write cleans it
    for p in (*stale, live, other):
        p.write_text("half")
    atomic_write_text(tmp_path / "model.pt", "x")
    atomic_write_text(tmp_path / "eval.json", "x")
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()


def test_a_cli_json_write_cleans_its_leftovers(artifact_copy, tmp_path):
    """The mechanism covers the class: every file is written by atomic_write (checkpoints, plots,
    stats, manifests, --json), which removes its dead writers' temporaries."""
    pid = dead_pid()
    stale = tmp_path / f".info.json.{pid}.q1.tmp"
    stale.write_text("{")
    res = cli("info", artifact_copy, "--json", tmp_path / "info.json")
    assert res.exit_code == 0 and not stale.exists()
    assert "_folder" not in json.loads((tmp_path / "info.json").read_text())


# -- --source digits that are not a camera index, a damaged --init ------------------------------


@pytest.mark.parametrize("source", ["²", "٣", "99999999999999999999", "1024"])
def test_source_that_is_not_a_camera_index_is_one_line_exit_2(artifact_copy, source):

    res = CliRunner().invoke(app, ["run", str(artifact_copy), "--source", source])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "Traceback" not in res.output and last.startswith("error:") and source in res.output


def test_camera_index_reads_ascii_digits_only():
    from edgeexit.errors import UserError
    from edgeexit.runtime.sources import camera_index

    assert camera_index("0") == 0 and camera_index("12") == 12
    assert camera_index("²") is None and camera_index("clip.mp4") is None and camera_index("rtsp://h/x") is None
    with pytest.raises(UserError, match="0..1023"):
        camera_index("99999999999999999999")


def test_a_nan_init_file_is_named_not_blamed_on_the_learning_rate(tmp_path):
    import torch

    from edgeexit.errors import UserError
    from edgeexit.models.pretrained import load_init_file

    sd = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.tensor([0.0, float("nan")])}
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match="NaN or infinite.*fc.bias.*not the learning rate"):
        load_init_file(path)
    sd["fc.bias"] = torch.zeros(2)
    torch.save(sd, path)
    assert set(load_init_file(path)) == {"conv1.weight", "fc.bias"}
