"""Bring-your-own-backbone benchmark: every torchvision backbone as split units, and as a cascade.

    python benchmarks/backbones.py --part latency --no-dynamo --out docs/backbones_latency.json  # quiet CPU
    python benchmarks/backbones.py --part heads             # spatial-first heads against widening ones (quiet)
    python benchmarks/backbones.py --part fmnist-train      # long: train every network (--jobs at once)
    python benchmarks/backbones.py --part fmnist-prepare    # export; calibrate (quiet CPU)
    python benchmarks/backbones.py --part fmnist            # the interleaved timing (quiet CPU)
    python benchmarks/backbones.py --part plot --png docs/backbones.png
    python benchmarks/backbones.py --part table

latency (224 px, published widths, random weights: latency does not depend on the weights):
  every backbone's units exported by edgeexit's exporter (TorchScript, opset 17, onnxslim) and the
  same network exported as ONE ONNX model; ONNX Runtime CPU, 1 intra-op thread, batch 1. Rounds
  run the whole model, the unit chain (every segment and head, one session call each) and the
  fused static plan (segments and final head merged into one graph by the runtime's fusion), the
  order rotating per round; per unit the median over rounds. Split overhead = the median over
  rounds of (segments + final head) / whole model of the same round, with a bootstrap interval;
  likewise for the fused plan. MFLOPs are counted from the modules (conv + linear MACs x 2). The
  whole network is also exported with the torch.export-based (dynamo) exporter, when onnxscript
  imports: the opset it produced, node count and parity against PyTorch.

fmnist (small-input variants, 28 px, 1 channel), per backbone at width W (FMNIST or --width): the
  multi-exit network trained jointly (method ce), the network at W/2 trained alone (the smaller
  static network a user could pick instead), and for --frozen backbones the network at W trained
  alone with exits then added by --freeze-trunk. Multi-exit networks are calibrated with --max-drop
  0.5pt on their held-out frames (ONNX Runtime, 1 thread). Then every network run whole (its final
  exit only) and every calibrated cascade classify the first --test-images test images frame by
  frame, all interleaved in blocks, so that every timing shares the same moments of the CPU.
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
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "regnet_y_400mf", "regnet_y_800mf", "convnext_tiny",
]  # fmt: skip
# Fashion-MNIST widths: small enough to train on a shared 2-core CPU in minutes
FMNIST = {
    "resnet18": 0.25,
    "mobilenet_v3_small": 0.5,
    "efficientnet_b0": 0.25,
    "regnet_y_400mf": 0.25,
    "mobilenet_v2": 0.5,
    "convnext_tiny": 0.125,
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
            sessions = {u.name: _session(u.file()) for u in units}
            whole_s = _session(folder / "whole.onnx")
            (folder / "fused.onnx").write_bytes(_fused_network(units))
            fused_s = _session(folder / "fused.onnx")
            x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
            unit_ms, whole_ms, split_ms, fused_ms = _time_interleaved(sessions, whole_s, fused_s, x, k, rounds)
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
            # the runtime's static plan: every segment and the final head fused into one graph
            "fused_ms": round(statistics.median(fused_ms), 3),
            "fused_overhead_paired": round(
                statistics.median(a / b for a, b in zip(fused_ms, whole_ms, strict=True)), 3
            ),
            # 95 % bootstrap intervals of the paired medians (rounds resampled)
            "split_overhead_paired_ci": _median_ci([a / b for a, b in zip(split_ms, whole_ms, strict=True)]),
            "fused_overhead_paired_ci": _median_ci([a / b for a, b in zip(fused_ms, whole_ms, strict=True)]),
            "load_before": _load(),
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


def heads_part(backbones: list[str], rounds: int, size: int) -> list[dict]:
    """Every early head the by-cost rule builds spatial-first, against the widening head it replaced and
    the segment before it: each exported alone (TorchScript, opset 17), timed in interleaved rounds
    (ONNX Runtime CPU, 1 thread, batch 1, the order rotating), the median over rounds."""
    import torch

    from edgeexit.models.backbones import BackboneConfig, BackboneNet

    torch.set_num_threads(1)
    rows = []
    for name in backbones:
        cfg = {"backbone": name, "num_classes": 1000, "input_size": [size, size]}
        model = BackboneNet(BackboneConfig(**cfg)).eval()
        wide = BackboneNet(BackboneConfig(**cfg, heads="widen")).eval()
        state = (torch.randn(1, 3, size, size),)
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            for i, head in enumerate(model.heads[:-1]):
                seg_in = state
                state = model.segments[i](*state)
                if head.spatial_first:
                    pieces = {"segment": (model.segments[i], seg_in), "widen": (wide.heads[i], state),
                              "spatial-first": (head, state)}  # fmt: skip
                    rows.append({"backbone": name, "exit": i + 1, "tap_channels": int(state[0].shape[1]),
                                 **_time_pieces(pieces, Path(tmp) / str(i), rounds)})  # fmt: skip
                    r = rows[-1]
                    print(f"{name} head {i + 1} ({r['tap_channels']} ch): " + ", ".join(
                        f"{w} {v:.2f} ms" for w, v in r["ms"].items()), r["share_of_segment"], flush=True)  # fmt: skip
    return rows


def _time_pieces(pieces: dict, folder: Path, rounds: int) -> dict:
    """name -> (module, inputs): each exported alone and timed in interleaved rounds (5 calls each per
    round, their median; the order rotating per round); the median over rounds, and the MACs."""
    import torch

    from edgeexit.models.multiexit import MacCounter

    folder.mkdir(parents=True)
    sessions, feeds, macs = {}, {}, {}
    for what, (module, inputs) in pieces.items():
        path = folder / f"{what}.onnx"
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17)
        sessions[what] = _session(path)
        feeds[what] = {sessions[what].get_inputs()[0].name: inputs[0].numpy()}
        with MacCounter(module) as counter:
            module(*inputs)
        macs[what] = counter.take()
    times: dict[str, list[float]] = {w: [] for w in pieces}
    names = list(pieces)
    for r in range(rounds):
        for what in names[r % len(names) :] + names[: r % len(names)]:
            sess, feed = sessions[what], feeds[what]
            times[what].append(statistics.median(_ms(lambda: sess.run(None, feed)) for _ in range(5)))  # noqa: B023
    ms = {w: statistics.median(v) for w, v in times.items()}
    return {"ms": {w: round(v, 3) for w, v in ms.items()}, "mmacs": {w: round(v / 1e6, 1) for w, v in macs.items()},
            "share_of_segment": {w: round(ms[w] / ms["segment"], 3) for w in names if w != "segment"},
            "rounds": rounds, "load_before": _load()}  # fmt: skip


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


def _median_ci(values: list[float], resamples: int = 2000) -> list[float]:
    v = np.asarray(values)
    idx = np.random.default_rng(0).integers(0, len(v), size=(resamples, len(v)))
    meds = np.median(v[idx], axis=1)
    return [round(float(np.percentile(meds, 2.5)), 3), round(float(np.percentile(meds, 97.5)), 3)]


def _fused_network(units: list) -> bytes:
    """Every segment and the final head as one graph, built by the runtime's fusion (what a plan that
    skips every early exit runs); ``units``: export's `Unit`s."""
    from edgeexit.runtime.fusion import build_fused

    return build_fused(units, 0, len(units) // 2 - 1)


def _time_interleaved(sessions: dict, whole_s, fused_s, x, k: int, rounds: int) -> tuple[dict, list, list, list]:
    """Per round: the whole model once, the unit chain once (every segment and head, each timed) and
    the fused network once, the order rotating per round. Returns (per-unit times, whole-model times,
    split times: the segments plus the final head, the same computation as the whole model, fused
    times)."""
    unit_ms: dict[str, list[float]] = {n: [] for n in sessions}
    whole_ms: list[float] = []
    split_ms: list[float] = []
    fused_ms: list[float] = []
    names = {u: s.get_inputs()[0].name for u, s in sessions.items()}

    def chain() -> None:
        state, total = x, 0.0
        for pos in range(k):
            seg, head = f"seg_{pos + 1:02d}", f"head_{pos + 1:02d}"
            t = time.perf_counter()
            state = sessions[seg].run(None, {names[seg]: state})[0]
            dt = (time.perf_counter() - t) * 1e3
            unit_ms[seg].append(dt)
            total += dt
            t = time.perf_counter()
            sessions[head].run(None, {names[head]: state})
            dt = (time.perf_counter() - t) * 1e3
            unit_ms[head].append(dt)
            if pos == k - 1:
                total += dt
        split_ms.append(total)

    def one() -> None:
        whole_ms.append(_ms(lambda: whole_s.run(None, {"image": x})))

    def fused() -> None:
        fused_ms.append(_ms(lambda: fused_s.run(None, {"image": x})))

    steps = [one, chain, fused]
    for _ in range(2):  # warm-up, unrecorded
        for step in steps:
            step()
    for lst in (*unit_ms.values(), whole_ms, split_ms, fused_ms):
        lst.clear()
    for r in range(rounds):
        for step in steps[r % 3 :] + steps[: r % 3]:
            step()
    return unit_ms, whole_ms, split_ms, fused_ms


# ----------------------------------------------------------------------------------------------


def _train(out: Path, backbone: str, width: float, images: int, epochs: int, **kw) -> Path:
    from edgeexit.train.trainer import TrainConfig, train

    if (out / "model.pt").is_file():
        return out / "model.pt"
    cfg = TrainConfig.from_recipe(
        "fashion-mnist", "ce", out=str(out), epochs=epochs, train_images=images, width=width, backbone=backbone,
        force=True, **kw,
    )  # fmt: skip
    train(cfg, progress=False)
    return out / "model.pt"


def fmnist_specs(backbones: dict, frozen: list[str]) -> list[dict]:
    """The networks of the Fashion-MNIST part, each a folder under --work: per backbone at width W the
    jointly trained multi-exit network, the same network at W/2 trained alone (the smaller static
    network a user would pick instead), and for --frozen backbones the network at W trained alone
    too, with exits then added on the frozen trunk of each network trained alone (W and W/2)."""
    specs = []
    for name, w in backbones.items():
        specs.append({"key": f"{name}-w{w:g}-joint", "backbone": name, "width": w, "kind": "joint"})
        specs.append({"key": f"{name}-w{w / 2:g}-alone", "backbone": name, "width": w / 2, "kind": "alone"})
        if name in frozen:
            specs.append({"key": f"{name}-w{w:g}-alone", "backbone": name, "width": w, "kind": "alone"})
            for fw in (w, w / 2):
                specs.append({"key": f"{name}-w{fw:g}-frozen", "backbone": name, "width": fw, "kind": "frozen"})
    return specs


def trained(specs: list[dict], work: Path) -> list[dict]:
    """The specs whose training finished (a run stopped early, or a spec left out, has no model.pt)."""
    # (a spec skipped on purpose holds a short text file where the checkpoint would be)
    done = [
        s
        for s in specs
        if (work / s["key"] / "model.pt").is_file() and (work / s["key"] / "model.pt").stat().st_size > 4096
    ]
    for s in specs:
        if s not in done:
            print(f"not trained, left out: {s['key']}", flush=True)
    return done


def _train_spec(spec: dict, work: Path, images: int, epochs: int) -> str:
    """Train one spec (a frozen spec first trains the network it starts from); returns its key."""
    import torch

    torch.set_num_threads(1)
    name, w = spec["backbone"], spec["width"]
    t0 = time.perf_counter()
    if spec["kind"] == "joint":
        _train(work / spec["key"], name, w, images, epochs)
    elif spec["kind"] == "alone":  # only the final exit's loss: the plain network
        _train(work / spec["key"], name, w, images, epochs, gamma=0.0)
    else:
        from edgeexit.train.checkpoint import load_checkpoint, model_from_checkpoint

        base = _train(work / f"{name}-w{w:g}-alone", name, w, images, epochs, gamma=0.0)
        user = work / f"{name}-w{w:g}-alone.pth"  # its torchvision state_dict, as the user would have it
        torch.save(model_from_checkpoint(load_checkpoint(base)).network.state_dict(), user)
        # --init implies the fine-tuning recipe (ImageNet normalisation, augmentation): this network was
        # trained on the dataset's normalisation without augmentation, so the heads train on what it saw
        _train(work / spec["key"], name, w, images, epochs, init=str(user), freeze_trunk=True,
               normalize="dataset", augment=False, lr=0.02, warmup_epochs=0.1)  # fmt: skip
    print(f"trained {spec['key']} in {time.perf_counter() - t0:.0f} s", flush=True)
    return spec["key"]


def fmnist_train(specs: list[dict], work: Path, images: int, epochs: int, jobs: int) -> None:
    """Train every spec, ``jobs`` at a time (each process one thread), the frozen ones last."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    order = sorted(specs, key=lambda s: s["kind"] == "frozen")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_train_spec, s, work, images, epochs) for s in order]
        for f in futures:
            f.result()


def fmnist_prepare(specs: list[dict], work: Path, accept_load: bool = False, calibrate: bool = True) -> None:
    """Export every trained network; calibrate the multi-exit ones at --max-drop 0.5pt on their
    held-out frames (ONNX Runtime, 1 thread). The plan rests on the units' profiled latencies: run it
    on a quiet machine (calibrate refuses a busy one unless ``accept_load``). The timing reported is
    `fmnist_time`'s."""
    from edgeexit.calibrate.run import run_calibration
    from edgeexit.export.exporter import export_checkpoint

    for s in specs:
        art = work / f"{s['key']}.edgeexit"
        if (work / f"{s['key']}.cal.json").is_file():
            continue
        if not (art / "manifest.json").is_file():
            export_checkpoint(work / s["key"] / "model.pt", out=art, force=True, parity_images=128)
        if not calibrate:
            continue
        cal = {}
        if s["kind"] != "alone":
            cal = run_calibration(
                art, max_drop=0.005, backend="onnxruntime", repeats=50, iso_accuracy=False, ladder_steps=8,
                accept_load=accept_load,
            )  # fmt: skip
            cal = {k: cal[k] for k in ("thresholds", "evaluated_exits", "measured", "full_model")}
        _write(work / f"{s['key']}.cal.json", cal)
        print(f"prepared {s['key']}", flush=True)


def fmnist_time(specs: list[dict], work: Path, test_images: int, block: int = 25) -> list[dict]:
    """Every network's static run (the final exit only) and every multi-exit network's calibrated
    cascade, frame by frame on the same test images, interleaved in blocks (the order alternating
    per block, as `verify_together` does for one network), so that all timings share the moments."""
    from edgeexit.data import load_dataset
    from edgeexit.runtime import Cascade

    test = load_dataset("fashion-mnist", "test")
    frames = test.images[:test_images].permute(0, 2, 3, 1).contiguous().numpy()
    labels = test.labels[:test_images].numpy()
    loaded, views, names = [], [], []
    for s in specs:
        c = Cascade.load(work / f"{s['key']}.edgeexit", backend="onnxruntime")
        loaded.append(c)
        k = c.num_exits
        cal = json.loads((work / f"{s['key']}.cal.json").read_text())
        views.append(c.derive([2.0] * (k - 1) + [0.0]))
        names.append((s, "static", k))
        if cal:
            views.append(c.derive(list(cal["thresholds"])))
            names.append((s, "cascade", k))
    runs: list[list] = [[] for _ in views]
    try:
        for v in views:  # warm-up, unrecorded
            for f in frames[:20]:
                v.predict(f)
        for start in range(0, len(frames), block):
            part = frames[start : start + block]
            order = range(len(views)) if (start // block) % 2 == 0 else range(len(views) - 1, -1, -1)
            for j in order:
                runs[j].extend(views[j].predict(f) for f in part)
    finally:
        for c in loaded:
            c.close()
    return _fmnist_rows(names, runs, labels, work, test_images)


def _fmnist_rows(names: list, runs: list, labels, work: Path, test_images: int) -> list[dict]:
    """One row per network: its static run, its cascade (when calibrated) and the comparisons."""
    from edgeexit.runtime.profiling import _verified

    rows: dict[str, dict] = {}
    for (s, what, k), preds in zip(names, runs, strict=True):
        correct = [p.label == y for p, y in zip(preds, labels, strict=True)]
        v = _verified([p.latency_ms for p in preds], correct, [p.exit_index for p in preds], k, False)
        row = rows.setdefault(s["key"], {**s, "exits": k, "test_images": int(test_images), **_trained_for(work, s)})
        row[what] = {key: v[key] for key in ("accuracy", "latency_ms", "p50_ms", "p95_ms", "exit_shares")}
        if what == "cascade":
            row["calibration"] = json.loads((work / f"{s['key']}.cal.json").read_text())
    statics = [(r["key"], r["static"]) for r in rows.values()]
    for row in rows.values():
        if "cascade" in row:
            row["vs_static"] = _against_statics(row["cascade"], statics)
    for row in rows.values():
        if "cascade" in row:
            row["speedup"] = round(row["static"]["latency_ms"] / row["cascade"]["latency_ms"], 3)
            row["speedup_p50"] = round(row["static"]["p50_ms"] / row["cascade"]["p50_ms"], 3)
            row["drop_pt"] = round(100 * (row["static"]["accuracy"] - row["cascade"]["accuracy"]), 2)
    return list(rows.values())


def _trained_for(work: Path, spec: dict) -> dict:
    """Epochs the checkpoint had when it was written (a run stopped early keeps its best epoch so far)."""
    import torch

    ckpt = torch.load(work / spec["key"] / "model.pt", weights_only=True, map_location="cpu")
    m, run = ckpt["metrics"], ckpt["train_config"]
    return {"epoch_of_checkpoint": int(m["epoch"]), "val_exit_accuracy": m["val_exit_accuracy"],
            "train_images": run.get("train_images"), "epochs": run["recipe"]["epochs"],
            "method": ckpt["method"]}  # fmt: skip


def _against_statics(cascade: dict, statics: list) -> dict:
    """The cascade against every network run whole on the same frames and moments (median latency per
    frame): the most accurate static network no slower than the cascade (accuracy at equal latency),
    and the fastest static network at least as accurate (latency at equal accuracy)."""
    lat, acc = cascade["p50_ms"], cascade["accuracy"]
    slower_ok = [(s["accuracy"], -s["p50_ms"], k) for k, s in statics if s["p50_ms"] <= lat]
    as_good = [(s["p50_ms"], k) for k, s in statics if s["accuracy"] >= acc]
    out: dict = {"best_static_no_slower": None, "fastest_static_as_accurate": None}
    if slower_ok:
        a, _, k = max(slower_ok)
        out["best_static_no_slower"] = {"key": k, "accuracy": a, "gain_pt": round(100 * (acc - a), 2)}
    if as_good:
        ms, k = min(as_good)
        out["fastest_static_as_accurate"] = {"key": k, "p50_ms": ms, "speedup_p50": round(ms / lat, 3)}
    return out


def _say(row: dict) -> None:
    if "cascade" not in row:
        st = row["static"]
        print(f"{row['key']:34s} static {100 * st['accuracy']:.2f}% {st['latency_ms']:.3f} ms", flush=True)
        return
    print(
        f"{row['key']:34s} static {100 * row['static']['accuracy']:.2f}% "
        f"{row['static']['latency_ms']:.3f} ms | cascade {100 * row['cascade']['accuracy']:.2f}% "
        f"{row['cascade']['latency_ms']:.3f} ms | speed-up {row['speedup']:.2f}x drop {row['drop_pt']:+.2f} pt",
        flush=True,
    )


def plot(fmnist_json: Path, png: Path) -> None:
    """Accuracy against median latency per frame: every network run whole (static) and every
    calibrated cascade, all backbones, with the static networks' Pareto front."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fm = json.loads(fmnist_json.read_text())["rows"]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(r["backbone"] for r in fm))
    statics = []
    for r in fm:
        col = colors[names.index(r["backbone"]) % len(colors)]
        s = r["static"]
        statics.append((s["p50_ms"], 100 * s["accuracy"]))
        filled = r["kind"] == "joint"
        ax.scatter(s["p50_ms"], 100 * s["accuracy"], marker="o", s=45, edgecolors=col,
                   facecolors=col if filled else "none")  # fmt: skip
        ax.annotate(f"{r['width']:g}", (s["p50_ms"], 100 * s["accuracy"]), fontsize=6, xytext=(4, -8),
                    textcoords="offset points", color=col)  # fmt: skip
        if "cascade" in r:
            c = r["cascade"]
            ax.scatter(c["p50_ms"], 100 * c["accuracy"], color=col, marker="D" if r["kind"] == "frozen" else "*",
                       s=100)  # fmt: skip
            ax.annotate("", (c["p50_ms"], 100 * c["accuracy"]), (s["p50_ms"], 100 * s["accuracy"]),
                        arrowprops={"arrowstyle": "->", "color": col, "alpha": 0.5})  # fmt: skip
    front, best = [], -1.0
    for x, y in sorted(statics):
        if y > best:
            front.append((x, y))
            best = y
    right = max(max(x for x, _ in statics), max((r["cascade"]["p50_ms"] for r in fm if "cascade" in r), default=0))
    front.append((1.05 * right, front[-1][1]))
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", alpha=0.5, lw=1)
    for i, name in enumerate(names):
        ax.scatter([], [], color=colors[i % len(colors)], marker="s", label=name)
    ax.scatter([], [], color="gray", marker="o", label="multi-exit network run whole (final exit)")
    ax.scatter([], [], edgecolors="gray", facecolors="none", marker="o", label="network trained alone, run whole")
    ax.scatter([], [], color="gray", marker="*", label="cascade at --max-drop 0.5pt (joint)")
    ax.scatter([], [], color="gray", marker="D", label="cascade on the frozen network (--freeze-trunk)")
    ax.plot([], [], color="gray", alpha=0.5, label="best static network at that latency or less")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_xlabel("median latency per frame, ms (ONNX Runtime CPU, 1 thread, batch 1, 28 px)")
    ax.set_ylabel("Fashion-MNIST test accuracy, %")
    ax.set_title("Backbones on Fashion-MNIST: static networks and calibrated cascades (labels: width)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)


def table(latency_json: Path, fmnist_json: Path) -> str:
    """The backbone tables of docs/results.md (markdown)."""
    lat = {r["backbone"]: r for r in json.loads(latency_json.read_text())["rows"]}
    fm = json.loads(fmnist_json.read_text())["rows"] if fmnist_json.is_file() else []
    lines = [
        "| backbone | exits | MFLOPs (224 px) | per unit, ms (seg / head) | whole model, ms | split overhead: "
        "units one by one, paired [95 % CI] | the runtime's fused static plan, paired [95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in lat.items():
        k = r["exits"]
        ms = r["unit_ms"]
        units = " · ".join(f"{ms[f'seg_{p:02d}']:.2f}/{ms[f'head_{p:02d}']:.2f}" for p in range(1, k + 1))
        sc, fc = r.get("split_overhead_paired_ci", ["?", "?"]), r.get("fused_overhead_paired_ci", ["?", "?"])
        lines.append(
            f"| {name} | {k} | {r['mflops_network']:.0f} | {units} | {r['whole_ms']:.2f} | "
            f"{r['split_overhead_paired']:.3f} [{sc[0]}, {sc[1]}] | "
            f"{r['fused_overhead_paired']:.3f} [{fc[0]}, {fc[1]}] |"
        )
    if fm:
        lines += [
            "",
            "| network (width) | training | static (final exit only): accuracy, mean / p50 ms | cascade at "
            "--max-drop 0.5pt: accuracy, mean / p50 ms | speed-up (mean / p50) | drop, pt | exit shares |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fm:
            st = r["static"]
            left = f"| {r['backbone']} ({r['width']:g}) | {r['kind']} | {100 * st['accuracy']:.2f} %, "
            left += f"{st['latency_ms']:.3f} / {st['p50_ms']:.3f} | "
            if "cascade" not in r:
                lines.append(left + "- | - | - | - |")
                continue
            c = r["cascade"]
            lines.append(
                left + f"{100 * c['accuracy']:.2f} %, {c['latency_ms']:.3f} / {c['p50_ms']:.3f} | "
                f"{r['speedup']:.2f}x / {r['speedup_p50']:.2f}x | {r['drop_pt']:+.2f} | "
                f"{' / '.join(f'{x:.2f}' for x in c['exit_shares'])} |"
            )
    return "\n".join(lines)


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--part", required=True,
        choices=["latency", "heads", "exporters", "fmnist-train", "fmnist-prepare", "fmnist", "plot", "table"],
    )  # fmt: skip
    p.add_argument("--backbones", nargs="*", help="subset (default: all of the part's)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--no-dynamo", action="store_true", help="skip the torch.export-based exporter")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--frozen", nargs="*", default=["resnet18"])
    p.add_argument("--accept-load", action="store_true", help="fmnist-prepare: calibrate on a busy machine")
    p.add_argument("--export-only", action="store_true", help="fmnist-prepare: export, calibrate later")
    p.add_argument("--jobs", type=int, default=2, help="fmnist-train: networks trained at once")
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
    elif a.part == "heads":
        rows = heads_part(a.backbones or LATENCY_BACKBONES, a.rounds, a.size)
        _write(a.out or Path("docs/backbones_heads.json"), {"machine": machine, "size": a.size, "rows": rows})
    elif a.part == "exporters":
        rows = exporters_part(a.backbones or LATENCY_BACKBONES, a.size)
        _write(a.out or Path("docs/backbones_exporters.json"), {"machine": machine, "size": a.size, "rows": rows})
    elif a.part.startswith("fmnist"):
        specs = fmnist_specs({n: a.width or FMNIST[n] for n in (a.backbones or FMNIST)}, a.frozen)
        a.work.mkdir(parents=True, exist_ok=True)
        if a.part == "fmnist-train":
            fmnist_train(specs, a.work, a.train_images, a.epochs, a.jobs)
        elif a.part == "fmnist-prepare":
            fmnist_prepare(trained(specs, a.work), a.work, a.accept_load, not a.export_only)
        else:
            rows = fmnist_time(trained(specs, a.work), a.work, a.test_images)
            # (each row holds its own recipe, read from its checkpoint)
            _write(a.out or a.fmnist_json, {"machine": machine, "load": _load(), "rows": rows})
            for r in rows:
                _say(r)
    elif a.part == "plot":
        plot(a.fmnist_json, a.png)
    else:
        print(table(a.latency_json, a.fmnist_json))


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


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
