import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import normalised

from edgeexit.errors import UserError
from edgeexit.export.exporter import export_checkpoint
from edgeexit.export.tensorrt import engine_entry, engine_filename, profile_shapes
from edgeexit.runtime.artifact import Artifact
from edgeexit.runtime.backends.tensorrt import INSTALL_HINT, check_engine_compatible
from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint


def test_sixteen_units_pass_the_checker_and_manifest_follows_the_contract(tiny_artifact):
    m = Artifact.load(tiny_artifact).to_json()
    assert [u["name"] for u in m["units"]][:4] == ["seg_01", "head_01", "seg_02", "head_02"]
    assert len(m["units"]) == 16 and m["schema_version"] == 1
    for u in m["units"]:
        onnx.checker.check_model(str(tiny_artifact / u["onnx"]))
        assert u["flops"] > 0 and u["params"] > 0 and u["engines"] == []
        if u["kind"] == "head":
            assert [o["name"] for o in u["outputs"]] == ["logits", "confidence"]
        else:
            assert u["tap"] == u["outputs"][-1]["name"]
    # segment k's inputs are segment k-1's outputs, in order
    segs = [u for u in m["units"] if u["kind"] == "segment"]
    assert segs[0]["inputs"][0]["name"] == "image"
    for a, b in zip(segs, segs[1:], strict=False):
        assert [i["name"] for i in b["inputs"]] == [o["name"] for o in a["outputs"]]
    pre = m["preprocessing"]
    assert (
        pre["input_size"] == [28, 28]
        and pre["in_chans"] == 1
        and {"mean", "std", "channel_order", "resize"} <= set(pre)
    )
    assert m["parity"]["max_abs_logit_diff"] < 1e-3 and len(m["parity"]["exits"]) == 8
    assert m["split"]["val_size"] == 600 and m["dataset"] == "fashion-mnist"


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_chained_onnxruntime_reproduces_pytorch_on_1000_real_test_images(tiny_artifact, tiny_run, fashion_test, batch):
    model = model_from_checkpoint(load_checkpoint(tiny_run[0] / "model.pt"))
    m = Artifact.load(tiny_artifact).to_json()
    # one intra-op thread, as the runtime's sessions: ORT's default pool spin-waits against torch's OpenMP
    # threads in this process (measured: 4x to 20x slower on the 2-core box) without changing any logit
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = {
        u["name"]: ort.InferenceSession(str(tiny_artifact / u["onnx"]), opts, providers=["CPUExecutionProvider"])
        for u in m["units"]
    }
    n = 1000 if batch != 1 else 100  # batch 1 over 100 images keeps the suite fast
    x = normalised(fashion_test, n)
    with torch.no_grad():
        ref = [z.numpy() for z in model(torch.from_numpy(x))[0]]
    for start in range(0, n, batch):
        xb = x[start : start + batch]
        state = [xb]
        for k in range(1, 9):
            seg, head = m["units"][2 * k - 2], m["units"][2 * k - 1]
            state = sess[seg["name"]].run(None, {i["name"]: s for i, s in zip(seg["inputs"], state, strict=True)})
            logits, conf = sess[head["name"]].run(None, {head["inputs"][0]["name"]: state[-1]})
            r = ref[k - 1][start : start + batch]
            assert np.abs(logits - r).max() < 1e-4
            assert np.array_equal(logits.argmax(1), r.argmax(1))
            np.testing.assert_allclose(conf, torch.softmax(torch.from_numpy(r), 1).amax(1).numpy(), atol=1e-5)


def test_existing_output_needs_force(tiny_run, tiny_artifact):
    with pytest.raises(UserError, match="--force"):
        export_checkpoint(tiny_run[0] / "model.pt", out=tiny_artifact)


def test_force_never_deletes_user_files_or_the_source_run(tiny_run, tmp_path):
    import shutil

    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="not an edgeexit artifact"):
        export_checkpoint(tiny_run[0] / "model.pt", out=user, force=True)
    assert (user / "holiday.jpg").read_bytes() == b"precious"
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    with pytest.raises(UserError, match="holds the checkpoint"):
        export_checkpoint(run / "model.pt", out=run, force=True)
    assert (run / "model.pt").is_file() and (run / "last.pt").is_file()
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(UserError, match="not an edgeexit artifact"):
        export_checkpoint(tiny_run[0] / "model.pt", out=afile, force=True)
    assert afile.read_text() == "x"


