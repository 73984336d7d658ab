import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import normalised

from edgeexit.runtime import Cascade
from edgeexit.runtime.plan import CascadePlan
from edgeexit.runtime.policies import entropy, margin, max_softmax
from edgeexit.runtime.preprocessing import Preprocessor, resize_bilinear
from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint

K = 8


@pytest.fixture(scope="module")
def torch_outputs(tiny_run, fashion_test):
    model = model_from_checkpoint(load_checkpoint(tiny_run[0] / "model.pt"))
    with torch.no_grad():
        logits = model(torch.from_numpy(normalised(fashion_test, 1000)))[0]
    return [z.numpy() for z in logits]


def test_runtime_imports_and_runs_without_torch(tiny_artifact):
    code = (
        "import sys, numpy as np\n"
        "from edgeexit.runtime import Cascade\n"
        f"c = Cascade.load({str(tiny_artifact)!r}, backend='onnxruntime', thresholds=[0.5] * 8)\n"
        "p = c.predict(np.zeros((28, 28), np.uint8))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(p.exit_index, p.class_name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_all_skipped_equals_pytorch_final_exit(tiny_artifact, test_frames, torch_outputs):
    frames, _ = test_frames
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[2.0] * K)
    preds = [c.predict(f) for f in frames]
    assert all(p.exit_index == K for p in preds)
    assert np.array_equal([p.label for p in preds], torch_outputs[-1].argmax(1))


def test_zero_thresholds_equal_exit_one(tiny_artifact, test_frames, torch_outputs):
    frames, _ = test_frames
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[0.0] * K)
    preds = [c.predict(f) for f in frames]
    assert all(p.exit_index == 1 for p in preds)
    assert np.array_equal([p.label for p in preds], torch_outputs[0].argmax(1))
    conf = torch.softmax(torch.from_numpy(torch_outputs[0]), 1).amax(1).numpy()
    np.testing.assert_allclose([p.confidence for p in preds], conf, atol=1e-5)


def test_predict_batch_equals_predict_and_the_cascade_rule(tiny_artifact, test_frames, torch_outputs):
    frames, _ = test_frames
    th = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=th)
    single = [c.predict(f) for f in frames]
    batch = c.predict_batch(frames)
    for a, b in zip(single, batch, strict=True):
        assert (a.label, a.exit_index) == (b.label, b.exit_index)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
    # the same rule computed from PyTorch's logits
    conf = np.stack([torch.softmax(torch.from_numpy(z), 1).amax(1).numpy() for z in torch_outputs], 1)
    take = conf >= np.array(th)[None]
    take[:, -1] = True
    exits = take.argmax(1)
    assert np.array_equal([p.exit_index - 1 for p in single], exits)
    labels = np.stack([z.argmax(1) for z in torch_outputs], 1)[np.arange(len(exits)), exits]
    assert np.array_equal([p.label for p in single], labels)
    assert len(set(exits)) > 2  # the thresholds really spread samples over several exits


def test_threads_get_what_sequential_calls_get(tiny_artifact, test_frames):
    frames, _ = test_frames
    frames = frames[:200]
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[0.8] * K)
    expected = [(p.label, p.exit_index) for p in (c.predict(f) for f in frames)]
    results = {}

    def work(t):
        results[t] = [(p.label, p.exit_index) for p in (c.predict(f) for f in frames)]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[t] == expected for t in range(4))


@pytest.mark.slow
def test_torch_backend_matches_onnxruntime(tiny_artifact, test_frames):
    frames, _ = test_frames
    frames = frames[:300]
    th = [0.9, 0.85, 0.8, 0.8, 0.7, 0.7, 0.6, 0.0]
    a = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=th).predict_batch(frames)
    b = Cascade.load(tiny_artifact, backend="torch", thresholds=th).predict_batch(frames)
    agree = np.mean([(x.label, x.exit_index) == (y.label, y.exit_index) for x, y in zip(a, b, strict=True)])
    assert agree >= 0.99  # a confidence within 1e-6 of a threshold may fall either side


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((2, 3, 28, 28), np.uint8), "shape"),
        (np.zeros((28, 28, 4), np.uint8), "shape"),
        (np.zeros((3, 28, 28), np.uint8), "channels last"),
        (np.zeros((28, 28), np.int32), "dtype"),
        (np.full((1, 28, 28), np.nan, np.float32), "NaN"),
        (np.zeros((1, 14, 14), np.float32), r"\(1, 28, 28\)"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_input_raises_value_error_naming_what_was_expected(tiny_artifact, bad, match):
    c = Cascade.load(tiny_artifact, backend="onnxruntime")
    with pytest.raises(ValueError, match=match):
        c.predict(bad)


def test_thresholds_must_match_the_exits(tiny_artifact):
    with pytest.raises(ValueError, match="one value per exit"):
        Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[0.5, 0.5])


