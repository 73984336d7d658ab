"""TensorRT backend: raw plans from the manifest, name-based tensor API, ``execute_async_v3``.

- State stays on the GPU between units: every unit writes its outputs into its own device buffers
  (sized for the profile's max batch), and the next unit reads them in place.
- A head reads back only ``confidence`` (4 bytes a sample); logits are copied for exiting rows only.
- Batch compaction copies the surviving rows device-to-device (rows are contiguous in NCHW), one
  copy per run of consecutive rows.
- CUDA graphs: one per (unit, batch size, input addresses), each captured on **its own execution
  context** (NVIDIA's samples keep one graph per context and shape), after a plain warm-up run on
  that context; at most ``MAX_GRAPHS``. A unit whose capture fails is marked and runs plainly from
  then on (the sticky CUDA error is cleared, as trtexec does).
- Every CUDA object (buffers, stream, graph execs) belongs to one `_Resources` record that
  ``close()`` frees, that a finaliser frees when the backend is garbage-collected, and that a
  failure part-way through ``__init__`` frees.

Supported: TensorRT 8.6 to 10.x (`import_tensorrt` refuses others with the reason), cuda-python
12/13 (11 for graph instantiation too). NOT RUN ON A GPU HERE: no GPU and no TensorRT on this
machine; `tests/test_tensorrt_sim.py` runs this file against a simulated TensorRT and CUDA
(`tests/fake_gpu.py`, ONNX Runtime underneath): it checks our logic, not TensorRT.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from edgeexit.errors import UserError
from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.manifest import artifact_file

ITEMSIZE = 4  # every unit tensor is float32
MAX_GRAPHS = 64  # captured graphs (and their contexts) kept at most; beyond, units run plainly
SUPPORTED_TRT = ((8, 6), (11, 0))  # [min, max)

INSTALL_HINT = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer; then "
    "`pip install 'cuda-python>=12,<13'`, since cuda-python 13 needs a newer driver than JetPack 6 has); "
    "on x86 with an NVIDIA GPU run `pip install 'tensorrt>=8.6,<11' cuda-python`. edgeexit supports "
    "TensorRT 8.6 to 10.x. `--format onnx` works without it."
)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    check_trt_version(trt.__version__)
    return trt


def check_trt_version(version: str) -> None:
    major, minor = (int(v) for v in version.split(".")[:2])
    if (major, minor) < SUPPORTED_TRT[0]:
        raise UserError(f"TensorRT {version} is too old: edgeexit needs 8.6 to 10.x (name-based tensor API)")
    if (major, minor) >= SUPPORTED_TRT[1]:
        raise UserError(
            f"TensorRT {version} is not supported yet: from 11 on networks are strongly typed (no FP16 builder "
            "flag; precision comes from the ONNX types) and edgeexit does not write FP16 ONNX units yet; "
            "use TensorRT 8.6 to 10.x, or `--backend onnxruntime`"
        )


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


def tensorrt_usable(manifest: dict) -> tuple[bool, str]:
    """Can the TensorRT backend run this artifact here? (yes/no, and why not)."""
    if not any(u.get("engines") for u in manifest["units"]):
        return False, "the artifact has no TensorRT engines (export with --format engine on the device)"
    try:
        import_tensorrt()
        from edgeexit.runtime.backends.cuda import cuda_device_info

        cuda_device_info()
    except Exception as e:  # any reason at all: say it, and let auto pick the next backend
        return False, f"TensorRT unusable here: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return True, "engines present, TensorRT and a GPU found"


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


class _Resources:
    """Every CUDA object the backend owns; ``free()`` is idempotent and runs at close, on garbage
    collection (weakref.finalize) and when ``__init__`` fails part-way."""

    def __init__(self) -> None:
        self.stream = None
        self.buffers: list = []
        self.graph_execs: list = []
        self.contexts: list = []

    def free(self) -> None:
        from edgeexit.runtime.backends.cuda import cudart

        rt = cudart()
        for g in self.graph_execs:
            rt.cudaGraphExecDestroy(g)
        self.graph_execs = []
        self.contexts = []  # TensorRT frees a context's memory when it is released
        for b in self.buffers:
            b.close()
        self.buffers = []
        if self.stream is not None:
            stream, self.stream = self.stream, None
            rt.cudaStreamDestroy(stream)


class TensorRTBackend(Runner):
    thread_safe = False  # an execution context runs one inference at a time; the Cascade locks

    def __init__(self, manifest: dict, precision: str | None = None, cuda_graphs: bool = True) -> None:
        from edgeexit.runtime.backends.cuda import check, cuda_device_info, cudart

        trt = import_tensorrt()
        self.rt, self.check = cudart(), check
        self.device_info = cuda_device_info()
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.free)
        try:
            self._res.stream = check(self.rt.cudaStreamCreate())
            self._load(trt, manifest, precision)
        except BaseException:
            self._finalizer()
            raise
        self.stream = self._res.stream
        self.use_graphs = cuda_graphs
        self._graphs: dict = {}  # (unit, batch, input addresses) -> (graph exec, its context)
        self._graph_failed: set[int] = set()  # units that cannot be captured: never retried

    def _load(self, trt, manifest: dict, precision: str | None) -> None:
        from edgeexit.runtime.backends.cuda import DeviceBuffer

        folder = Path(manifest["_folder"])
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
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
                self._res.buffers.append(buf)
                outputs[o["name"]] = (buf.ptr, rest)
            context = engine.create_execution_context()
            self._res.contexts.append(context)
            self.units.append(
                {
                    "engine": engine,
                    "context": context,
                    "inputs": [i["name"] for i in u["inputs"]],
                    "outputs": outputs,
                    "max_batch": max_batch,
                    "name": u["name"],
                }
            )
        self._allocate_io(manifest, trt.__version__, precision)

    def _allocate_io(self, manifest: dict, version: str, precision: str) -> None:
        from edgeexit.runtime.backends.cuda import DeviceBuffer

        self.max_batch = min(unit["max_batch"] for unit in self.units)
        self._segment_units = [i for i, u in enumerate(manifest["units"]) if u["kind"] == "segment"]
        self._head_units = [i for i, u in enumerate(manifest["units"]) if u["kind"] == "head"]
        first = manifest["units"][0]["inputs"][0]
        self._image_rest = tuple(int(d) for d in first["shape"][1:])
        self._image = DeviceBuffer(self.max_batch * int(np.prod(self._image_rest)) * ITEMSIZE)
        self._res.buffers.append(self._image)
        largest = max(int(np.prod(rest)) for unit in self.units for _, rest in unit["outputs"].values())
        # Two scratch buffers per state position for compaction (a state has at most two tensors).
        self._scratch = [DeviceBuffer(self.max_batch * largest * ITEMSIZE) for _ in range(2)]
        self._res.buffers += self._scratch
        self._host_conf = np.empty(self.max_batch, dtype=np.float32)
        self.info = RunnerInfo(
            name="tensorrt",
            version=version,
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

    def _bind(self, ctx, unit: dict, inputs: tuple) -> None:
        for name, t in zip(unit["inputs"], inputs, strict=True):
            if not ctx.set_input_shape(name, t.shape):
                raise RuntimeError(f"TensorRT refused shape {t.shape} for {unit['name']}:{name}")
            if not ctx.set_tensor_address(name, t.ptr):
                raise RuntimeError(f"TensorRT refused the address of {unit['name']}:{name}")
        for name, (ptr, _) in unit["outputs"].items():
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of {unit['name']}:{name}")

    def _execute(self, idx: int, inputs: tuple) -> dict:
        unit, n = self.units[idx], inputs[0].shape[0]
        key = (idx, n, tuple(t.ptr for t in inputs))
        graph = self._graphs.get(key)
        if graph is not None:
            self.check(self.rt.cudaGraphLaunch(graph[0], self.stream))
        elif self.use_graphs and idx not in self._graph_failed and len(self._graphs) < MAX_GRAPHS:
            self._capture(key, unit, inputs)
        else:
            ctx = unit["context"]
            self._bind(ctx, unit, inputs)
            if not ctx.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT execution of {unit['name']} failed")
        return {name: _DevTensor(ptr, (n, *rest)) for name, (ptr, rest) in unit["outputs"].items()}

    def _capture(self, key, unit: dict, inputs: tuple) -> None:
        """A new context for this shape and these addresses: one plain run (it also produces this
        call's outputs), then the same launch recorded into a graph. On failure the unit is marked
        and never captured again; the plain run's outputs stand."""
        from edgeexit.runtime.backends.cuda import clear_error, graph_instantiate

        rt, idx = self.rt, key[0]
        ctx = unit["engine"].create_execution_context()
        self._bind(ctx, unit, inputs)
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT execution of {unit['name']} failed")
        graph = None
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            self.check(rt.cudaStreamBeginCapture(self.stream, mode))
            try:
                ok = ctx.execute_async_v3(self.stream)
            finally:
                graph = self.check(rt.cudaStreamEndCapture(self.stream))
            if not ok:
                raise RuntimeError("execute_async_v3 failed under capture")
            exec_graph = graph_instantiate(graph)
        except (RuntimeError, TypeError):
            clear_error()
            self._graph_failed.add(idx)
            return
        finally:
            if graph is not None:
                rt.cudaGraphDestroy(graph)  # the executable graph is all we keep
        self._res.graph_execs.append(exec_graph)
        self._res.contexts.append(ctx)
        self._graphs[key] = (exec_graph, ctx)

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
        from edgeexit.runtime.backends.cuda import copy_rows

        rows = np.arange(logits.shape[0]) if rows is None else np.asarray(rows)
        out = np.empty((len(rows), *logits.shape[1:]), dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        copy_rows(out.ctypes.data, logits.ptr, rows, logits.row_bytes, kind, self.stream)
        self.check(self.rt.cudaStreamSynchronize(self.stream))
        return out

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        from edgeexit.runtime.backends.cuda import copy_rows

        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        out = []
        for pos, t in enumerate(state):
            dst = self._scratch[pos].ptr
            copy_rows(dst, t.ptr, rows, t.row_bytes, kind, self.stream)
            out.append(_DevTensor(dst, (len(rows), *t.shape[1:])))
        return tuple(out)

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self._graphs.clear()
        self.units = []  # releases the engines and their execution contexts
        self._finalizer()  # frees the CUDA objects once; later calls do nothing
