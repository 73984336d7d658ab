"""A camera app that embeds the edgeexit runtime: OpenCV capture loop → Cascade → overlay.

    python examples/camera_app.py runs/quickstart/model.edgeexit --source 0          # webcam
    python examples/camera_app.py model.edgeexit --source clip.mp4 --deadline-ms 3   # video file

Needs only numpy, onnxruntime (or TensorRT) and OpenCV: no PyTorch on the device.
"""

from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np

from edgeexit.runtime import Cascade


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="NAME.edgeexit folder (calibrated for the thresholds)")
    ap.add_argument("--source", default="0", help="camera index or video file")
    ap.add_argument("--backend", default="auto", help="auto, tensorrt, onnxruntime, torch")
    ap.add_argument("--deadline-ms", type=float, default=None, help="anytime deadline per frame")
    ap.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0 = until the stream ends)")
    ap.add_argument("--show", action="store_true", help="open a window with the overlay")
    args = ap.parse_args()

    # OpenCV delivers BGR frames: say so once, the cascade converts and resizes.
    cascade = Cascade.load(args.artifact, backend=args.backend, input_order="BGR")
    cap = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    if not cap.isOpened():
        print(f"cannot open {args.source}", file=sys.stderr)
        return 2
    latencies, n, start = [], 0, time.perf_counter()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        pred = cascade.predict(frame, deadline_ms=args.deadline_ms)
        latencies.append(pred.latency_ms)
        n += 1
        print(
            f"frame {n}: {pred.class_name} conf {pred.confidence:.2f} exit {pred.exit_index} {pred.latency_ms:.2f} ms"
        )
        if args.show:
            cv2.putText(
                frame,
                f"{pred.class_name} (exit {pred.exit_index}, {pred.latency_ms:.1f} ms)",
                (8, 24),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.6,
                (0, 255, 0),
                2,
            )
            cv2.imshow("edgeexit", frame)
            if cv2.waitKey(1) & 0xFF == ord("q"):
                break
        if args.max_frames and n >= args.max_frames:
            break
    cap.release()
    if n:
        lat = np.asarray(latencies)
        print(
            f"{n} frames in {time.perf_counter() - start:.2f} s: cascade mean {lat.mean():.3f} ms, "
            f"p95 {np.percentile(lat, 95):.3f} ms"
        )
    print(f"torch imported: {'torch' in sys.modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
