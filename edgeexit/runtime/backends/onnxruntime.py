"""ONNX Runtime backend: one session per unit; CPU, or the CUDA execution provider when present.

With ``io_binding`` (the default for onnxruntime-cuda) the state stays where the sessions run:
inputs and outputs are bound as OrtValues on the device, a head's confidences are the only thing
copied to the host per unit, logits are read back on demand, and batch compaction goes through the
host once per compaction. The IOBinding path is exercised on the CPU by the tests (same API)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeexit.errors import ArtifactError, UserError
from edgeexit.runtime.artifact import Artifact, Unit
from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.device import cpu_name


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: `pip install onnxruntime` (or onnxruntime-gpu)") from None
    return onnxruntime


def _fetch_rows(logits, rows):
    """Logits of a head run with IOBinding, read back to the host (only the rows asked for)."""
    host = logits.numpy()
    return host if rows is None else host[rows]


def _session(ort, source, opts, providers):
    """A session over a file (a Path) or a model's bytes (a fused graph)."""
    path = str(source) if isinstance(source, Path) else source
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # a corrupt or foreign file: the artifact is broken, not edgeexit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = path if isinstance(path, str) else "a fused graph of its units"
        raise ArtifactError(f"{where} cannot be loaded by ONNX Runtime ({first[:160]}): re-export the model") from None


