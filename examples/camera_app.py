"""A camera app that embeds the edgeexit runtime: live cameras → Streams (one batch per tick) → overlay.

    python examples/camera_app.py runs/quickstart/model.edgeexit --source 0                    # webcam
    python examples/camera_app.py model.edgeexit --source 0 --source rtsp://10.0.0.5/stream   # two cameras
    python examples/camera_app.py model.edgeexit --source clip.mp4 --realtime --deadline-ms 3 # a file as a camera

Each source has its own reader thread that keeps only the newest frame (a frame the app did not
take in time is counted as dropped, never queued), so every answer is about a frame of now; each
tick runs the newest frame of every camera as one early-exit batch. Needs only numpy, onnxruntime
(or TensorRT) and OpenCV: no PyTorch on the device.
"""

from __future__ import annotations

import argparse
import sys

from edgeexit.runtime import Cascade, Streams


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="NAME.edgeexit folder (calibrated for the thresholds)")
    ap.add_argument("--source", action="append", help="camera index, stream URL or video file (repeatable)")
    ap.add_argument("--realtime", action="store_true", help="play video files at their frame rate, as cameras")
    ap.add_argument("--backend", default="auto", help="auto, tensorrt, onnxruntime, torch")
    ap.add_argument("--deadline-ms", type=float, default=None, help="anytime deadline per frame")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    ap.add_argument("--max-frames", type=int, default=None, help="stop after N frames per source")
    ap.add_argument("--show", action="store_true", help="open a window per camera with the overlay")
    args = ap.parse_args()

    cascade = Cascade.load(args.artifact, backend=args.backend)  # each source says its channel order

    def event(source, kind, message):  # a camera unplugged, a stream reconnecting ...
        print(f"[{kind}] {message}", file=sys.stderr)

    streams = Streams(
        cascade,
        args.source or ["0"],
        realtime=args.realtime,
        deadline_ms=args.deadline_ms,
        max_frames=args.max_frames,
        on_event=event,
    )
    several = len(streams.sources) > 1
    try:
        with streams:
            for r in streams.results(duration_s=args.seconds):
                p = r.prediction
                print(
                    f"{r.source + ' ' if several else ''}frame {r.frame_id}: {p.class_name} "
                    f"conf {p.confidence:.2f} exit {p.exit_index} "
                    f"preprocess {p.preprocess_ms:.2f} ms + cascade {p.latency_ms:.2f} ms, "
                    f"capture to result {r.e2e_ms:.1f} ms"
                )
                if args.show:
                    import cv2

                    frame = r.image.copy()
                    cv2.putText(frame, f"{p.class_name} e{p.exit_index}", (8, 24), 0, 0.6, (0, 255, 0), 2)
                    cv2.imshow(r.source, frame)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
    except KeyboardInterrupt:
        pass
    finally:
        cascade.close()
    for s in streams.summary()["streams"]:
        e2e = s["e2e_latency_ms"]
        print(
            f"{s['source']}: {s['frames']} frames ({s['fps']:.1f}/s), {s['dropped']} dropped, "
            f"capture to result p50 {e2e['p50'] or 0:.1f} p95 {e2e['p95'] or 0:.1f} ms, status {s['status']}"
        )
    print(f"torch imported: {sys.modules.get('torch') is not None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
