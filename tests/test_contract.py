"""The typed artifact contract (runtime/artifact.py), the one budget grammar, export's option table,
the generated docs/cli.md, and the trainer's lr schedule and backbone lr groups."""

from __future__ import annotations

import json
import shutil

import pytest

from edgeexit.errors import ArtifactError, UserError
from edgeexit.runtime import Cascade
from edgeexit.runtime.artifact import Artifact
from edgeexit.util import parse_budget

OLD_UNIT_KEYS = ("engines", "exit_index", "tap", "flops", "params", "macs", "parity_max_abs_diff", "export_s")
NEW_TOP_KEYS = ("calibration_frames", "quantization", "fp16", "engine_parity", "weights", "edgeexit_version")


def test_an_artifact_in_the_earlier_manifest_shape_still_loads_and_runs(tiny_artifact, tmp_path, test_frames):
    """An early schema-1 manifest: none of the later optional fields (engines, tap, costs, parity per
    unit, stored frames, quantization, fp16, weights, the resize and channel order), no tensor dtypes,
    and a calibration from before the measured ladder (no metric, reference, exit times, frame or drift
    reference): it loads, runs, and holds a budget on the ladder's predictions."""
    old = tmp_path / "old.edgeexit"
    shutil.copytree(tiny_artifact, old, ignore=shutil.ignore_patterns("fused", "calibration", "weights.pt"))
    m = json.loads((old / "manifest.json").read_text())
    for key in NEW_TOP_KEYS:
        m.pop(key, None)
    for u in m["units"]:
        for key in OLD_UNIT_KEYS:
            u.pop(key, None)
        for t in (*u["inputs"], *u["outputs"]):
            t.pop("dtype", None)
    for key in ("channel_order", "resize"):
        m["preprocessing"].pop(key, None)
    full, skip = [2.0] * 7 + [0.0], [0.5] * 7 + [0.0]
    m["calibration"] = {
        "thresholds": skip, "policy": "max_softmax", "predicted": {"mean_ms": 0.5, "accuracy": 0.8},
        "measured": {"mean_ms": 0.6, "p95_ms": 0.9, "accuracy": 0.8},
        "ladder": [{"thresholds": skip, "predicted_ms": 0.5, "predicted_accuracy": 0.8},
                   {"thresholds": full, "predicted_ms": 1.0, "predicted_accuracy": 0.82}],
    }  # fmt: skip
    (old / "manifest.json").write_text(json.dumps(m))
    art = Artifact.load(old)
    assert art.weights is None and art.calibration_frames is None and art.units[0].flops is None
    assert [u.name for u in art.segments] == [f"seg_{p + 1:02d}" for p in range(art.num_exits)]
    cal = art.calibration
    assert cal.metric == "mean" and cal.reference is None and cal.frame is None and cal.drift_reference is None
    assert cal.measured.mean_ms == 0.6 and all(r.measured is None for r in cal.ladder)
    with Cascade.load(old, backend="onnxruntime", budget_ms=5.0) as held:
        state = held.controller.state()  # the calibrated plan anchored on its verification run, the rest predicted
        assert state["plans"] == 2 and state["measured_rungs"] == 1 and state["calibrated_index"] is not None
    frames, _ = test_frames
    # the same plan on both (the old calibration's own thresholds exit early; the new artifact is uncalibrated)
    old_full = Cascade.load(old, backend="onnxruntime", thresholds=full)
    with old_full as new_shape, Cascade.load(tiny_artifact, backend="onnxruntime") as c:
        a = [p.label for p in new_shape.predict_batch(frames[:32])]
        assert a == [p.label for p in c.predict_batch(frames[:32])]