def _session_options(ort, threads: int | None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def cuda_provider_available() -> bool:
    try:
        return "CUDAExecutionProvider" in _ort().get_available_providers()
    except UserError:
        return False


class OnnxRuntimeBackend(Runner):
    thread_safe = True  # InferenceSession.run may be called from several threads

    def __init__(
        self,
        artifact: Artifact,
        cuda: bool = False,
        threads: int | None = 1,
        io_binding: bool | None = None,
        precision: str = "fp32",
    ) -> None:
        """``threads``: ONNX
        Runtime intra-op threads. 1 by default: batch-1 units are tiny, and on a 2-core CPU a 2-thread
        pool made latency heavy-tailed (mean 4 ms, p95 17 ms vs 0.67 / 0.77 ms with 1 thread;
        docs/lab-notebook.md §3). Pass None for ONNX Runtime's default, or more for big batches."""
        if precision not in ("fp32", "int8"):
            raise UserError(
                f"precision must be fp32 or int8 for ONNX Runtime, got '{precision}'"
                + (": fp16 runs on TensorRT (`edgeexit engines ARTIFACT --half`)" if precision == "fp16" else "")
            )
        if cuda and precision == "int8":  # Q/DQ would run as separate kernels around FP32 convs: slower
            raise UserError(
                "onnxruntime-cuda does not accelerate INT8 (its CUDA execution provider runs the Q/DQ units "
                "unfused, slower than fp32): run int8 on TensorRT (`edgeexit engines ARTIFACT --int8`) or "
                "on the CPU (--backend onnxruntime-cpu)"
            )
        self._open(artifact.folder, artifact.units, precision, cuda, threads, io_binding)

    @classmethod
    def for_units(cls, folder: Path, units: Sequence[Unit], precision: str = "fp32") -> OnnxRuntimeBackend:
        """A CPU runner over units that are not an artifact yet (export's parity checks on the
        temporary folder): ``precision`` names the files run (fp32, int8, fp16). One intra-op thread, as
        the runtime: beside torch in the exporting process, ONNX Runtime's default pool spin-waits
        against torch's threads (measured on the 2-core VM: a parity batch 2.9 s instead of 0.24 s)."""
        runner = cls.__new__(cls)
        runner._open(Path(folder), tuple(units), precision, cuda=False, threads=1, io_binding=False)
        return runner

    def _open(self, folder: Path, units: Sequence[Unit], precision: str, cuda: bool, threads, io_binding) -> None:
        ort = _ort()
        if cuda and not cuda_provider_available():
            raise UserError(
                "onnxruntime-cuda asked for, but this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu)"
            )
        if cuda and hasattr(ort, "preload_dlls"):
            # ORT >= 1.21 with CUDA/cuDNN from pip wheels finds them only after this (torch, when
            # imported first, has loaded them already); a failure here leaves the check below to say so
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001
                pass
        files = [u.file(precision) for u in units]  # an ArtifactError naming the export flag when absent
        self._precision, self._folder, self._units = precision, folder, tuple(units)
        self._fused: dict[tuple[int, int], tuple] = {}
        self._opts = _session_options(ort, threads)
        self._providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        # per unit: (session, input names, output names)
        self._segments: list[tuple[Any, list[str], list[str]]] = []
        self._heads: list[tuple[Any, list[str], list[str]]] = []
        for u, path in zip(units, files, strict=True):
            sess = _session(ort, path, self._opts, self._providers)
            if cuda and "CUDAExecutionProvider" not in sess.get_providers():  # ORT fell back to the CPU
                raise UserError(
                    "onnxruntime-cuda asked for, but ONNX Runtime could not load its CUDA execution provider and "
                    "fell back to the CPU (CUDA/cuDNN libraries missing or of another major): install the "
                    "onnxruntime-gpu build for your CUDA major with cuDNN 9, or call onnxruntime.preload_dlls() "
                    "(ORT >= 1.21); `--backend onnxruntime-cpu` runs on the CPU knowingly"
                )
            (self._segments if u.kind == "segment" else self._heads).append((sess, u.input_names, u.output_names))
        self._device = "cuda" if cuda else "cpu"
        self._bind = cuda if io_binding is None else bool(io_binding)
        self._ortvalue = ort.OrtValue
        self.info = RunnerInfo(
            name="onnxruntime-cuda" if cuda else "onnxruntime-cpu",
            version=ort.__version__,
            device=cpu_name() if not cuda else "CUDA (onnxruntime)",
            precision=precision,
            fuses=True,
        )

    @property
    def units(self) -> tuple[Unit, ...]:
        """The units this runner runs (seg_01, head_01, ...)."""
        return self._units

    @property
    def io_binding(self) -> bool:
        """Whether the state stays as OrtValues on the sessions' device between units (IOBinding)."""
        return self._bind

    @property
    def fused_groups(self) -> frozenset[tuple[int, int]]:
        """The (first, last) segment groups that run as one graph now (what `prepare` built)."""
        return frozenset(self._fused)

    def from_host(self, x: np.ndarray) -> tuple:
        if self._bind:
            return (self._ortvalue.ortvalue_from_numpy(np.ascontiguousarray(x), self._device, 0),)
        return (x,)

    def _run(self, sess, names: list, outs: list, state: tuple) -> tuple:
        if not self._bind:
            return tuple(sess.run(outs, dict(zip(names, state, strict=True))))
        binding = sess.io_binding()  # one per call: calls from several threads stay independent
        for name, value in zip(names, state, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in outs:
            binding.bind_output(name, self._device)
        sess.run_with_iobinding(binding)
        return tuple(binding.get_outputs())

    def run_segment(self, pos: int, state: tuple) -> tuple:
        return self._run(*self._segments[pos], state)

    def prepare(self, plan, fuse: bool, cache: bool = True) -> None:
        """Fuse each of ``plan``'s groups, its segments and the head it ends at, into one session
        (see runtime/fusion.py): one ONNX Runtime call per evaluated exit."""
        if not fuse:
            return
        for first, last in plan.groups:
            if (first, last) not in self._fused:
                self._fuse(first, last, cache)

    def forget(self, plans) -> None:
        keep = {group for plan in plans for group in plan.groups}
        for key in [k for k in self._fused if k not in keep]:
            self._fused.pop(key, None)  # a thread still running the session keeps its own reference

    def _fuse(self, first: int, last: int, cache: bool = True) -> None:
        from edgeexit.runtime.fusion import load_or_build

        try:
            source = load_or_build(self._folder, self._units, first, last, self._precision, cache=cache)
        except Exception:  # fusion is an optimisation: never fail the cascade for it
            source = None
        if source is None:
            return
        sess = _session(_ort(), source, self._opts, self._providers)
        state_out = self._segments[last][2]
        # one assignment: a thread running the cascade sees either no entry or a complete one
        self._fused[(first, last)] = (sess, self._segments[first][1], state_out + self._heads[last][2], len(state_out))

    def run_exit(self, first_pos: int, pos: int, state: tuple, fuse: bool = True) -> tuple[tuple, HeadOutput]:
        """Segments first..pos and head pos: one call when prepared and ``fuse``, else unit by unit."""
        fused = self._fused.get((first_pos, pos)) if fuse else None
        if fused is None:
            return super().run_exit(first_pos, pos, state, fuse)
        sess, names, outs, n = fused
        out = self._run(sess, names, outs, state)
        return out[:n], self._head_output(out[n], out[n + 1])

    def _head_output(self, logits, confidence) -> HeadOutput:
        if not self._bind:
            return HeadOutput(confidence, logits)
        return HeadOutput(confidence.numpy(), logits, _fetch_rows)

    def run_head(self, pos: int, tap) -> HeadOutput:
        sess, names, outs = self._heads[pos]
        if not self._bind:
            logits, confidence = sess.run(outs, {names[0]: tap})
            return HeadOutput(confidence, logits)
        return self._head_output(*self._run(sess, names, outs, (tap,)))

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        if not self._bind:
            return tuple(s[rows] for s in state)
        return tuple(
            self._ortvalue.ortvalue_from_numpy(np.ascontiguousarray(s.numpy()[rows]), self._device, 0) for s in state
        )

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        # Calls in flight keep their own reference to the session they run; new calls fail cleanly.
        self._segments, self._heads, self._fused = [], [], {}
