"""`make gpu-check`: everything edgeexit can check on a CUDA GPU, in one run, into one JSON.

    python benchmarks/gpu_check.py [--json gpu-check.json] [--data-dir data/fashion-mnist]

Order (each step is timed and recorded; a failing step records its error and the next one runs):
1. a model: `runs/quickstart/model.pt` if present, else a short GPU training run (width 1/4);
2. torch backend on CUDA, eager and with CUDA graphs, vs ONNX Runtime CPU: predictions on 1,000
   Fashion-MNIST test images (the cascade at its calibrated or default thresholds);
3. per-unit and cascade latency at batch 1 and 64 (`edgeexit bench --backend torch`);
4. GPU training throughput (`benchmarks/train_throughput.py`, width 1, batch 64 and 512,
   bf16 + channels_last);
5. TensorRT, if `import tensorrt` works: an artifact with every ONNX flavour, `edgeexit engines`
   fp32 and fp16 on it (built, gated, published), parity with CUDA graphs off and on, latency;
6. onnxruntime-cuda parity and latency, if onnxruntime has the CUDA execution provider.

0. cudart smoke (cuda-python, when importable): buffers, H2D/D2D/D2H copies, stream capture,
   graph instantiate + launch, pinned (and, on an integrated GPU, mapped) host staging: the same
   calls the TensorRT backend makes.

Comparisons run at fixed test thresholds where every exit takes rows (not only the full-model
plan), plus a per-exit `exit_statistics` comparison judged against the engine gate's tolerance for
the precision (edgeexit.runtime.compare.TOLERANCES): a step whose numbers miss it FAILS.
The JSON is rewritten after every step; the exit status is 1 when any step failed.
On a machine without a CUDA GPU it says so in one line and exits 0 having checked nothing.
Designed to finish within 8 minutes on one H100/H200-class GPU. Works with torch + CUDA only: no
onnxslim needed (export then skips simplification), no Debian dataset package: data/ is
git-ignored, so copy it along explicitly (`data/fashion-mnist/*.gz`, 30 MB) and run
`python benchmarks/gpu_check.py --data-dir data/fashion-mnist`. Without data it fails fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gpu_present() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, torch.cuda.get_device_name(0)


TH = [0.9, 2.0, 0.8, 2.0, 0.7, 0.7, 0.6, 0.0]  # every exit takes rows (as tests/test_tensorrt_sim.py)
JSON_PATH: Path | None = None


def _save(report: dict) -> None:
    if JSON_PATH is not None:
        tmp = JSON_PATH.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, JSON_PATH)


def step(report: dict, name: str, fn, *args) -> object:
    try:
        return _step(report, name, fn, *args)
    finally:
        _save(report)


def _step(report: dict, name: str, fn, *args) -> object:
    t0 = time.perf_counter()
    try:
        value = fn(*args)
        failures = value.get("failures") if isinstance(value, dict) else None
        seconds = round(time.perf_counter() - t0, 1)
        report[name] = {"ok": not failures, "seconds": seconds, "result": value}
        if failures:  # the numbers were measured and miss their tolerance: the step fails
            report[name]["error"] = "; ".join(failures[:5])
            print(f"[gpu-check] {name}: FAILED (out of tolerance) {report[name]['error']}", flush=True)
        else:
            print(f"[gpu-check] {name}: ok ({seconds} s)", flush=True)
        return value
    except Exception as e:  # record and go on: one broken step must not hide the others
        report[name] = {
            "ok": False,
            "seconds": round(time.perf_counter() - t0, 1),
            "error": repr(e),
            "traceback": traceback.format_exc()[-3000:],
        }
        print(f"[gpu-check] {name}: FAILED {e!r}", flush=True)
        return None


def get_model(work: Path, data_dir: str | None) -> str:
    existing = ROOT / "runs" / "quickstart" / "model.pt"
    if existing.is_file():
        return str(existing)
    from edgeexit.train.trainer import TrainConfig, train

    cfg = TrainConfig.from_recipe(
        "fashion-mnist",
        "mlcsd",
        out=str(work / "run"),
        data_dir=data_dir,
        epochs=2,
        width=0.25,
        train_images=20000,
        device="cuda",
        force=True,
    )
    train(cfg, progress=False)
    return str(work / "run" / "model.pt")


def export(model_pt: str, work: Path, data_dir: str | None, half: bool = False) -> str:
    """The ONNX artifact (with ``half``: also the FP16 flavour, for `edgeexit engines --half`)."""
    from edgeexit.export.exporter import export_checkpoint

    out = work / f"model{'.all' if half else ''}.edgeexit"
    import importlib.util

    simplify = importlib.util.find_spec("onnxslim") is not None
    export_checkpoint(model_pt, out=out, force=True, data_dir=data_dir, half=half, simplify=simplify)
    return str(out)


def engines(artifact: str, precision: str) -> dict:
    """`edgeexit engines ARTIFACT [--half]` on this GPU: build, gate (graphs off and on), publish."""
    from edgeexit.export.tensorrt import build_artifact_engines

    gate = build_artifact_engines(artifact, half=precision == "fp16", force=True)
    return {k: gate[k] for k in ("precision", "frames", "tolerance", "max_abs_confidence_diff",
                                 "min_prediction_agreement", "failures", "passed")}  # fmt: skip


def test_frames(data_dir: str | None, n: int = 1000):
    from edgeexit.data import load_dataset

    ds = load_dataset("fashion-mnist", "test", data_dir)
    return ds.images[:n].permute(0, 2, 3, 1).numpy(), ds.labels[:n].numpy()


def parity(artifact: str, frames, labels, backend: str, **options) -> dict:
    """``backend`` vs ONNX Runtime CPU FP32, judged by the engine gate's comparator
    (edgeexit.runtime.compare.compare_exits, the tolerance of the precision: fp32 includes TF32):
    per exit, max |Δconfidence| and prediction agreement; a miss is listed in ``failures`` and
    fails the step."""
    import numpy as np

    from edgeexit.runtime import Cascade
    from edgeexit.runtime.compare import compare_exits

    ref = Cascade.load(artifact, backend="onnxruntime", thresholds=TH, fuse=False)
    other = Cascade.load(artifact, backend=backend, thresholds=TH, **options)
    images, precision = ref.preprocessor.batch(frames), options.get("precision") or "fp32"
    c = compare_exits(ref.runner, other.runner, images, labels, num_exits=ref.num_exits, tolerance=precision)
    out: dict = {"failures": list(c.failures), "tolerance": c.tolerance.to_json()}
    out["per_exit"] = {
        "prediction_agreement": [e.prediction_agreement for e in c.exits],
        "max_abs_confidence_diff": [e.max_abs_confidence_diff for e in c.exits],
        "disagreement_upper": [e.disagreement_upper for e in c.exits],
    }
    for batch in (1, 64):
        a, b = [], []
        for s in range(0, len(frames), batch):
            a += ref.predict_batch(frames[s : s + batch]) if batch > 1 else [ref.predict(frames[s])]
            b += other.predict_batch(frames[s : s + batch]) if batch > 1 else [other.predict(frames[s])]
        same = np.mean([(x.label, x.exit_index) == (y.label, y.exit_index) for x, y in zip(a, b, strict=True)])
        out[f"batch_{batch}"] = {
            "agreement": float(same),
            "accuracy_reference": float(np.mean([x.label == y for x, y in zip(a, labels, strict=True)])),
            "accuracy": float(np.mean([x.label == y for x, y in zip(b, labels, strict=True)])),
            "max_abs_confidence_diff": float(max(abs(x.confidence - y.confidence) for x, y in zip(a, b, strict=True))),
        }
    out["backend"] = other.backend_info
    return out


def bench(artifact: str, backend: str, data_dir: str | None, **options) -> dict:
    from edgeexit.bench import bench_cascade
    from edgeexit.runtime import Cascade

    res = {}
    for batch in (1, 64):
        c = Cascade.load(artifact, backend=backend, **options)
        r = bench_cascade(c, batch=batch, repeats=200, images=500 if batch == 1 else 0, data_dir=data_dir)
        res[f"batch_{batch}"] = {
            k: r[k] for k in ("units", "full_cascade_ms", "early_exit_ms", "backbone_and_final_head_ms")
        }
    return res


def train_throughput() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import measure

    return {f"width_1_batch_{b}": measure(1.0, b, 30, 10, "cuda", 3, 32) for b in (64, 512)}


def cudart_smoke() -> dict:
    """The cuda-python calls of the TensorRT backend, for real: no TensorRT needed (D21)."""
    import numpy as np

    from edgeexit.runtime.backends.cuda import (
        DeviceBuffer,
        HostBuffer,
        check,
        copy_rows,
        create_stream,
        cuda_device_info,
        cudart,
        graph_instantiate,
    )

    rt = cudart()
    info = cuda_device_info()
    stream = create_stream()
    x = np.arange(64 * 10, dtype=np.float32).reshape(64, 10)
    a, b = DeviceBuffer(x.nbytes), DeviceBuffer(x.nbytes)
    k = rt.cudaMemcpyKind
    check(rt.cudaMemcpyAsync(a.ptr, x.ctypes.data, x.nbytes, k.cudaMemcpyHostToDevice, stream))
    rows = np.array([0, 1, 2, 10, 11, 40])
    copy_rows(b.ptr, a.ptr, rows, 40, k.cudaMemcpyDeviceToDevice, stream)
    out = np.zeros((len(rows), 10), np.float32)
    check(rt.cudaMemcpyAsync(out.ctypes.data, b.ptr, out.nbytes, k.cudaMemcpyDeviceToHost, stream))
    check(rt.cudaStreamSynchronize(stream))
    assert np.array_equal(out, x[rows]), "copy_rows gave wrong rows"
    check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    check(rt.cudaMemcpyAsync(b.ptr, a.ptr, x.nbytes, k.cudaMemcpyDeviceToDevice, stream))
    graph = check(rt.cudaStreamEndCapture(stream))
    exe = graph_instantiate(graph)
    check(rt.cudaGraphDestroy(graph))
    check(rt.cudaMemsetAsync(b.ptr, 0, x.nbytes, stream))
    check(rt.cudaGraphLaunch(exe, stream))
    back = np.zeros_like(x)
    check(rt.cudaMemcpyAsync(back.ctypes.data, b.ptr, x.nbytes, k.cudaMemcpyDeviceToHost, stream))
    check(rt.cudaStreamSynchronize(stream))
    assert np.array_equal(back, x), "graph replay did not copy"
    check(rt.cudaGraphExecDestroy(exe))
    # D20: the backend's page-locked staging (and mapped zero copy on an integrated GPU)
    pin_in, pin_out = HostBuffer(x.nbytes), HostBuffer(x.nbytes, mapped=info["integrated"])
    pin_in.array()[: x.size] = x.ravel()
    check(rt.cudaMemcpyAsync(a.ptr, pin_in.ptr, x.nbytes, k.cudaMemcpyHostToDevice, stream))
    check(rt.cudaMemcpyAsync(pin_out.ptr, a.ptr, x.nbytes, k.cudaMemcpyDeviceToHost, stream))
    check(rt.cudaStreamSynchronize(stream))
    assert np.array_equal(pin_out.array()[: x.size], x.ravel()), "pinned round trip gave wrong bytes"
    pin_in.close(), pin_out.close()
    a.close(), b.close()
    check(rt.cudaStreamDestroy(stream))
    _, drv = rt.cudaDriverGetVersion()
    _, run = rt.cudaRuntimeGetVersion()
    return {**info, "driver": int(drv), "runtime": int(run)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu-check.json"))
    ap.add_argument("--data-dir", default=str(ROOT / "data" / "fashion-mnist"))
    args = ap.parse_args()
    ok, what = gpu_present()
    if not ok:
        print(f"gpu-check: no CUDA GPU here ({what}); nothing checked")
        return 0
    global JSON_PATH
    JSON_PATH = Path(args.json)
    data_dir = args.data_dir if Path(args.data_dir).is_dir() else None
    work = ROOT / "runs" / "gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": what, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    import importlib.util

    if importlib.util.find_spec("cuda") is not None:
        step(report, "cudart_smoke", cudart_smoke)
    else:
        report["cudart_smoke"] = "not checked: cuda-python is not installed"
    has_data = (data_dir and Path(data_dir, "t10k-images-idx3-ubyte.gz").is_file()) or Path(
        "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    ).is_file()
    if not has_data and not (ROOT / "runs" / "quickstart" / "model.pt").is_file():
        report["data"] = {
            "ok": False,
            "error": f"no Fashion-MNIST in {args.data_dir} or /usr/share/datasets: copy "
            "data/fashion-mnist (the four .gz files, 30 MB) along",
        }
        _save(report)
        print(f"[gpu-check] FAILED: {report['data']['error']}", flush=True)
        return 1
    model_pt = step(report, "model", get_model, work, data_dir)
    artifact = step(report, "export_onnx", export, model_pt, work, data_dir) if model_pt else None
    frames_labels = step(report, "test_frames", lambda: test_frames(data_dir)) if artifact else None
    if frames_labels is not None:
        report["test_frames"]["result"] = len(frames_labels[1])
        step(report, "torch_cuda_eager_parity", parity, artifact, *frames_labels, "torch", cuda_graphs=False)
        step(report, "torch_cuda_graphs_parity", parity, artifact, *frames_labels, "torch", cuda_graphs=True)
        step(report, "torch_cuda_bench", bench, artifact, "torch", data_dir)
    step(report, "train_throughput", train_throughput)
    try:
        import tensorrt  # noqa: F401

        every = step(report, "export_all_flavours", export, model_pt, work, data_dir, True) if model_pt else None
        for precision in ("fp32", "fp16") if every else ():
            if step(report, f"engines_{precision}", engines, every, precision) and frames_labels is not None:
                for graphs in (False, True):
                    name = f"tensorrt_{precision}_{'graphs' if graphs else 'plain'}_parity"
                    step(report, name, parity, every, *frames_labels, "tensorrt", precision=precision,
                         cuda_graphs=graphs)  # fmt: skip
        if every and frames_labels is not None:
            step(report, "tensorrt_bench", bench, every, "tensorrt", data_dir)
    except ImportError as e:
        report["tensorrt"] = f"not checked: {e}"
    from edgeexit.runtime.backends.onnxruntime import cuda_provider_available

    if cuda_provider_available() and frames_labels is not None:
        step(report, "onnxruntime_cuda_parity", parity, artifact, *frames_labels, "onnxruntime-cuda")
    else:
        report["onnxruntime_cuda"] = "not checked: no CUDAExecutionProvider in this onnxruntime"
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    report["failed_steps"] = failed
    _save(report)
    print(f"[gpu-check] wrote {args.json}; {'FAILED: ' + ', '.join(failed) if failed else 'all steps ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
