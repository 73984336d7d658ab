"""Environment and numbers checked before any work: the torchrun variables before rendezvous (named
in one line; a bounded --dist-timeout instead of torch's 30 minutes), `run --fps`/`--duration`
within a sane range, and stored calibration frames whose members are arrays of rows."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.errors import ArtifactError, UserError
from edgeexit.runtime.sources import check_pace
from edgeexit.train.trainer import TrainConfig, check_dist_env

runner = CliRunner()
FULL = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    "env,match",
    [
        ({"WORLD_SIZE": "abc"}, r"WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0 is outside 1\.\."),
        ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 is set but RANK is not: start training with torchrun"),
        (dict(FULL, RANK="2"), r"RANK=2 is outside 0\.\.1 \(WORLD_SIZE=2\)"),
        (dict(FULL, RANK="-1"), r"RANK=-1 is outside"),
        (dict(FULL, LOCAL_RANK="x"), r"LOCAL_RANK='x' is not an integer"),
        ({k: v for k, v in FULL.items() if k != "MASTER_ADDR"}, r"MASTER_ADDR is not"),
        (dict(FULL, MASTER_PORT="70000"), r"MASTER_PORT=70000 is outside 1\.\.65535"),
    ],
)
def test_a_broken_torchrun_environment_is_named_before_rendezvous(env, match):
    with pytest.raises(UserError, match=match):
        check_dist_env(env)


def test_a_valid_environment_and_none():
    assert check_dist_env({}) is None and check_dist_env({"WORLD_SIZE": "1"}) is None
    assert check_dist_env(dict(FULL, RANK="1", LOCAL_RANK="1")) == (2, 1, 1)


def test_train_refuses_a_stale_world_size_in_one_line(tmp_path):
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--epochs", "1"], env={"WORLD_SIZE": "2",
                        "RANK": None, "LOCAL_RANK": None})  # fmt: skip
    assert res.exit_code == 2 and "WORLD_SIZE=2 is set but RANK is not" in res.output.replace("\n", "")


@pytest.mark.parametrize("minutes", [0, -1, float("nan"), 1e9])
def test_dist_timeout_out_of_range_is_refused(minutes):
    with pytest.raises(UserError, match="--dist-timeout must be a number of minutes"):
        TrainConfig(dist_timeout=minutes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_whose_peers_never_come_ends_at_the_dist_timeout(tmp_path):
    env = dict(FULL, RANK="1", LOCAL_RANK="1", MASTER_PORT=str(_free_port()))  # rank 0 never starts
    t0 = time.perf_counter()
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--epochs", "1", "--dist-timeout", "0.05"],
                        env=env)  # fmt: skip
    took = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    assert "did not meet within --dist-timeout 0.05 min" in res.output.replace("\n", "") and took < 60


@pytest.mark.parametrize(
    "fps,duration,match",
    [
        (1e-300, None, "--fps must be within 0.01..10000"),
        (float("nan"), None, "--fps must be within"),
        (1e9, None, "--fps must be within"),
        (None, float("nan"), "--duration must be a positive finite number"),
        (None, float("inf"), "--duration must be"),
        (None, -5.0, "--duration must be"),
    ],
)
def test_pacing_numbers_out_of_range_are_refused(fps, duration, match):
    with pytest.raises(UserError, match=match):
        check_pace(fps, duration)


def test_run_refuses_them_before_loading_anything(tmp_path):
    for extra in (["--realtime", "--fps", "1e-300"], ["--duration", "nan"]):
        res = runner.invoke(app, ["run", str(tmp_path / "missing.edgeexit"), "--source", "0", *extra])
        assert res.exit_code == 2 and ("--fps must be" in res.output or "--duration must be" in res.output), res.output
    check_pace(30.0, 10.0)  # sane values pass


@pytest.mark.parametrize("member", ["zero_d", "bytes"])
def test_stored_frames_with_a_0d_or_non_array_member_are_refused(tmp_path, member):
    from edgeexit.runtime.manifest import _check_frames

    out = {"frames": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros(4, np.int64),
           "calibration": np.arange(2), "verification": np.arange(2, 4)}  # fmt: skip
    out["frames"] = np.array(7, np.uint8) if member == "zero_d" else b"\x80\x04pickled"
    with pytest.raises(ArtifactError, match="member frames is not an array of rows"):
        _check_frames(None, tmp_path / "frames.npz", out)