def test_typed_fields_match_the_manifest_on_disk(tiny_artifact):
    art = Artifact.load(tiny_artifact)
    raw = json.loads((tiny_artifact / "manifest.json").read_text())
    assert art.to_json() == raw
    assert art.num_exits == len(raw["units"]) // 2 == raw["model"]["num_exits"]
    assert [u.file().name for u in art.units] == [u["onnx"] for u in raw["units"]]
    assert [u.input_names for u in art.heads] == [[t["name"] for t in u["inputs"]] for u in raw["units"][1::2]]
    with pytest.raises(ArtifactError, match="--int8"):
        art.units[0].file("int8")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("5ms", (5.0, None)),
        ("800us", (0.8, None)),
        ("0.005s", (5.0, None)),
        ("2.5ms", (2.5, None)),
        ("50%", (None, 0.5)),
    ],
)
def test_one_budget_grammar(text, expected):
    ms, fraction = parse_budget(text)
    assert (ms if ms is None else pytest.approx(ms), fraction) == (
        expected[0] if expected[0] is None else pytest.approx(expected[0]),
        expected[1],
    )


@pytest.mark.parametrize("text", ["fast", "0%", "-1ms", "nan%", "50 %%", "2.5"])
def test_the_budget_grammar_refuses(text):
    with pytest.raises(UserError):
        parse_budget(text)


def test_run_budget_in_percent_needs_a_calibration(tiny_artifact):
    from edgeexit.cli import _run_budget_ms

    assert _run_budget_ms(tiny_artifact, "3ms") == pytest.approx(3.0)
    with pytest.raises(UserError, match="calibrate this artifact first"):
        _run_budget_ms(tiny_artifact, "50%")


def test_export_refuses_engine_options_with_onnx_and_names_the_flag():
    from edgeexit.export.exporter import ExportOptions

    with pytest.raises(UserError, match=r"--batch, --workspace configure the TensorRT engines"):
        ExportOptions(format="onnx", batch=8, workspace=1.0)
    with pytest.raises(UserError, match="--batch must be within"):
        ExportOptions(format="engine", batch=0)
    assert ExportOptions(format="engine", batch=8).batch == 8
    with pytest.raises(TypeError, match="max_batch"):  # the field is the flag: --batch is `batch`
        ExportOptions(format="engine", max_batch=16)


def test_docs_cli_md_is_what_the_code_says():
    from edgeexit.clidocs import DOC, END, updated

    text = DOC.read_text()
    assert END in text
    assert updated(text) == text, "docs/cli.md is out of date: run `python -m edgeexit.clidocs`"


def test_lr_schedule_warmup_multistep_and_cosine():
    from edgeexit.train.recipes import Recipe
    from edgeexit.train.trainer import lr_at

    r = Recipe(lr=0.1, milestones=[10, 20], lr_gamma=0.1, warmup_epochs=2.0, epochs=30)
    assert lr_at(r, 0.0) == pytest.approx(0.1 * 1e-3 / 2)
    assert lr_at(r, 1.0) == pytest.approx(0.1 * 1.001 / 2)  # linear warm-up
    assert lr_at(r, 5.0) == pytest.approx(0.1)
    assert lr_at(r, 10.0) == pytest.approx(0.01) and lr_at(r, 25.0) == pytest.approx(0.001)
    c = Recipe(lr=0.2, schedule="cosine", warmup_epochs=0.0, epochs=10)
    assert lr_at(c, 0.0) == pytest.approx(0.2)
    assert lr_at(c, 5.0) == pytest.approx(0.1)
    assert lr_at(c, 10.0) == pytest.approx(0.0, abs=1e-12) and lr_at(c, 12.0) == pytest.approx(0.0, abs=1e-12)


def test_backbone_parameters_get_the_backbone_lr_scale_and_no_decay_on_biases():
    import torch

    from edgeexit.models import MultiExitConfig, build_model
    from edgeexit.train.recipes import Recipe
    from edgeexit.train.trainer import _optimizer

    model = build_model(MultiExitConfig(width=0.0625, exits=4, in_chans=1, input_size=[28, 28], num_classes=10))
    opt = _optimizer(model, model, Recipe(lr=0.1, backbone_lr_scale=0.1, weight_decay=5e-4))
    backbone = {id(p) for p in model.segments.parameters()}
    seen = set()
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        seen |= ids
        assert ids <= backbone or not ids & backbone  # a group is backbone or head, never both
        assert g["lr_scale"] == (0.1 if ids <= backbone else 1.0)
        assert g["weight_decay"] == (5e-4 if all(p.ndim > 1 for p in g["params"]) else 0.0)
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert isinstance(opt, torch.optim.SGD)
