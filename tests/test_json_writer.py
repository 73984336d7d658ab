"""One JSON writer (util.strict_json): every --json, report and manifest edgeexit writes goes through
it, and its one rule for numbers JSON cannot hold is that a NaN or an infinity is written as null
with a one-line note naming the field. Export refuses, naming the tensor, a checkpoint whose weights
are not finite, and for --half one whose weights overflow FP16."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.util import strict_json

runner = CliRunner()


def test_non_finite_numbers_are_null_and_each_field_is_named(capsys):
    curve = [1.0, float("inf"), np.float64(-np.inf)]
    payload = {"a": 1.5, "metrics": {"loss": float("nan"), "acc": np.float32(0.25)}, "curve": curve,
               "t": torch.tensor(2.0), "ok": True, "n": 3}  # fmt: skip
    text = strict_json(payload)
    back = json.loads(text)
    assert back == {"a": 1.5, "metrics": {"loss": None, "acc": 0.25}, "curve": [1.0, None, None], "t": 2.0,
                    "ok": True, "n": 3}  # fmt: skip
    err = capsys.readouterr().err
    assert "3 non-finite number(s) written as null" in err and "metrics.loss, curve[1], curve[2]" in err
    assert "NaN" not in text and "Infinity" not in text


def test_a_finite_payload_is_written_as_before_without_a_note(capsys):
    payload = {"x": [1, 2.5, "é"], "y": {"z": None}}
    assert strict_json(payload) == json.dumps(payload, indent=2) + "\n"
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError):
        strict_json({"obj": object()})  # what has no number in it is still an error, not silently dropped


def _checkpoint_with(tiny_run, tmp_path, edit):
    ckpt = torch.load(tiny_run[0] / "model.pt", map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


def test_info_json_of_a_checkpoint_with_nan_metrics(tiny_run, tmp_path):
    def nan_metrics(c):
        c["metrics"] = {"val_accuracy": float("nan"), "loss": float("inf")}

    path = _checkpoint_with(tiny_run, tmp_path, nan_metrics)
    out = tmp_path / "info.json"
    res = runner.invoke(app, ["info", str(path), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["metrics"] == {"val_accuracy": None, "loss": None}


def test_export_names_a_tensor_that_is_not_finite(tiny_run, tmp_path):
    first = None

    def poison(c):
        nonlocal first
        first = next(k for k, v in c["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
        c["state_dict"][first].view(-1)[1] = math.nan

    path = _checkpoint_with(tiny_run, tmp_path, poison)
    for extra in ([], ["--int8"], ["--half"]):
        res = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "a.edgeexit"), *extra])
        assert res.exit_code == 2, res.output
        text = res.output.replace("\n", "")
        assert f"tensor {first} holds 1 NaN/infinite value(s)" in text and "Traceback" not in res.output
    assert not (tmp_path / "a.edgeexit").exists()


def test_export_half_names_a_tensor_beyond_fp16(tiny_run, tmp_path):
    name = None

    def large(c):
        nonlocal name
        name = [k for k, v in c["state_dict"].items() if v.is_floating_point() and v.numel() > 1][-1]
        c["state_dict"][name].view(-1)[0] = 1e6

    path = _checkpoint_with(tiny_run, tmp_path, large)
    res = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "h.edgeexit"), "--half"])
    assert res.exit_code == 2 and f"tensor {name} reaches 1e+06, beyond FP16" in res.output.replace("\n", "")
