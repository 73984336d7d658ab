"""Export a checkpoint and check the chained ONNX Runtime cascade against PyTorch on real test images.

    python benchmarks/export_parity.py runs/quickstart/model.pt --images 1000 --batches 1 7 64

Reports export time, per-unit ONNX size and export time, and per-exit max |Δlogit| and prediction
agreement for every batch size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 7, 64])
    args = ap.parse_args()

    import onnxruntime as ort

    from edgeexit.data import load_dataset, normalize
    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint

    dest = Path(tempfile.mkdtemp()) / "bench.edgeexit"
    t0 = time.perf_counter()
    manifest, _ = export_checkpoint(args.checkpoint, out=dest)
    export_s = time.perf_counter() - t0
    print(
        f"export: {export_s:.1f} s total ({manifest['export']['export_s']} s recorded), "
        f"{sum(u['onnx_bytes'] for u in manifest['units']) / 1e6:.2f} MB ONNX"
    )
    print("\n| unit | ONNX KB | export s | MFLOPs | params |\n|---|---|---|---|---|")
    for u in manifest["units"]:
        print(
            f"| {u['name']} | {u['onnx_bytes'] / 1024:.1f} | {u['export_s']:.2f} | {u['flops'] / 1e6:.2f} | "
            f"{u['params']:,} |"
        )
    model = model_from_checkpoint(load_checkpoint(args.checkpoint))
    test = load_dataset("fashion-mnist", "test")
    x = normalize(test.images[: args.images], test.mean, test.std).numpy()
    with torch.no_grad():
        ref = [z.numpy() for z in model(torch.from_numpy(x))[0]]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = {
        u["name"]: ort.InferenceSession(str(dest / u["onnx"]), opts, providers=["CPUExecutionProvider"])
        for u in manifest["units"]
    }
    k = len(manifest["units"]) // 2
    print("\n| batch | " + " | ".join(f"exit {i + 1}" for i in range(k)) + " | predictions equal |")
    print("|---" * (k + 2) + "|")
    for b in args.batches:
        diff = np.zeros(k)
        equal = True
        for s in range(0, len(x), b):
            state = [x[s : s + b]]
            for i in range(k):
                seg, head = manifest["units"][2 * i], manifest["units"][2 * i + 1]
                state = sess[seg["name"]].run(None, {n["name"]: a for n, a in zip(seg["inputs"], state, strict=True)})
                logits, _ = sess[head["name"]].run(None, {head["inputs"][0]["name"]: state[-1]})
                diff[i] = max(diff[i], np.abs(logits - ref[i][s : s + b]).max())
                equal &= bool(np.array_equal(logits.argmax(1), ref[i][s : s + b].argmax(1)))
        print(f"| {b} | " + " | ".join(f"{d:.1e}" for d in diff) + f" | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