@pytest.mark.slow
def test_failed_export_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch):
    from edgeexit.export import parity

    def broken(*a, **k):
        raise RuntimeError("simulated crash during parity")

    monkeypatch.setattr(parity, "check_parity", broken)
    dest = tmp_path / "out.edgeexit"
    with pytest.raises(RuntimeError, match="simulated"):
        export_checkpoint(tiny_run[0] / "model.pt", out=dest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_force_replaces_an_artifact_only_when_the_new_one_is_complete(tiny_run, artifact_copy, monkeypatch):
    before = (artifact_copy / "manifest.json").read_text()
    from edgeexit.export import parity

    monkeypatch.setattr(parity, "check_parity", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export_checkpoint(tiny_run[0] / "model.pt", out=artifact_copy, force=True)
    assert (artifact_copy / "manifest.json").read_text() == before
    assert sorted(p.name for p in artifact_copy.parent.iterdir()) == ["model.edgeexit"]


@pytest.mark.slow
def test_parity_above_tolerance_fails_the_export(tiny_run, tmp_path):
    with pytest.raises(RuntimeError, match="parity check failed"):
        export_checkpoint(tiny_run[0] / "model.pt", out=tmp_path / "x.edgeexit", tolerance=1e-12, parity_images=16)
    assert not (tmp_path / "x.edgeexit").exists()


def test_bad_checkpoints_and_options(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable edgeexit checkpoint"):
        export_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not an edgeexit checkpoint"):
        export_checkpoint(foreign)
    with pytest.raises(UserError, match="not found"):
        export_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="--opset must be within 17..20, got 9"):
        export_checkpoint(foreign, opset=9)


def test_engine_format_without_tensorrt_says_how_to_get_it(tiny_run, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError) as e:
        export_checkpoint(tiny_run[0] / "model.pt", out=tmp_path / "e.edgeexit", format="engine")
    assert str(e.value) == INSTALL_HINT and "JetPack" in INSTALL_HINT
    assert not (tmp_path / "e.edgeexit").exists()


def test_tensorrt_profiles_entries_and_compatibility(tiny_artifact):
    m = Artifact.load(tiny_artifact).to_json()
    seg2 = m["units"][2]
    shapes = profile_shapes(seg2["inputs"], max_batch=32, opt_batch=8)
    c, h, w = seg2["inputs"][0]["shape"][1:]
    assert shapes["skip_01"] == [[1, c, h, w], [8, c, h, w], [32, c, h, w]]
    with pytest.raises(UserError):
        profile_shapes(seg2["inputs"], max_batch=0)
    dev = {"name": "NVIDIA Jetson Orin Nano", "compute_capability": "8.7"}
    entry = engine_entry(engine_filename("seg_02", "fp16"), "fp16", "10.3.0", dev, shapes)
    assert entry == {
        "path": "seg_02.fp16.engine",
        "precision": "fp16",
        "trt_version": "10.3.0",
        "device_name": "NVIDIA Jetson Orin Nano",
        "compute_capability": "8.7",
        "batch_profile": {"min": 1, "opt": 8, "max": 32},
    }
    check_engine_compatible(entry, "10.3.0", dev)
    with pytest.raises(UserError, match="TensorRT 10.3.0 but this is TensorRT 8.6.1.*rebuild"):
        check_engine_compatible(entry, "8.6.1", dev)
    with pytest.raises(UserError, match="built for NVIDIA Jetson Orin Nano.*H100.*rebuild"):
        check_engine_compatible(entry, "10.3.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})


def test_engines_build_and_run_with_tensorrt(tiny_run, tmp_path):
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installed (NVIDIA index or JetPack only); engine building runs on a GPU machine",
    )
    dest = tmp_path / "trt.edgeexit"
    manifest, _ = export_checkpoint(tiny_run[0] / "model.pt", out=dest, format="engine", half=False, batch=8)
    assert all(len(u["engines"]) == 1 for u in manifest["units"])


def test_info_shows_the_artifact(tiny_artifact, tmp_path):
    from typer.testing import CliRunner

    from edgeexit.cli import app

    res = CliRunner().invoke(app, ["info", str(tiny_artifact), "--json", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "seg_01" in res.output and "not calibrated" in res.output
    assert json.loads((tmp_path / "i.json").read_text())["schema_version"] == 1


def test_unknown_schema_version_says_what_to_do(artifact_copy):
    m = json.loads((artifact_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema_version 99.*upgrade edgeexit or re-export"):
        Artifact.load(artifact_copy)
    shutil.rmtree(artifact_copy)
    with pytest.raises(UserError, match="does not exist"):
        Artifact.load(artifact_copy)
