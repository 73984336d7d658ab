"""Splitting overhead, Python overhead per frame, and soak test of the runtime (CPU, batch 1).

    python benchmarks/runtime_overhead.py runs/quickstart/model.edgeexit --soak 100000
    python benchmarks/runtime_overhead.py --null-only        # just the null-backend rows (no artifact)

0. Null backend: `Cascade.predict` on a runner that does no work (8 exits, float input already
   normalised), so what is left is the cascade's own Python per frame: frame checks, the plan
   loop, decisions, the Prediction. Rows: every exit evaluated (nobody confident: all 8 heads run)
   and every intermediate exit skipped (one fused segment group + the final head).

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


def null_cascade(thresholds, k: int = 8):
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends import HeadOutput, Runner, RunnerInfo

    class NullRunner(Runner):
        """Does no work: every head says 'not confident' about class 0."""

        thread_safe = True
        info = RunnerInfo(name="null", version="0", device="none", fuses=True)
        _head = HeadOutput(np.zeros(1, np.float32), np.zeros((1, 10), np.float32))

        def from_host(self, x):
            return (x,)

        def run_segment(self, pos, state):
            return state

        def run_segments(self, first_pos, last_pos, state, fuse=True):
            return state

        def run_head(self, pos, tap):
            return self._head

        def take(self, state, rows):
            return state

        def synchronize(self):
            pass

        def close(self):
            pass

    pre = {"in_chans": 1, "input_size": [28, 28], "mean": [0.5], "std": [0.25]}
    return Cascade(Artifact.in_memory(k, [str(i) for i in range(10)], pre), NullRunner(), thresholds=thresholds)


def null_overhead(rounds: int = 5, calls: int = 20000) -> None:
    import time

    k = 8
    x = np.zeros((1, 28, 28), np.float32)
    every = null_cascade([0.5] * (k - 1) + [0.0])
    skipped = null_cascade([2.0] * (k - 1) + [0.0])
    rows = []
    for _ in range(rounds):  # interleaved
        row = []
        for c in (every, skipped):
            t = time.perf_counter()
            for _ in range(calls):
                c.predict(x)
            row.append((time.perf_counter() - t) / calls * 1e6)
        rows.append(row)
    a = np.median(np.array(rows), axis=0)
    print("| null backend (no work), `Cascade.predict`, batch 1, median of interleaved rounds | µs per frame |")
    print("|---|---|")
    print(f"| every exit evaluated (8 heads run, final exit answers) | {a[0]:.2f} |")
    print(f"| every intermediate exit skipped (1 fused group + final head) | {a[1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--null-only", action="store_true", help="only the null-backend rows")
    ap.add_argument("--repeats", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--soak", type=int, default=100000)
    args = ap.parse_args()
    null_overhead()
    if args.null_only:
        return
    if not args.artifact:
        ap.error("give an artifact (or --null-only)")
    artifact = Path(args.artifact)

    import onnxruntime as ort

    from edgeexit.data.frames import load_frames
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.plan import CascadePlan
    from edgeexit.runtime.profiling import time_call

    cascade = Cascade.load(artifact, backend="onnxruntime")
    unfused = cascade.derive(CascadePlan.full_model(cascade.num_exits), fuse=False)
    frames, labels, _ = load_frames(cascade.artifact, None, "heldout", None)
    x = cascade.preprocessor(frames[0])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    plain = ort.InferenceSession(str(export_monolithic(artifact)), opts, providers=["CPUExecutionProvider"])
    feed = {"image": x[None]}
    k = cascade.num_exits
    calibrated = cascade.plan
    cascade.set_thresholds(CascadePlan.full_model(k))
    be = cascade.runner

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
        cascade.set_thresholds(calibrated)
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
