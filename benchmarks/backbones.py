"""Bring-your-own-backbone benchmark: every torchvision backbone as split units, and as a cascade.

    nice -n 10 python benchmarks/backbones.py --part latency --out docs/backbones_latency.json
    nice -n 10 python benchmarks/backbones.py --part fmnist --out docs/backbones_fmnist.json
    python benchmarks/backbones.py --part plot --png docs/backbones.png

latency (224 px, published widths, random weights: latency does not depend on the weights):
  every backbone's units exported by edgeexit's exporter (TorchScript, opset 17, onnxslim) and the
  same network exported as ONE ONNX model; ONNX Runtime CPU, 1 intra-op thread, batch 1. Rounds
  interleave the whole model and the unit chain (order alternating per round); per unit the median
  over rounds. Split overhead = median(all segments + the final head, run one after the other) /
  median(whole model). MFLOPs are counted from the modules (conv + linear MACs x 2). The whole
  network is also exported with the torch.export-based (dynamo) exporter, when onnxscript imports:
  the opset it produced, node count and parity against PyTorch, next to the TorchScript exporter's.

fmnist (small-input variants, 28 px, 1 channel): each backbone trained jointly (method ce) for a
  short run (--train-images, --epochs), exported, calibrated with --max-drop 0.5pt on its held-out
  frames (ONNX Runtime, 1 thread), then the calibrated cascade and the whole network (the final
  exit only: the static network) are run frame by frame, interleaved, on the first --test-images
  test images. For --frozen BACKBONE also: a static network trained alone (only the final exit's
  loss), then exits added with --freeze-trunk, calibrated the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LATENCY_BACKBONES = [
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "regnet_y_400mf", "regnet_y_800mf",
]  # fmt: skip
# Fashion-MNIST widths: small enough to train on a shared 2-core CPU in minutes
FMNIST = {
    "resnet18": 0.25,
    "mobilenet_v2": 0.5,
    "mobilenet_v3_small": 0.5,
    "mobilenet_v3_large": 0.25,
    "efficientnet_b0": 0.25,
    "regnet_y_400mf": 0.25,
}


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _export_whole(net, path: Path, dynamo: bool, size: int) -> dict:
    """The whole torchvision network as one ONNX model; what the exporter produced."""
    import onnx
    import torch

    # eval before each export and again after it: the TorchScript exporter restores the mode it found
    # by net.train(mode), which reaches every submodule (BatchNorm would then use batch statistics)
    net.eval()
    x = torch.randn(2, 3, size, size)
    t0 = time.perf_counter()
    try:
        torch.onnx.export(
            net, (x,), str(path), dynamo=dynamo, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the benchmark records why an exporter failed
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    if not dynamo:
        import onnxslim

        onnx.save(onnxslim.slim(str(path)), str(path))
    net.eval()
    m = onnx.load(str(path))
    sess = _session(path)
    xi = np.random.default_rng(0).normal(size=(4, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(xi)).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: xi})[0]
    from edgeexit.export.onnx_units import unsupported_ops

    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "ok": True,
        "opset": int(opset),
        "nodes": len(m.graph.node),
        # the dynamo exporter writes large weights beside the graph (PATH.data): both files count
        "bytes": sum(f.stat().st_size for f in path.parent.glob(path.name + "*")),
        "max_abs_diff": float(np.abs(out - ref).max()),
        "trt86_unsupported_ops": unsupported_ops(path),
        "trt86_parses": opset <= 17 and not unsupported_ops(path),
        "export_s": round(time.perf_counter() - t0, 2),
    }


def latency_part(backbones: list[str], rounds: int, size: int, dynamo: bool) -> list[dict]:
    import torch

    from edgeexit.export.onnx_units import export_units
    from edgeexit.models import count_unit_cost
    from edgeexit.models.backbones import BackboneConfig, BackboneNet

    torch.set_num_threads(1)
    rows = []
    for name in backbones:
        t0 = time.perf_counter()
        model = BackboneNet(BackboneConfig(backbone=name, num_classes=1000, input_size=[size, size])).eval()
        k = model.num_exits
        cost = {u["name"]: u for u in count_unit_cost(model)}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            units = export_units(model, folder, opset=17)
            whole = _export_whole(model.network.eval(), folder / "whole.onnx", False, size)
            dyn = _export_whole(model.network.eval(), folder / "whole_dynamo.onnx", True, size) if dynamo else None
            sessions = {u["name"]: _session(folder / u["onnx"]) for u in units}
            whole_s = _session(folder / "whole.onnx")
            x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
            unit_ms, whole_ms, split_ms = _time_interleaved(sessions, whole_s, x, k, rounds)
        med = {n: statistics.median(v) for n, v in unit_ms.items()}
        row = {
            "backbone": name,
            "exits": k,
            "exit_blocks": model.exit_blocks,
            "stages": model.feature_info,
            "mflops": {n: round(cost[n]["flops"] / 1e6, 2) for n in med},
            "mflops_network": round(
                sum(cost[f"seg_{p + 1:02d}"]["flops"] for p in range(k)) / 1e6 + cost[f"head_{k:02d}"]["flops"] / 1e6,
                1,
            ),
            "unit_ms": {n: round(v, 3) for n, v in med.items()},
            "whole_ms": round(statistics.median(whole_ms), 3),
            "split_ms": round(statistics.median(split_ms), 3),
            "split_overhead": round(statistics.median(split_ms) / statistics.median(whole_ms), 3),
            # per round, split / whole of the same round (the pair ran back to back): its median
            "split_overhead_paired": round(
                statistics.median(a / b for a, b in zip(split_ms, whole_ms, strict=True)), 3
            ),
            "whole_min_ms": round(min(whole_ms), 3),
            "split_min_ms": round(min(split_ms), 3),
            "rounds": rounds,
            "exporter_torchscript": whole,
            "exporter_dynamo": dyn,
            "units_trt86_unsupported": {},  # export_units raises if any: reaching here means none
            "bench_s": round(time.perf_counter() - t0, 1),
        }
        print(
            f"{name:20s} exits {k}  {row['mflops_network']:8.1f} MFLOPs  whole {row['whole_ms']:7.2f} ms  "
            f"split {row['split_ms']:7.2f} ms  overhead {row['split_overhead']:.3f}  "
            f"dynamo opset {dyn.get('opset') if dyn else '-'}",
            flush=True,
        )
        rows.append(row)
    return rows


def exporters_part(backbones: list[str], size: int) -> list[dict]:
    """Only the exporter comparison (no timing): the whole network through both exporters."""
    import torch

    from edgeexit.models.backbones import BackboneConfig, BackboneNet

    torch.set_num_threads(1)
    rows = []
    for name in backbones:
        model = BackboneNet(BackboneConfig(backbone=name, num_classes=1000, input_size=[size, size]))
        with tempfile.TemporaryDirectory() as tmp:
            ts = _export_whole(model.network, Path(tmp) / "whole.onnx", False, size)
            dy = _export_whole(model.network, Path(tmp) / "whole_dynamo.onnx", True, size)
        rows.append({"backbone": name, "exporter_torchscript": ts, "exporter_dynamo": dy})
        print(name, json.dumps(rows[-1]), flush=True)
    return rows


def _time_interleaved(sessions: dict, whole_s, x, k: int, rounds: int) -> tuple[dict, list, list]:
    """Per round: the whole model once and the unit chain once (every segment and head, each timed),
    the order alternating per round. Returns (per-unit times, whole-model times, split times: the
    segments plus the final head, the same computation as the whole model)."""
    unit_ms: dict[str, list[float]] = {n: [] for n in sessions}
    whole_ms: list[float] = []
    split_ms: list[float] = []

    def chain() -> None:
        state, total = x, 0.0
        for pos in range(k):
            seg, head = f"seg_{pos + 1:02d}", f"head_{pos + 1:02d}"
            t = time.perf_counter()
            state = sessions[seg].run(None, {sessions[seg].get_inputs()[0].name: state})[0]
            dt = (time.perf_counter() - t) * 1e3
            unit_ms[seg].append(dt)
            total += dt
            t = time.perf_counter()
            sessions[head].run(None, {sessions[head].get_inputs()[0].name: state})
            dt = (time.perf_counter() - t) * 1e3
            unit_ms[head].append(dt)
            if pos == k - 1:
                total += dt
        split_ms.append(total)

    def one() -> None:
        whole_ms.append(_ms(lambda: whole_s.run(None, {"image": x})))

    for _ in range(2):  # warm-up, unrecorded
        one()
        chain()
    for lst in (*unit_ms.values(), whole_ms, split_ms):
        lst.clear()
    for r in range(rounds):
        first, second = (one, chain) if r % 2 == 0 else (chain, one)
        first()
        second()
    return unit_ms, whole_ms, split_ms


# ----------------------------------------------------------------------------------------------


def _train(out: Path, backbone: str, width: float, images: int, epochs: int, **kw) -> Path:
    from edgeexit.train.trainer import TrainConfig, train

    if (out / "model.pt").is_file() and not kw.pop("retrain", False):
        return out / "model.pt"
    kw.pop("retrain", None)
    cfg = TrainConfig.from_recipe(
        "fashion-mnist", "ce", out=str(out), epochs=epochs, limit_train=images, width=width, backbone=backbone,
        force=True, **kw,
    )  # fmt: skip
    train(cfg, progress=False)
    return out / "model.pt"


def _cascade_row(model_pt: Path, art: Path, test_images: int, label: str) -> dict:
    from edgeexit.calibrate.run import run_calibration
    from edgeexit.data import load_dataset
    from edgeexit.export.exporter import export_checkpoint
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.profiling import verify_together

    export_checkpoint(model_pt, out=art, force=True, parity_samples=128)
    cal = run_calibration(art, max_drop=0.005, backend="onnxruntime", repeats=50, iso_accuracy=False, ladder_steps=8)
    test = load_dataset("fashion-mnist", "test")
    frames = test.images[:test_images].permute(0, 2, 3, 1).contiguous().numpy()
    labels = test.labels[:test_images].numpy()
    c = Cascade.load(art, backend="onnxruntime")
    k = c.num_exits
    full = [2.0] * (k - 1) + [0.0]
    casc, whole = verify_together(c, frames, labels, [list(cal["thresholds"]), full])
    c.close()
    row = {
        "label": label,
        "exits": k,
        "thresholds": cal["thresholds"],
        "evaluated_exits": cal["evaluated_exits"],
        "calibration": {"measured": cal["measured"], "full_model": cal["full_model"]},
        "test_images": int(test_images),
        "cascade": {key: casc[key] for key in ("accuracy", "latency_ms", "p50_ms", "p95_ms", "exit_shares")},
        "static": {key: whole[key] for key in ("accuracy", "latency_ms", "p50_ms", "p95_ms")},
    }
    row["speedup"] = round(row["static"]["latency_ms"] / row["cascade"]["latency_ms"], 3)
    row["drop_pt"] = round(100 * (row["static"]["accuracy"] - row["cascade"]["accuracy"]), 2)
    return row


def fmnist_part(
    backbones: dict, work: Path, images: int, epochs: int, test_images: int, frozen: list[str], save
) -> list:
    """Rows as they finish; ``save(rows)`` after each, so a run stopped early keeps what it measured."""
    rows = []
    for name, width in backbones.items():
        t0 = time.perf_counter()
        pt = _train(work / name, name, width, images, epochs)
        row = _cascade_row(pt, work / f"{name}.edgeexit", test_images, "joint")
        row.update(backbone=name, width=width, train_images=images, epochs=epochs)
        row["bench_s"] = round(time.perf_counter() - t0)
        _say(row)
        rows.append(row)
        save(rows)
        if name in frozen:
            rows.append(_frozen(name, width, work, images, epochs, test_images))
            save(rows)
    return rows


def _frozen(name: str, width: float, work: Path, images: int, epochs: int, test_images: int) -> dict:
    """A static network trained alone (only the final exit's loss), its torchvision state_dict
    saved as the user would have it, then exits added with --freeze-trunk on the same images."""
    import torch

    from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint

    t0 = time.perf_counter()
    static_pt = _train(work / f"{name}-static", name, width, images, epochs, gamma=0.0)
    net = model_from_checkpoint(load_checkpoint(static_pt)).network
    user = work / f"{name}-static.pth"
    torch.save(net.state_dict(), user)
    pt = _train(work / f"{name}-frozen", name, width, images, epochs, init=str(user), freeze_trunk=True)
    row = _cascade_row(pt, work / f"{name}-frozen.edgeexit", test_images, "frozen-trunk")
    row.update(backbone=name, width=width, train_images=images, epochs=epochs)
    row["bench_s"] = round(time.perf_counter() - t0)
    _say(row)
    return row


def _say(row: dict) -> None:
    print(
        f"{row['backbone']:20s} {row['label']:12s} static {100 * row['static']['accuracy']:.2f}% "
        f"{row['static']['latency_ms']:.3f} ms | cascade {100 * row['cascade']['accuracy']:.2f}% "
        f"{row['cascade']['latency_ms']:.3f} ms | speed-up {row['speedup']:.2f}x drop {row['drop_pt']:+.2f} pt",
        flush=True,
    )


def plot(latency_json: Path, fmnist_json: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fm = json.loads(fmnist_json.read_text())["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted({r["backbone"] for r in fm})
    for i, name in enumerate(names):
        col = colors[i % len(colors)]
        for r in (r for r in fm if r["backbone"] == name):
            s, c = r["static"], r["cascade"]
            frozen = r["label"] == "frozen-trunk"
            # the median per frame: on a shared CPU the mean carries the other processes' preemptions
            if frozen:  # the user's network: trained alone, on its final exit only
                ax.scatter(s["p50_ms"], 100 * s["accuracy"], edgecolors=col, facecolors="none", marker="o", s=40)
            else:
                ax.scatter(s["p50_ms"], 100 * s["accuracy"], color=col, marker="o", s=40)
            ax.scatter(c["p50_ms"], 100 * c["accuracy"], color=col, marker="D" if frozen else "*", s=90)
            ax.annotate(
                "", (c["p50_ms"], 100 * c["accuracy"]), (s["p50_ms"], 100 * s["accuracy"]),
                arrowprops={"arrowstyle": "->", "color": col, "alpha": 0.5},
            )  # fmt: skip
        width = next(r["width"] for r in fm if r["backbone"] == name)
        ax.scatter([], [], color=col, marker="s", label=f"{name} (width {width})")
    ax.scatter([], [], color="gray", marker="o", label="jointly trained network, final exit only")
    ax.scatter([], [], color="gray", marker="*", label="cascade at --max-drop 0.5pt (joint)")
    ax.scatter([], [], edgecolors="gray", facecolors="none", marker="o", label="the network trained alone")
    ax.scatter([], [], color="gray", marker="D", label="its cascade, --freeze-trunk")
    ax.set_xscale("log")
    ax.set_xlabel("median latency per frame, ms (ONNX Runtime CPU, 1 thread, batch 1, 28 px; shared CPU)")
    ax.set_ylabel("Fashion-MNIST test accuracy, %")
    ax.set_title("Backbones: static networks vs their calibrated cascades")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)


def projected_224(lat_row: dict, fm_row: dict) -> float | None:
    """The Fashion-MNIST cascade's exit shares and evaluated exits priced at the 224 px unit latencies:
    a projection (the 224 px network was not trained), the whole network's latency over the cascade's."""
    k = lat_row["exits"]
    if fm_row["exits"] != k:
        return None
    u = lat_row["unit_ms"]
    evaluated = set(fm_row["evaluated_exits"])
    cost, reach = 0.0, 0.0
    for pos in range(k):
        reach += u[f"seg_{pos + 1:02d}"] + (u[f"head_{pos + 1:02d}"] if pos + 1 in evaluated else 0.0)
        cost += fm_row["cascade"]["exit_shares"][pos] * reach
    return lat_row["whole_ms"] / cost


def table(latency_json: Path, fmnist_json: Path) -> str:
    """The backbone table of docs/results.md (markdown)."""
    lat = {r["backbone"]: r for r in json.loads(latency_json.read_text())["rows"]}
    fm = json.loads(fmnist_json.read_text())["rows"] if fmnist_json.is_file() else []
    lines = [
        "| backbone | exits | MFLOPs (224 px) | per unit, ms (seg / head, 224 px) | whole model, ms | split overhead "
        "| exporter (whole net: TorchScript / dynamo) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in lat.items():
        k = r["exits"]
        ms = r["unit_ms"]
        units = " · ".join(f"{ms[f'seg_{p:02d}']:.2f}/{ms[f'head_{p:02d}']:.2f}" for p in range(1, k + 1))
        ts, dy = r["exporter_torchscript"], r.get("exporter_dynamo")
        exp = f"opset {ts['opset']}, {ts['nodes']} nodes, Δ {ts['max_abs_diff']:.0e}"
        if dy and dy["ok"]:
            exp += f" / opset {dy['opset']}, {dy['nodes']} nodes, Δ {dy['max_abs_diff']:.0e}"
        elif dy:
            exp += " / failed"
        lines.append(
            f"| {name} | {k} | {r['mflops_network']:.0f} | {units} | {r['whole_ms']:.2f} | "
            f"{r['split_overhead']:.3f} (paired {r['split_overhead_paired']:.3f}) | {exp} |"
        )
    if fm:
        lines += [
            "",
            "| backbone (width) | training | static: accuracy, mean / p50 ms | cascade at --max-drop 0.5pt: accuracy, "
            "mean / p50 ms | speed-up (mean / p50) | drop, pt | exit shares | 224 px projection |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in fm:
            proj = projected_224(lat[r["backbone"]], r) if r["backbone"] in lat else None
            lines.append(
                f"| {r['backbone']} ({r['width']}) | {r['label']} | {100 * r['static']['accuracy']:.2f} %, "
                f"{r['static']['latency_ms']:.3f} / {r['static']['p50_ms']:.3f} | "
                f"{100 * r['cascade']['accuracy']:.2f} %, "
                f"{r['cascade']['latency_ms']:.3f} / {r['cascade']['p50_ms']:.3f} | {r['speedup']:.2f}x / "
                f"{r['static']['p50_ms'] / r['cascade']['p50_ms']:.2f}x | {r['drop_pt']:+.2f} | "
                f"{' / '.join(f'{x:.2f}' for x in r['cascade']['exit_shares'])} | "
                f"{f'{proj:.2f}x' if proj else '-'} |"
            )
    return "\n".join(lines)


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["latency", "exporters", "fmnist", "plot", "table"], required=True)
    p.add_argument("--backbones", nargs="*", help="subset (default: all of the part's)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--no-dynamo", action="store_true", help="skip the torch.export-based exporter")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--frozen", nargs="*", default=["mobilenet_v3_small"])
    p.add_argument("--width", type=float, help="fmnist: one width for every backbone (default: FMNIST's)")
    p.add_argument("--work", type=Path, default=Path("runs/backbones"))
    p.add_argument("--out", type=Path)
    p.add_argument("--latency-json", type=Path, default=Path("docs/backbones_latency.json"))
    p.add_argument("--fmnist-json", type=Path, default=Path("docs/backbones_fmnist.json"))
    p.add_argument("--png", type=Path, default=Path("docs/backbones.png"))
    a = p.parse_args(argv)
    import platform

    machine = {"cpu": _cpu_name(), "host": platform.node(), "command": " ".join(sys.argv)}
    if a.part == "latency":
        rows = latency_part(a.backbones or LATENCY_BACKBONES, a.rounds, a.size, not a.no_dynamo and _has_onnxscript())
        _write(a.out or a.latency_json, {"machine": machine, "size": a.size, "rows": rows})
    elif a.part == "exporters":
        rows = exporters_part(a.backbones or LATENCY_BACKBONES, a.size)
        _write(a.out or Path("docs/backbones_exporters.json"), {"machine": machine, "size": a.size, "rows": rows})
    elif a.part == "fmnist":
        chosen = {n: a.width or FMNIST[n] for n in (a.backbones or FMNIST)}
        a.work.mkdir(parents=True, exist_ok=True)
        out = a.out or a.fmnist_json
        fmnist_part(
            chosen, a.work, a.train_images, a.epochs, a.test_images, a.frozen,
            lambda rows: _write(out, {"machine": machine, "rows": rows}),
        )  # fmt: skip
    elif a.part == "plot":
        plot(a.latency_json, a.fmnist_json, a.png)
    else:
        print(table(a.latency_json, a.fmnist_json))


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        print("onnxscript is not installed: the dynamo exporter is not measured", flush=True)
        return False
    return True


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
