"""ONNX Runtime backend: one session per unit; CPU, or the CUDA execution provider when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeexit.errors import UserError
from edgeexit.runtime.backends import HeadOutput


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: `pip install onnxruntime` (or onnxruntime-gpu)") from None
    return onnxruntime


def cuda_provider_available() -> bool:
    try:
        return "CUDAExecutionProvider" in _ort().get_available_providers()
    except UserError:
        return False


class OnnxRuntimeBackend:
    thread_safe = True  # InferenceSession.run may be called from several threads

    def __init__(self, manifest: dict, cuda: bool = False, threads: int | None = 1) -> None:
        """``threads``: ONNX Runtime intra-op threads. 1 by default: batch-1 units are tiny, and on a
        2-core CPU a 2-thread pool made latency heavy-tailed (mean 4 ms, p95 17 ms vs 0.67 / 0.77 ms
        with 1 thread; docs/results.md). Pass None for ONNX Runtime's default, or more for big batches."""
        ort = _ort()
        if cuda and not cuda_provider_available():
            raise UserError(
                "onnxruntime-cuda asked for, but this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu)"
            )
        folder = Path(manifest["_folder"])
        self._manifest, self._folder = manifest, folder
        self._fused: dict[tuple[int, int], tuple] = {}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
        self.version = ort.__version__
        self.precision = "fp32"
        self._opts, self._providers = opts, providers
        self._segments, self._heads = [], []
        for u in manifest["units"]:
            sess = ort.InferenceSession(str(folder / u["onnx"]), opts, providers=providers)
            entry = (sess, [i["name"] for i in u["inputs"]], [o["name"] for o in u["outputs"]])
            (self._segments if u["kind"] == "segment" else self._heads).append(entry)
        self.device = _cpu_name() if not cuda else "CUDA (onnxruntime)"

    def from_host(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return (x,)

    def run_segment(self, k: int, state: tuple) -> tuple:
        sess, names, outs = self._segments[k]
        return tuple(sess.run(outs, dict(zip(names, state, strict=True))))

    def prepare(self, evaluated: list[bool], fuse: bool = True) -> None:
        """Fuse the segments between evaluated exits into one session each (see runtime/fusion.py)."""
        from edgeexit.runtime.fusion import load_or_build, segment_groups

        if not fuse:
            return
        ort = _ort()
        for k0, k1 in segment_groups(evaluated):
            if k1 == k0 or (k0, k1) in self._fused:
                continue
            try:
                source = load_or_build(self._folder, self._manifest, k0, k1)
            except Exception:  # fusion is an optimisation: never fail the cascade for it
                source = None
            if source is None:
                continue
            sess = ort.InferenceSession(source, self._opts, providers=self._providers)
            first, last = self._segments[k0], self._segments[k1]
            self._fused[(k0, k1)] = (sess, first[1], last[2])

    def run_segments(self, k0: int, k1: int, state: tuple) -> tuple:
        """Segments k0..k1 (inclusive): one fused session when prepared, else one by one."""
        fused = self._fused.get((k0, k1))
        if fused is not None:
            sess, names, outs = fused
            return tuple(sess.run(outs, dict(zip(names, state, strict=True))))
        for k in range(k0, k1 + 1):
            state = self.run_segment(k, state)
        return state

    def run_head(self, k: int, tap) -> HeadOutput:
        sess, names, outs = self._heads[k]
        logits, confidence = sess.run(outs, {names[0]: tap})
        return HeadOutput(confidence, logits)

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        return tuple(s[rows] for s in state)

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self._segments, self._heads = [], []


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
