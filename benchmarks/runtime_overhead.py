"""Splitting overhead and soak test of the runtime (ONNX Runtime, CPU, batch 1).

    python benchmarks/runtime_overhead.py runs/quickstart/model.edgeexit --soak 100000

1. Splitting overhead: the cascade with every intermediate exit skipped (all segments + the final
   head, run as separate ONNX units) vs ONE ONNX model of backbone + final head exported from the
   same weights; both on ONNX Runtime CPU with 1 intra-op thread, on the same preprocessed image.
2. Soak: N `predict` calls on real frames at the calibrated thresholds; RSS growth after warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_monolithic(artifact: Path) -> Path:
    import torch

    from edgeexit.models import MultiExitConfig, build_model

    blob = torch.load(artifact / "weights.pt", weights_only=True)
    model = build_model(MultiExitConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()

    class Plain(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            state = (x,)
            for seg in self.m.segments:
                state = seg(*state)
            logits, _ = self.m.heads[-1](state[-1])
            return logits, torch.softmax(logits, 1).amax(1)

    cfg = model.config
    path = Path(tempfile.mkdtemp()) / "plain.onnx"
    torch.onnx.export(
        Plain(model).eval(),
        (torch.zeros(1, cfg.in_chans, *cfg.input_size),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits", "confidence"],
        opset_version=17,
        dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}, "confidence": {0: "b"}},
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--repeats", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--soak", type=int, default=100000)
    args = ap.parse_args()
    artifact = Path(args.artifact)

    import onnxruntime as ort
    from edgeexit.calibrate.profiler import time_call

    from edgeexit.calibrate.run import load_frames
    from edgeexit.runtime import Cascade

    cascade = Cascade.load(artifact, backend="onnxruntime")
    unfused = Cascade.load(
        artifact, backend="onnxruntime", fuse=False, thresholds=[2.0] * (cascade.num_exits - 1) + [0]
    )
    frames, labels, _ = load_frames(cascade.manifest, None, "heldout", None)
    x = cascade.preprocess(frames[0])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    plain = ort.InferenceSession(str(export_monolithic(artifact)), opts, providers=["CPUExecutionProvider"])
    feed = {"image": x[None]}
    k = cascade.num_exits
    saved = cascade.thresholds.copy()
    cascade.set_thresholds([2.0] * (k - 1) + [0.0])
    be = cascade.backend

    def units_only():
        state = be.from_host(x[None])
        for i in range(k):
            state = be.run_segment(i, state)
        be.run_head(k - 1, state[-1])

    rows = []
    for _ in range(args.rounds):  # interleaved rounds: drift on a shared machine hits every side
        mono = time_call(lambda: plain.run(None, feed), lambda: None, args.repeats, 0.0)
        chain = time_call(units_only, lambda: None, args.repeats, 0.0)
        casc_unfused = time_call(lambda: unfused.predict(x), lambda: None, args.repeats, 0.0)
        casc = time_call(lambda: cascade.predict(x), lambda: None, args.repeats, 0.0)
        rows.append(
            (
                mono["p50_ms"],
                chain["p50_ms"],
                casc_unfused["p50_ms"],
                casc["p50_ms"],
                mono["mean_ms"],
                casc_unfused["mean_ms"],
                casc["mean_ms"],
            )
        )
    a = np.median(np.array(rows), axis=0)
    print("| what (batch 1, ORT CPU, 1 thread, median of interleaved rounds) | p50 ms | mean ms | / one model (p50) |")
    print("|---|---|---|---|")
    print(f"| one ONNX model: backbone + final head | {a[0]:.4f} | {a[4]:.4f} | 1.000 |")
    print(f"| 9 units (8 segments + final head) called one by one | {a[1]:.4f} | | {a[1] / a[0]:.3f} |")
    print(
        f"| `Cascade.predict`, intermediate exits skipped, `fuse=False` | {a[2]:.4f} | {a[5]:.4f} | {a[2] / a[0]:.3f} |"
    )
    print(
        f"| `Cascade.predict`, intermediate exits skipped (fused, default) | {a[3]:.4f} | {a[6]:.4f} | "
        f"{a[3] / a[0]:.3f} |"
    )

    if args.soak:
        cascade.set_thresholds(saved)
        n = len(frames)
        for i in range(1000):
            cascade.predict(frames[i % n])
        start = rss_mb()
        peak = start
        for i in range(args.soak):
            cascade.predict(frames[i % n])
            if i % 10000 == 0:
                peak = max(peak, rss_mb())
        end = rss_mb()
        print(
            f"\nsoak: {args.soak} predict calls at the calibrated thresholds: RSS {start:.1f} MB → {end:.1f} MB "
            f"(growth {end - start:+.1f} MB, peak {max(peak, end):.1f} MB)"
        )


if __name__ == "__main__":
    main()