def test_colour_order_and_size_are_handled(tiny_artifact, test_frames):
    frames, _ = test_frames
    c_rgb = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[2.0] * K)
    c_bgr = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[2.0] * K, input_order="BGR")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    a, b = c_rgb.predict(rgb), c_bgr.predict(rgb[:, :, ::-1].copy())
    assert (a.label, a.confidence) == (b.label, pytest.approx(b.confidence, abs=1e-6))
    gray = frames[0][:, :, 0]
    g3 = np.repeat(gray[:, :, None], 3, axis=2)
    assert c_rgb.predict(g3).label == c_rgb.predict(gray).label
    big = np.kron(gray, np.ones((2, 2), np.uint8))  # 56x56: resized back to 28x28
    assert c_rgb.predict(big).label == c_rgb.predict(gray).label


def test_resize_matches_pytorch_bilinear():
    rng = np.random.default_rng(1)
    img = rng.random((37, 23, 3)).astype(np.float32)
    t = torch.from_numpy(img.transpose(2, 0, 1))[None]
    for size in ((28, 28), (50, 40), (37, 23)):
        ref = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(resize_bilinear(img, *size).transpose(2, 0, 1), ref.numpy(), atol=1e-5)


def test_preprocessing_normalises_like_training(fashion_test):
    pre = Preprocessor(fashion_test.preprocessing())
    x = pre(fashion_test.images[0].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(x, normalised(fashion_test, 1)[0], atol=1e-6)


@pytest.mark.parametrize("chans", [1, 3])
def test_uint8_lookup_is_bit_identical_to_the_arithmetic(chans):
    """The lookup-table path gives exactly (v/255 - mean)/std in float32 for every byte and channel."""
    mean, std = [0.485, 0.456, 0.406][:chans], [0.229, 0.224, 0.225][:chans]
    pre = Preprocessor({"in_chans": chans, "input_size": [16, 16], "mean": mean, "std": std})
    every_byte = np.arange(256, dtype=np.uint8).reshape(16, 16)
    frame = np.stack([np.roll(every_byte, 37 * c) for c in range(chans)], axis=2)  # each byte in each channel
    ref = (frame.astype(np.float32) * (1.0 / 255.0)).transpose(2, 0, 1)
    ref = (ref - np.float32(mean).reshape(-1, 1, 1)) / np.float32(std).reshape(-1, 1, 1)
    out = pre(frame)
    assert out.dtype == np.float32 and out.shape == (chans, 16, 16) and out.flags.c_contiguous
    assert np.array_equal(out, ref.astype(np.float32))


def test_deadline_returns_the_best_exit_in_time(tiny_artifact, test_frames):
    frames, _ = test_frames
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[2.0] * K)
    with pytest.raises(ValueError, match="calibrate"):
        c.predict(frames[0], deadline_ms=5)
    # Pretend every unit takes 10 ms at p95 (the real ones take ~0.05 ms, so only a >5 ms stall of
    # this machine could change the outcome). A pair is only started if elapsed + its p95 fits.
    c.set_unit_latency({u.name: 10.0 for u in c.artifact.units})
    c.set_thresholds([1.5] * (K - 1) + [0.0])  # exits 1-7 skipped...
    p = c.predict(frames[0], deadline_ms=15)
    assert p.deadline_hit and p.exit_index == 1  # ...but head 1 runs anyway: nothing else could answer in time
    # Segment k "takes" 10·k ms at p95 and heads nothing: with heads evaluated and (practically)
    # nobody confident enough, the deepest pair started is the last one whose p95 fits what is left.
    c.set_unit_latency({u.name: 10.0 * u.exit_index if u.kind == "segment" else 0.0 for u in c.artifact.units})
    c.set_thresholds([1.0] * (K - 1) + [0.0])
    assert c.predict(frames[0], deadline_ms=25).exit_index == 2
    assert c.predict(frames[0], deadline_ms=45).exit_index == 4
    p = c.predict(frames[0], deadline_ms=1000)
    assert not p.deadline_hit and p.exit_index == K


