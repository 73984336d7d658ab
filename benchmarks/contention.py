"""Training and `Cascade.predict` throughput alone and beside CPU-bound neighbours (issue 10).

    python benchmarks/contention.py --artifact runs/quickstart/model.edgeexit

A "neighbour" is another 2-thread torch process doing matrix products (what a second training
run, or a camera pipeline's own processing, looks like to the OS). Each configuration runs in a
fresh subprocess (thread settings must be set before torch starts its pool), alone and then with
two neighbours, which the script starts and stops itself (each bounded to --neighbour-s seconds).

Configurations (environment of the measured process only):
- default:   torch's own thread count (2 here), fixed;
- edgeexit:  the same plus the trainer's `edgeexit.util.ContentionGuard` (checked every step),
             which drops to one thread while other processes want the cores;
- --try-env: any other environment to compare (training), e.g. OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TRAIN = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
from edgeexit.util import ContentionGuard
guard = ContentionGuard(torch.get_num_threads, torch.set_num_threads)
adapt = os.environ.get("EDGEEXIT_BENCH_DEFAULTS") == "1"
from edgeexit.models import MultiExitConfig, build_model
from edgeexit.train.losses import build_task
from edgeexit.train.recipes import get_recipe
torch.manual_seed(0)
model = build_model(MultiExitConfig(exits=8, width=0.25, in_chans=1, num_classes=10, input_size=[28, 28]))
task = build_task("mlcsd", model, get_recipe("fashion-mnist", "mlcsd").loss)
opt = torch.optim.SGD(task.parameters(), lr=0.02, momentum=0.9)
x = torch.randn(32, 1, 28, 28); y = torch.randint(0, 10, (32,))
def step():
    loss = task(x, y)["loss"]; opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3): step()
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < float(sys.argv[1]):
    step(); n += 1
    if adapt:
        guard.check()
print(json.dumps({"img_per_s": n * 32 / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))
"""

PREDICT = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import numpy as np
from edgeexit.runtime import Cascade
c = Cascade.load(sys.argv[2], backend="onnxruntime")
frame = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
for _ in range(50): c.predict(frame)
lat = []; t0 = time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[1]):
    lat.append(c.predict(frame).latency_ms)
lat = np.asarray(lat)
print(json.dumps({"frames_per_s": len(lat) / (time.perf_counter() - t0), "p95_ms": float(np.percentile(lat, 95))}))
"""

NEIGHBOUR = r"""
import sys, time, torch
torch.set_num_threads(2)
a = torch.randn(256, 256)
t0 = time.perf_counter()
while time.perf_counter() - t0 < float(sys.argv[1]):
    a = torch.tanh(a @ a)
"""


def run(code: str, seconds: float, defaults, *extra: str) -> dict:
    """``defaults``: True (edgeexit's), False (none) or a dict of environment variables to try."""
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(k, None)
    env["EDGEEXIT_BENCH_DEFAULTS"] = "1" if defaults is True else "0"
    if isinstance(defaults, dict):
        env.update(defaults)
    out = subprocess.run(
        [sys.executable, "-c", code, str(seconds), *extra], env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_neighbours(fn, seconds: float):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    hogs = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(seconds)], env=env) for _ in range(2)]
    try:
        time.sleep(2.0)  # let them start
        return fn()
    finally:
        for h in hogs:
            h.terminate()
        for h in hogs:
            h.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default="runs/quickstart/model.edgeexit")
    ap.add_argument("--training-only", action="store_true")
    ap.add_argument("--seconds", type=float, default=20.0, help="measuring time per configuration")
    ap.add_argument("--try-env", nargs="*", default=[], help="extra settings to try, e.g. GOMP_SPINCOUNT=10000")
    args = ap.parse_args()
    tries = [(e, dict(kv.split("=", 1) for kv in e.split(","))) for e in args.try_env]
    s = args.seconds
    rows = []
    for name, code, extra, key in (
        ("training (MLCSD, width 1/4, batch 32)", TRAIN, (), "img_per_s"),
        ("Cascade.predict (ORT CPU, calibrated)", PREDICT, (args.artifact,), "frames_per_s"),
    ):
        if args.training_only and key != "img_per_s":
            continue
        settings = (("default", False), ("edgeexit", True), *tries) if key == "img_per_s" else (("edgeexit", False),)
        for label, defaults in settings:
            alone = run(code, s, defaults, *extra)
            busy = with_neighbours(lambda code=code, d=defaults, e=extra: run(code, s, d, *e), s + 60)
            rows.append((name, label, alone, busy, key))
            print(f"{name} [{label}]: alone {alone}  contended {busy}", flush=True)
    print("\n| what | settings | alone | with 2 neighbours | kept |")
    print("|---|---|---|---|---|")
    for name, label, alone, busy, key in rows:
        unit = "img/s" if key == "img_per_s" else "frames/s"
        extra = f" (p95 {alone['p95_ms']:.2f} → {busy['p95_ms']:.2f} ms)" if "p95_ms" in alone else ""
        print(
            f"| {name} | {label} | {alone[key]:.0f} {unit} | {busy[key]:.0f} {unit}{extra} | "
            f"{busy[key] / alone[key]:.2f} |"
        )


if __name__ == "__main__":
    main()
