"""TensorRT backend: raw plans from the manifest, name-based tensor API, ``execute_async_v3``.

- State stays on the GPU between units: every unit writes its outputs into its own device buffers
  (sized for the profile's max batch), and the next unit reads them in place.
- A head reads back only ``confidence`` (4 bytes a sample); logits are copied for exiting rows only.
- Batch compaction copies the surviving rows device-to-device (rows are contiguous in NCHW).
- One CUDA graph per (unit, batch size, input addresses), captured after a first plain run; any
  capture failure falls back to plain ``execute_async_v3`` for that unit.

NOT RUN HERE: this machine has no GPU and TensorRT cannot be installed. This file follows
TensorRT's documented Python API (>= 8.6) and cuda-python's runtime bindings; see docs/design.md.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgeexit.errors import UserError
from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.manifest import artifact_file

ITEMSIZE = 4  # every unit tensor is float32

INSTALL_HINT = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); on x86 "
    "with an NVIDIA GPU run `pip install tensorrt cuda-python`. `--format onnx` works without it."
)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    major, minor = (int(v) for v in trt.__version__.split(".")[:2])
    if (major, minor) < (8, 6):
        raise UserError(f"TensorRT {trt.__version__} is too old: edgeexit needs >= 8.6 (name-based tensor API)")
    return trt


def check_engine_compatible(entry: dict, trt_version: str, device: dict) -> None:
    """A plan only runs with the TensorRT version and GPU architecture it was built for."""
    if entry["trt_version"] != trt_version:
        raise UserError(
            f"{entry['path']} was built with TensorRT {entry['trt_version']} but this is TensorRT "
            f"{trt_version}: rebuild with `edgeexit export MODEL.pt --format engine --force`"
        )
    if entry["compute_capability"] != device["compute_capability"]:
        raise UserError(
            f"{entry['path']} was built for {entry['device_name']} (sm {entry['compute_capability']}) "
            f"but this GPU is {device['name']} (sm {device['compute_capability']}): rebuild the engines "
            "on this device with `edgeexit export MODEL.pt --format engine --force`"
        )


def tensorrt_usable(manifest: dict) -> bool:
    """Engines in the manifest, TensorRT and cuda-python importable, and a GPU present."""
    if not any(u.get("engines") for u in manifest["units"]):
        return False
    try:
        import tensorrt  # noqa: F401

        from edgeexit.runtime.backends.cuda import cuda_device_info

        cuda_device_info()
    except Exception:
        return False
    return True


def select_engine(unit: dict, precision: str | None) -> dict:
    from edgeexit.errors import ArtifactError

    engines = unit.get("engines") or []
    if precision is not None:
        engines = [e for e in engines if e["precision"] == precision]
    if not engines:
        want = f" {precision}" if precision else ""
        raise ArtifactError(
            f"{unit['name']} has no{want} TensorRT engine: run "
            "`edgeexit export MODEL.pt --format engine` on this device"
        )
    return engines[0]


class _DevTensor:
    __slots__ = ("ptr", "shape")

    def __init__(self, ptr: int, shape: tuple) -> None:
        self.ptr, self.shape = ptr, shape

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * ITEMSIZE


class TensorRTBackend(Runner):
    thread_safe = False  # an execution context runs one inference at a time; the Cascade locks

    def __init__(self, manifest: dict, precision: str | None = None, cuda_graphs: bool = True) -> None:
        from edgeexit.runtime.backends.cuda import DeviceBuffer, check, cuda_device_info, cudart

        trt = import_tensorrt()
        self.rt, self.check = cudart(), check
        self.device_info = cuda_device_info()
        folder = Path(manifest["_folder"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.stream = check(self.rt.cudaStreamCreate())
        self.use_graphs = cuda_graphs
        self._graphs: dict = {}
        self._graph_failed: set = set()
        self._lock = threading.Lock()
        self._buffers: list = []
        self.units = []
        for u in manifest["units"]:
            entry = select_engine(u, precision)
            check_engine_compatible(entry, trt.__version__, self.device_info)
            precision = entry["precision"]
            engine = self._runtime.deserialize_cuda_engine(artifact_file(folder, entry["path"]).read_bytes())
            if engine is None:
                raise RuntimeError(f"TensorRT could not load {entry['path']}")
            max_batch = int(entry["batch_profile"]["max"])
            outputs = {}
            for o in u["outputs"]:
                rest = tuple(int(d) for d in o["shape"][1:])
                buf = DeviceBuffer(max_batch * int(np.prod(rest)) * ITEMSIZE)
                self._buffers.append(buf)
                outputs[o["name"]] = (buf.ptr, rest)
            self.units.append(
                {
                    "engine": engine,
                    "context": engine.create_execution_context(),
                    "inputs": [i["name"] for i in u["inputs"]],
                    "outputs": outputs,
                    "max_batch": max_batch,
                    "name": u["name"],
                }
            )
        self.max_batch = min(unit["max_batch"] for unit in self.units)
        self._segment_units = [i for i, u in enumerate(manifest["units"]) if u["kind"] == "segment"]
        self._head_units = [i for i, u in enumerate(manifest["units"]) if u["kind"] == "head"]
        first = manifest["units"][0]["inputs"][0]
        self._image_rest = tuple(int(d) for d in first["shape"][1:])
        self._image = DeviceBuffer(self.max_batch * int(np.prod(self._image_rest)) * ITEMSIZE)
        largest = max(int(np.prod(rest)) for unit in self.units for _, rest in unit["outputs"].values())
        # Two scratch buffers per state position for compaction (a state has at most two tensors).
        self._scratch = [DeviceBuffer(self.max_batch * largest * ITEMSIZE) for _ in range(2)]
        self._buffers += [self._image, *self._scratch]
        self._host_conf = np.empty(self.max_batch, dtype=np.float32)
        self.info = RunnerInfo(
            name="tensorrt",
            version=trt.__version__,
            device=self.device_info["name"],
            precision=precision,
            max_batch=self.max_batch,
            extra={"compute_capability": self.device_info["compute_capability"]},
        )

    # -- host <-> device -------------------------------------------------------------------------
    def from_host(self, x: np.ndarray) -> tuple:
        if len(x) > self.max_batch:
            raise ValueError(
                f"batch {len(x)} exceeds the engines' max batch {self.max_batch}; pass smaller batches "
                "or re-export with a larger --batch"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(self._image.ptr, x.ctypes.data, x.nbytes, kind, self.stream))
        return (_DevTensor(self._image.ptr, x.shape),)

    def _execute(self, idx: int, inputs: tuple) -> dict:
        unit = self.units[idx]
        ctx, n = unit["context"], inputs[0].shape[0]
        for name, t in zip(unit["inputs"], inputs, strict=True):
            ctx.set_input_shape(name, t.shape)
            ctx.set_tensor_address(name, t.ptr)
        for name, (ptr, _) in unit["outputs"].items():
            ctx.set_tensor_address(name, ptr)
        key = (idx, n, tuple(t.ptr for t in inputs))
        graph = self._graphs.get(key) if self.use_graphs else None
        if graph is not None:
            self.check(self.rt.cudaGraphLaunch(graph, self.stream))
        elif not ctx.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT execution of {unit['name']} failed")
        elif self.use_graphs and key not in self._graph_failed:
            self._capture(key, ctx)
        return {name: _DevTensor(ptr, (n, *rest)) for name, (ptr, rest) in unit["outputs"].items()}

    def _capture(self, key, ctx) -> None:
        """After a plain run has set the shapes up, record the same launch into a CUDA graph."""
        rt = self.rt
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            self.check(rt.cudaStreamBeginCapture(self.stream, mode))
            ok = ctx.execute_async_v3(self.stream)
            graph = self.check(rt.cudaStreamEndCapture(self.stream))
            if not ok:
                raise RuntimeError("execute_async_v3 failed under capture")
            exec_graph = self.check(rt.cudaGraphInstantiate(graph, 0))
            self._graphs[key] = exec_graph
        except RuntimeError:
            self._graph_failed.add(key)

    def run_segment(self, pos: int, state: tuple) -> tuple:
        return tuple(self._execute(self._segment_units[pos], state).values())

    def run_head(self, pos: int, tap) -> HeadOutput:
        outs = self._execute(self._head_units[pos], (tap,))
        conf, logits = outs["confidence"], outs["logits"]
        n = conf.shape[0]
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(self._host_conf.ctypes.data, conf.ptr, n * ITEMSIZE, kind, self.stream))
        self.check(self.rt.cudaStreamSynchronize(self.stream))
        return HeadOutput(self._host_conf[:n].copy(), logits, self._fetch_logits)

    def _fetch_logits(self, logits: _DevTensor, rows) -> np.ndarray:
        rows = np.arange(logits.shape[0]) if rows is None else np.asarray(rows)
        out = np.empty((len(rows), *logits.shape[1:]), dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        rb = logits.row_bytes
        for j, r in enumerate(rows):
            self.check(self.rt.cudaMemcpyAsync(out[j].ctypes.data, logits.ptr + int(r) * rb, rb, kind, self.stream))
        self.check(self.rt.cudaStreamSynchronize(self.stream))
        return out

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        out = []
        for pos, t in enumerate(state):
            dst = self._scratch[pos].ptr
            rb = t.row_bytes
            for j, r in enumerate(rows):
                self.check(self.rt.cudaMemcpyAsync(dst + j * rb, t.ptr + int(r) * rb, rb, kind, self.stream))
            out.append(_DevTensor(dst, (len(rows), *t.shape[1:])))
        return tuple(out)

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for g in self._graphs.values():
            self.rt.cudaGraphExecDestroy(g)
        self._graphs.clear()
        for b in self._buffers:
            b.close()
        self._buffers = []