def test_confidence_policies():
    logits = np.array([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.9, -3.0]])
    ms, mg, en = max_softmax(logits), margin(logits), entropy(logits)
    assert ms[1] == pytest.approx(1 / 3) and mg[1] == pytest.approx(0) and en[1] == pytest.approx(0, abs=1e-9)
    assert en[0] > 0.8 and mg[2] < 0.1
    assert all(((v >= 0) & (v <= 1)).all() for v in (ms, mg, en))


def test_margin_policy_runs_in_the_cascade(tiny_artifact, test_frames, torch_outputs):
    frames, _ = test_frames
    th = [0.5] * K
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=th, policy="margin")
    preds = c.predict_batch(frames[:300])
    conf = np.stack([margin(z[:300]) for z in torch_outputs], 1)
    take = conf >= 0.5
    take[:, -1] = True
    exits = take.argmax(1)
    agree = np.mean([p.exit_index - 1 == e for p, e in zip(preds, exits, strict=True)])
    assert agree >= 0.99  # a margin within 1e-6 of 0.5 may fall either side
    np.testing.assert_allclose([p.confidence for p in preds], conf[np.arange(300), exits], atol=1e-4)
    max_softmax_exits = [
        p.exit_index
        for p in Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=th).predict_batch(frames[:300])
    ]
    assert max_softmax_exits != [p.exit_index for p in preds]


def test_threshold_changes_race_with_predicting_threads(tiny_artifact, test_frames):
    """4 threads predict on real frames while a 5th swaps between "always the final exit" and
    "always exit 1" for 2 s: no exception, and every answer is one that one of the two plans gives."""
    import time

    frames, _ = test_frames
    frames = frames[:100]
    final_plan, first_plan = [2.0] * (K - 1) + [0.0], [0.0] * K
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=final_plan)
    allowed = [
        {(p.label, p.exit_index) for p in (c.derive(th).predict(f) for th in (final_plan, first_plan))} for f in frames
    ]
    stop, errors, seen = threading.Event(), [], [0] * 4

    def predict(t):
        i = 0
        while not stop.is_set():
            try:
                p = c.predict(frames[i % len(frames)])
                if (p.label, p.exit_index) not in allowed[i % len(frames)]:
                    errors.append(f"frame {i % len(frames)}: {(p.label, p.exit_index)}")
            except Exception as e:  # noqa: BLE001 - any exception is a failure of the test
                errors.append(repr(e))
            i += 1
        seen[t] = i

    threads = [threading.Thread(target=predict, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    t_end, swaps = time.perf_counter() + 2.0, 0
    while time.perf_counter() < t_end:
        c.set_thresholds(first_plan if swaps % 2 == 0 else final_plan)
        swaps += 1
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(seen) > 1000 and swaps > 100
    print(f"race: {sum(seen)} predictions checked, {swaps} plan swaps")


def test_close_while_other_threads_predict_does_not_crash(tiny_artifact, test_frames):
    from edgeexit.runtime.cascade import CascadeClosedError

    frames, _ = test_frames
    c = Cascade.load(tiny_artifact, backend="onnxruntime", thresholds=[0.8] * K)
    outcomes = []

    def predict():
        for f in frames[:400]:
            try:
                c.predict(f)
                outcomes.append("ok")
            except CascadeClosedError:
                outcomes.append("closed")

    threads = [threading.Thread(target=predict) for _ in range(3)]
    for t in threads:
        t.start()
    while len(outcomes) < 50:
        pass
    c.close()
    for t in threads:
        t.join()
    assert len(outcomes) == 1200 and "ok" in outcomes and "closed" in outcomes
    with pytest.raises(CascadeClosedError):
        c.predict(frames[0])


def test_fused_exits_give_the_same_predictions(artifact_copy, test_frames):
    """Each evaluated exit's segments and head run as one graph: same answers as unit by unit."""
    from edgeexit.runtime.fusion import fused_path
    from edgeexit.runtime.plan import segment_groups

    frames, _ = test_frames
    frames = frames[:300]
    th = [0.9, 2.0, 2.0, 0.8, 2.0, 2.0, 2.0, 0.0]
    assert segment_groups([t <= 1 for t in th[:-1]] + [True]) == ((0, 0), (1, 3), (4, 7))
    plain = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th, fuse=False)
    fused = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th, unit_timing=True)
    units = plain.artifact.units
    for first, last in ((0, 0), (1, 3), (4, 7)):
        assert fused_path(artifact_copy, units, first, last).is_file()
    assert fused.runner.fused_groups == {(0, 0), (1, 3), (4, 7)}
    assert plain.runner.fused_groups == set()  # fuse=False builds nothing
    fused.runner.prepare(CascadePlan.first_exit(K), True)  # another plan's groups: every single exit
    assert len(fused.runner.fused_groups) == 10
    fused.runner.forget([fused.plan])  # what profiling does after timing a group
    assert fused.runner.fused_groups == {(0, 0), (1, 3), (4, 7)}
    a, b = plain.predict_batch(frames), fused.predict_batch(frames)
    assert [(p.label, p.exit_index) for p in a] == [(p.label, p.exit_index) for p in b]
    np.testing.assert_allclose([p.confidence for p in a], [p.confidence for p in b], atol=1e-5)
    singles = [fused.predict(f) for f in frames[:100]]  # the frame path: one call per evaluated exit
    assert [(p.label, p.exit_index) for p in singles] == [(p.label, p.exit_index) for p in a[:100]]
    np.testing.assert_allclose([p.confidence for p in singles], [p.confidence for p in a[:100]], atol=1e-5)
    assert len({p.exit_index for p in singles}) == 3
    one = fused.predict(frames[0])
    assert "seg_05-08" in one.unit_latency_ms or "seg_02-04" in one.unit_latency_ms
    # a runtime without the onnx package still uses the cached fused graphs
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from edgeexit.runtime import Cascade\n"
        f"c = Cascade.load({str(artifact_copy)!r}, backend='onnxruntime', thresholds={th!r})\n"
        "assert (4, 7) in c.runner.fused_groups\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
