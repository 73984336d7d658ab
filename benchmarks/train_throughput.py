"""Training throughput (images/s) of the 8-exit MLCSD model: a fixed number of steps after warm-up.

    python benchmarks/train_throughput.py --widths 1.0 0.25 --batch 64 --steps 20

On CUDA it uses the trainer's GPU path (channels_last + bf16 autocast, data on the GPU). Timing
excludes warm-up steps and synchronises before reading the clock.
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(width: float, batch: int, steps: int, warmup: int, device: str, in_chans: int, size: int) -> float:
    from edgeexit.data import augment
    from edgeexit.models import MultiExitConfig, build_model
    from edgeexit.train.losses import build_task
    from edgeexit.train.recipes import get_recipe

    dev = torch.device(device)
    model = build_model(
        MultiExitConfig(exits=8, width=width, in_chans=in_chans, num_classes=10, input_size=[size, size])
    )
    task = build_task("mlcsd", model, get_recipe("cifar10", "mlcsd").loss).to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    data = torch.randint(0, 256, (batch * 4, in_chans, size, size), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 10, (batch * 4,), device=dev)
    g = torch.Generator().manual_seed(0)

    def step(i):
        idx = torch.arange(i % 4 * batch, (i % 4 + 1) * batch, device=dev)
        x = augment(data[idx], g).float().div_(255)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = task(x, labels[idx])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", nargs="+", type=float, default=[1.0, 0.25])
    ap.add_argument("--batch", nargs="+", type=int, default=[64])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| width | batch | images/s |\n|---|---|---|")
    for w in args.widths:
        for b in args.batch:
            ips = measure(w, b, args.steps, args.warmup, args.device, args.in_chans, args.size)
            print(f"| {w} | {b} | {ips:.0f} |", flush=True)


if __name__ == "__main__":
    main()