def test_torch_backend_graph_bookkeeping_on_cpu(tiny_artifact, test_frames, monkeypatch):
    """The CUDA-graph cache logic of the torch backend, with capture simulated on the CPU: replays
    equal eager results, the cache is capped, and a unit that cannot be captured is not retried."""
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends.torch import TorchBackend

    be = TorchBackend(Artifact.load(tiny_artifact), device="cpu")
    be.use_graphs, be.max_graphs = True, 6
    captures = []

    def fake_capture(fn, inputs):
        if fn is be.segments[2]:
            raise RuntimeError("operation not permitted when stream is capturing")
        captures.append(fn)
        static_in = tuple(t.clone() for t in inputs)
        static_out = tuple(o.clone() for o in fn(*static_in))

        class Graph:
            def replay(self):
                for dst, src in zip(static_out, fn(*static_in), strict=True):
                    dst.copy_(src)

        return Graph(), static_in, static_out

    monkeypatch.setattr(be, "_capture", fake_capture)
    full = [2.0] * (K - 1) + [0.0]  # every segment and the last head run
    eager = Cascade.load(tiny_artifact, backend="torch", thresholds=full)
    graphed = Cascade(eager.artifact, be, thresholds=full)
    frames, _ = test_frames
    for batch in (1, 3, 1, 5):
        a = eager.predict_batch(frames[:batch])
        b = graphed.predict_batch(frames[:batch])
        assert [(p.label, p.exit_index) for p in a] == [(p.label, p.exit_index) for p in b]
    stats = be.graph_stats()
    assert stats.count == 6 and len(captures) == 6  # capped (seg 3 could not be captured)
    assert [unit for unit, _ in stats.failed] == ["seg_03"]


def test_onnxruntime_io_binding_path_equals_the_plain_path(artifact_copy, test_frames):
    """The IOBinding path onnxruntime-cuda uses (state kept as device OrtValues), run on the CPU."""
    frames, _ = test_frames
    th = [0.9, 2.0, 2.0, 0.8, 2.0, 0.7, 2.0, 0.0]  # fused groups and compaction both happen
    plain = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th)
    bound = Cascade.load(artifact_copy, backend="onnxruntime", thresholds=th, io_binding=True)
    assert bound.runner.io_binding and not plain.runner.io_binding
    a, b = plain.predict_batch(frames[:300]), bound.predict_batch(frames[:300])
    assert [(p.label, p.exit_index) for p in a] == [(p.label, p.exit_index) for p in b]
    assert len({p.exit_index for p in a}) >= 3
    np.testing.assert_allclose([p.confidence for p in a], [p.confidence for p in b], atol=1e-6)
    assert [(p.label, p.exit_index) for p in (bound.predict(f) for f in frames[:50])] == [
        (p.label, p.exit_index) for p in a[:50]
    ]
