"""TensorRT backend: raw plans from the manifest, name-based tensor API, ``execute_async_v3``.

- State stays on the GPU between units: every unit writes its outputs into its own device buffers
  (sized for the profile's max batch), and the next unit reads them in place.
- A head reads back only ``confidence`` (4 bytes a sample); logits are copied for exiting rows only.
- Batch compaction copies the surviving rows device-to-device (rows are contiguous in NCHW), one
  copy per run of consecutive rows.
- CUDA graphs: one per (unit, batch bucket, input addresses), each captured on **its own execution
  context** (NVIDIA's samples keep one graph per context and shape), after a plain warm-up run on
  that context; as many as (unit, bucket, input addresses) can take, so batch work never falls off
  the graph path (``MAX_GRAPHS`` caps it when set). Batch sizes are padded up to a power of two (rows are
  independent), so a unit has at most 7 graphs for batch 1..64. Every context is created WITHOUT
  its own activation memory: all of them share one device buffer sized for the largest engine
  (units run serially on one stream, which TensorRT allows). A (unit, bucket) whose capture
  fails runs plainly from then on (the sticky CUDA error is cleared, as trtexec does).
- TensorRT 8.6: every context after an engine's first has no optimisation profile (-1) until one
  is set: each context gets profile 0 explicitly.
- At load every engine's I/O is checked against the manifest: names, FP32, profile max.
- Host staging is page-locked: frames go up from a ``cudaMallocHost`` buffer, confidences and
  logits come back into one, so the copies are truly asynchronous and every host read waits for
  the stream (``cudaStreamSynchronize``) first. On an integrated GPU (Jetson:
  ``cudaDeviceProp.integrated``) the frame buffer and every head's confidences are mapped pinned
  memory instead: TensorRT reads and writes them in place, no copy at all.
- Streams and graphs are cuda-python handle objects; TensorRT gets the stream as its integer value
  (a size_t), converted once.
- Every CUDA object (buffers, stream, graph execs) belongs to one `_Resources` record that
  ``close()`` frees, that a finaliser frees when the backend is garbage-collected, and that a
  failure part-way through ``__init__`` frees.

Supported: TensorRT 8.6 to 11.x (`import_tensorrt` refuses others with the reason), cuda-python
12/13 with the CUDA major of the TensorRT wheel. NOT RUN ON A GPU HERE: no GPU and no TensorRT on this
machine; `tests/test_tensorrt_sim.py` runs this file against a simulated TensorRT and CUDA
(`tests/fake_gpu.py`, ONNX Runtime underneath): it checks our logic, not TensorRT.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeexit.errors import UserError
from edgeexit.runtime.backends.base import GraphStats, HeadOutput, Runner, RunnerInfo

if TYPE_CHECKING:
    from edgeexit.runtime.artifact import Artifact

ITEMSIZE = 4  # every unit tensor is float32
# Captured graphs (and their contexts) kept at most; beyond, units run plainly. None: every key there
# can be, units x buckets x 2 input addresses (a unit reads its predecessor's outputs, or the scratch
# buffer after compaction); contexts carry no activation memory, so each costs little.
MAX_GRAPHS: int | None = None
CAPTURE_ATTEMPTS = 3  # a (unit, bucket) whose capture failed this often runs plainly from then on
SUPPORTED_TRT = ((8, 6), (12, 0))  # [min, max)

INSTALL_HINT = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer; use a venv made with "
    "`python3 -m venv --system-site-packages`, then `pip install 'cuda-python>=12,<13'`, since cuda-python 13 "
    "needs a newer driver than JetPack 6 has); on x86 with an NVIDIA GPU run "
    "`pip install 'tensorrt-cu12>=8.6,<12' 'cuda-python>=12,<13'` (driver >= 525) or "
    "`pip install 'tensorrt-cu13>=10,<12' 'cuda-python>=13,<14'` (driver >= 580). edgeexit supports "
    "TensorRT 8.6 to 11.x. `--format onnx` works without it."
)


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def bucket(n: int, max_batch: int) -> int:
    """The batch a graph is captured for: the next power of two, capped at the profile max."""
    return min(1 << (int(n) - 1).bit_length(), max_batch)


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
        raise UserError(f"TensorRT {version} is too old: edgeexit needs 8.6 to 11.x (name-based tensor API)")
    if (major, minor) >= SUPPORTED_TRT[1]:
        raise UserError(
            f"TensorRT {version} is not supported yet: edgeexit was written against 8.6 to 11.x; "
            "use one of those, or `--backend onnxruntime`"
        )


REBUILD = "edgeexit engines ARTIFACT"  # builds plans on the device from the artifact's own ONNX files


def rebuild_hint(folder=None, precision: str | None = None) -> str:
    """The command that builds this artifact's engines here (no torch, no checkpoint, no dataset)."""
    flag = {"fp16": " --half", "int8": " --int8"}.get(precision or "", "")
    target = str(folder) if folder is not None else "ARTIFACT"
    return f"`edgeexit engines {target}{flag} --force`"


def check_engine_compatible(entry: Mapping, trt_version: str, device: dict, folder=None) -> None:
    """A plan only runs with the TensorRT version and GPU architecture it was built for."""
    hint = rebuild_hint(folder, entry.get("precision"))
    if entry["trt_version"] != trt_version:
        raise UserError(
            f"{entry['path']} was built with TensorRT {entry['trt_version']} but this is TensorRT "
            f"{trt_version}: rebuild the engines here with {hint}"
        )
    if entry["compute_capability"] != device["compute_capability"]:
        raise UserError(
            f"{entry['path']} was built for {entry['device_name']} (sm {entry['compute_capability']}) "
            f"but this GPU is {device['name']} (sm {device['compute_capability']}): rebuild the engines "
            f"on this device with {hint}"
        )


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheel is built for, from the names of the distributions
    that install its packages (``tensorrt``; the bindings wheel's own package is
    ``tensorrt_bindings``, as in tensorrt_cu12_bindings 11.4.0.106's top_level.txt; the libraries'
    ``tensorrt_libs``): tensorrt-cu12-bindings, tensorrt_cu13_libs, ... None when unknown (JetPack's
    apt package has no Python distribution: there the `trt.Runtime` construction is the check)."""
    import importlib.metadata as md

    try:
        packages = md.packages_distributions()
    except Exception:  # noqa: BLE001 - broken metadata elsewhere in site-packages: unknown, not fatal
        return None
    names = [n for top in ("tensorrt", "tensorrt_bindings", "tensorrt_libs") for n in packages.get(top, [])]
    return cuda_major_of(names)


def cuda_major_of(distributions) -> int | None:
    """``tensorrt-cu13-bindings`` -> 13; None when no name carries a CUDA flavour."""
    import re

    for name in distributions:
        m = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_].*)?", name.lower())
        if m:
            return int(m.group(1))
    return None


def check_tensorrt_runs(trt) -> None:
    """TensorRT must be able to start here. A wheel built for a newer CUDA than the driver supports
    (tensorrt-cu13 needs driver >= 580) fails inside ``trt.Runtime(...)`` with a bare pybind11
    TypeError ("factory function returned nullptr"): compare the flavour's CUDA major with the
    driver's first, then construct a Runtime, and say what to install either way."""
    from edgeexit.runtime.backends.cuda import cudart

    rt = cudart()
    err, driver = rt.cudaDriverGetVersion()
    flavour = tensorrt_cuda_major()
    if int(err) == int(rt.cudaError_t.cudaSuccess) and int(driver) and flavour is not None:
        if int(driver) // 1000 < flavour:
            raise UserError(
                f"TensorRT {trt.__version__} is the CUDA {flavour} build (tensorrt-cu{flavour}) but the NVIDIA "
                f"driver supports CUDA {int(driver) // 1000}.{int(driver) % 1000 // 10}: "
                f"`pip install 'tensorrt-cu{int(driver) // 1000}>=8.6,<12'`, or update the driver"
            )
    try:
        trt.Runtime(trt.Logger(trt.Logger.WARNING))
    except (TypeError, RuntimeError) as e:
        raise UserError(
            f"TensorRT {trt.__version__} cannot start here ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "its CUDA build needs a newer driver than this one, or no GPU is visible; install the TensorRT flavour "
            "of this driver's CUDA major (tensorrt-cu12 for drivers 525-579, tensorrt-cu13 from 580)"
        ) from None


def tensorrt_usable(artifact: Artifact | None, precision: str | None = None) -> tuple[bool, str]:
    """Can the TensorRT backend run this artifact here, at ``precision`` when given? Checks that
    TensorRT starts (a real `trt.Runtime`, the wheel's CUDA major against the driver's) and that the
    engines the backend would pick were built by this TensorRT for this GPU: `auto` then falls back
    to the ONNX units with the reason instead of failing on stale plans. ``artifact`` None: would
    TensorRT run engines here at all (doctor without an artifact)."""
    per_unit = [[e.precision for e in u.engines] for u in artifact.units] if artifact is not None else [["any"]]
    if not any(per_unit):
        return False, f"the artifact has no TensorRT engines (build them on this device with `{REBUILD}`)"
    if artifact is not None and precision is not None and not all(precision in unit for unit in per_unit):
        return False, f"the artifact has no {precision} TensorRT engines (`{REBUILD}`)"
    try:
        trt = import_tensorrt()
        from edgeexit.runtime.backends.cuda import cuda_device_info

        device = cuda_device_info()
        check_tensorrt_runs(trt)
        for entry in _selected_entries(artifact, precision) if artifact is not None else []:
            check_engine_compatible(entry, trt.__version__, device)
    except Exception as e:  # any reason at all: say it, and let auto pick the next backend
        return False, f"TensorRT unusable here: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return True, "engines present and built for this TensorRT and GPU"


def _selected_entries(artifact: Artifact, precision: str | None) -> list[Mapping]:
    """The manifest entries of the engines `select_engine` would load."""
    out = []
    for u in artifact.units:
        try:
            out.append(select_engine(u, precision).info)
        except Exception:  # noqa: BLE001 - a unit without such an engine: the precision check above said so
            continue
    return out


def select_engine(unit, precision: str | None):
    """The `Engine` of ``unit`` (an artifact `Unit`) to run at ``precision``."""
    from edgeexit.errors import ArtifactError

    engines = list(unit.engines)
    if precision is not None:
        engines = [e for e in engines if e.precision == precision]
    elif any(e.precision == "fp32" for e in engines):  # no --precision means fp32 when fp32 engines were built
        engines = [e for e in engines if e.precision == "fp32"]
    if not engines:
        want = f" {precision}" if precision else ""
        raise ArtifactError(
            f"{unit.name} has no{want} TensorRT engine: build them on this device with {rebuild_hint(None, precision)}"
        )
    return engines[0]


def _device_memory_size(engine) -> int:
    """Activation memory one context needs: ``device_memory_size_v2`` (10.1+, 11), else the 8.6 name."""
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = engine.device_memory_size
    return int(size)


_REBUILD_IO = f"rebuild the engines with `{REBUILD} --force`"


def check_engine_io(trt, engine, unit, max_batch: int, path: str) -> None:
    """The plan's I/O must be what the manifest says (``unit``: an artifact `Unit`): names,
    FP32, profile max >= manifest max."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want_in, want_out = unit.input_names, unit.output_names
    if sorted(names) != sorted(want_in + want_out):
        raise UserError(f"{path}: engine tensors {names} are not the manifest's {want_in + want_out}: {_REBUILD_IO}")
    for name in names:
        mode = engine.get_tensor_mode(name)
        expected = trt.TensorIOMode.INPUT if name in want_in else trt.TensorIOMode.OUTPUT
        if mode != expected:
            raise UserError(f"{path}: {name} is an {mode} of the engine, the manifest says otherwise: {_REBUILD_IO}")
        if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
            raise UserError(
                f"{path}: {name} is {engine.get_tensor_dtype(name)}, edgeexit moves FP32 between units: {_REBUILD_IO}"
            )
        if name in want_in:
            top = engine.get_tensor_profile_shape(name, 0)[2]
            if int(top[0]) < max_batch:
                raise UserError(f"{path}: profile max batch {top[0]} < the manifest's {max_batch}: {_REBUILD_IO}")


class _DevTensor:
    __slots__ = ("ptr", "shape")

    def __init__(self, ptr: int, shape: tuple) -> None:
        self.ptr, self.shape = ptr, shape

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * ITEMSIZE


class _Resources:
    """Every CUDA and TensorRT object the backend owns; ``free()`` is idempotent, never raises, and
    runs at close, on garbage collection (weakref.finalize, also at interpreter exit) and when
    ``__init__`` fails part-way. Order: graph execs, then contexts, engines and the runtime,
    then the memory they used, then the stream."""

    def __init__(self) -> None:
        self.stream: Any = None  # a cuda-python cudaStream_t
        self.buffers: list = []
        self.graph_execs: list = []
        self.contexts: list = []
        self.units: list = []  # the backend's unit records (they hold the engines)
        self.runtime: Any = None  # the trt.Runtime the engines were deserialised with

    def free(self) -> None:
        from edgeexit.runtime.backends.cuda import cudart

        rt = cudart()
        if self.stream is not None:  # work still queued must finish before what it uses goes
            try:
                rt.cudaStreamSynchronize(self.stream)
            except Exception:  # noqa: BLE001
                pass
        for g in self.graph_execs:
            try:
                rt.cudaGraphExecDestroy(g)
            except Exception:  # noqa: BLE001 - teardown: free what can be freed
                pass
        self.graph_execs = []
        self.contexts = []  # TensorRT frees a context when it is released (before its engine)
        self.units.clear()
        self.runtime = None
        for b in self.buffers:
            b.close(strict=False)
        self.buffers = []
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                rt.cudaStreamDestroy(stream)
            except Exception:  # noqa: BLE001
                pass


class TensorRTBackend(Runner):
    thread_safe = False  # an execution context runs one inference at a time; the Cascade locks

    def __init__(self, artifact: Artifact, precision: str | None = None, cuda_graphs: bool = True) -> None:
        self._open(artifact.folder, artifact.units, precision, cuda_graphs)

    @classmethod
    def for_units(
        cls, folder: Path, units: Sequence, precision: str | None = None, cuda_graphs: bool = True
    ) -> TensorRTBackend:
        """A backend over units that are not an artifact yet (export runs its engines before
        publishing them); ``units``: artifact `Unit`s (`parse_units`)."""
        runner = cls.__new__(cls)
        runner._open(Path(folder), tuple(units), precision, cuda_graphs)
        return runner

    def _open(self, folder: Path, units: Sequence, precision: str | None, cuda_graphs: bool) -> None:
        from edgeexit.runtime.backends.cuda import check, create_stream, cuda_device_info, cudart

        trt = import_tensorrt()
        self._folder = folder
        self.rt, self.check = cudart(), check
        self.device_info = cuda_device_info()
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.free)
        try:
            self._res.stream = create_stream()
            self.stream = self._res.stream  # a cudaStream_t object, for cuda-python
            self._trt_stream = operator.index(self.stream)  # its value, the size_t TensorRT takes
            self._load(trt, units, precision)
        except BaseException:
            self._finalizer()
            raise
        self.use_graphs = cuda_graphs
        self._graphs: dict = {}  # (unit, bucket, input addresses) -> (graph exec, its context)
        self._graph_failed: dict[tuple[int, int], int] = {}  # (unit, bucket) -> failed captures

    @property
    def units(self) -> list:
        return self._res.units

    def _load(self, trt, units: Sequence, precision: str | None) -> None:
        from edgeexit.runtime.backends.cuda import DeviceBuffer, HostBuffer

        self._trt = trt
        self.zero_copy = bool(self.device_info["integrated"])  # a Jetson's GPU shares DRAM with the CPU
        self._v86 = trt_major(trt.__version__) < 9
        self._logger = trt.Logger(trt.Logger.WARNING)
        check_tensorrt_runs(trt)  # a wheel whose CUDA the driver lacks: a named fix, not a pybind TypeError
        self._res.runtime = trt.Runtime(self._logger)
        built = ""  # the precision of the engines loaded: the first unit's choice binds the others
        for u in units:
            entry = select_engine(u, precision)
            check_engine_compatible(entry.info, trt.__version__, self.device_info, self._folder)
            precision = built = entry.precision
            engine = self._res.runtime.deserialize_cuda_engine(entry.path.read_bytes())
            if engine is None:
                raise RuntimeError(f"TensorRT could not load {entry.path.name}")
            max_batch = entry.max_batch
            if max_batch is None:
                raise UserError(
                    f"{entry.path.name} records no batch profile: rebuild the engines with {rebuild_hint()}"
                )
            check_engine_io(trt, engine, u, max_batch, entry.path.name)
            outputs, host_conf = {}, None
            for o in u.outputs:
                rest = tuple(int(d) for d in o.shape[1:])
                nbytes = max_batch * int(np.prod(rest)) * ITEMSIZE
                if self.zero_copy and u.kind == "head" and o.name == "confidence":
                    mapped = HostBuffer(nbytes, mapped=True)  # written by TensorRT, read by the host in place
                    self._res.buffers.append(mapped)
                    outputs[o.name], host_conf = (mapped.mapped_ptr(), rest), mapped.array()
                    continue
                buf = DeviceBuffer(nbytes)
                self._res.buffers.append(buf)
                outputs[o.name] = (buf.ptr, rest)
            self._res.units.append(
                {
                    "engine": engine,
                    "inputs": u.input_names,
                    "outputs": outputs,
                    "max_batch": max_batch,
                    "name": u.name,
                    "host_conf": host_conf,
                }
            )
        # one activation buffer for every context of every engine: units run serially on one stream
        self._activation_bytes = max(_device_memory_size(u["engine"]) for u in self._res.units)
        self._activations = DeviceBuffer(self._activation_bytes)
        self._res.buffers.append(self._activations)
        for unit in self._res.units:
            unit["context"] = self._new_context(unit)
        self._allocate_io(units, trt.__version__, built)

    def _new_context(self, unit: dict):
        """A context on the shared activation memory (units run serially on one stream), on profile 0 (TensorRT 8.6
        leaves a context after an engine's first without a profile until one is set)."""
        trt, engine = self._trt, unit["engine"]
        if hasattr(trt, "ExecutionContextAllocationStrategy") and hasattr(engine, "device_memory_size_v2"):
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is not None:
                ctx.set_device_memory(self._activations.ptr, self._activations.nbytes)
        else:  # 8.6 (and 10.0): the older spelling of the same thing
            ctx = engine.create_execution_context_without_device_memory()
            if ctx is not None:
                ctx.device_memory = self._activations.ptr
        if ctx is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {unit['name']} (out of memory?)")
        if self._v86:  # 8.6: a context after the engine's first has profile -1 until one is set
            if not ctx.set_optimization_profile_async(0, self._trt_stream):
                raise RuntimeError(f"TensorRT refused optimisation profile 0 for {unit['name']}")
            self.check(self.rt.cudaStreamSynchronize(self.stream))
        self._res.contexts.append(ctx)
        return ctx

    def _allocate_io(self, units: Sequence, version: str, precision: str) -> None:
        from edgeexit.runtime.backends.cuda import DeviceBuffer, HostBuffer

        self.max_batch = min(unit["max_batch"] for unit in self.units)
        buckets = max(unit["max_batch"] - 1 for unit in self.units).bit_length() + 1
        self._graph_capacity = len(self.units) * buckets * 2
        self._unit_names = tuple(u.name for u in units)  # what `graph_stats` reports, as the artifact names them
        self._segment_units = [i for i, u in enumerate(units) if u.kind == "segment"]
        self._head_units = [i for i, u in enumerate(units) if u.kind == "head"]
        self._image_rest = tuple(int(d) for d in units[0].inputs[0].shape[1:])
        image_bytes = self.max_batch * int(np.prod(self._image_rest)) * ITEMSIZE
        if self.zero_copy:  # the frame is written where TensorRT reads it
            stage = HostBuffer(image_bytes, mapped=True)
            self._res.buffers.append(stage)
            self._image_ptr = stage.mapped_ptr()
        else:  # pinned staging, then one asynchronous upload
            self._image = DeviceBuffer(image_bytes)
            stage = HostBuffer(image_bytes)
            self._res.buffers += [self._image, stage]
            self._image_ptr = self._image.ptr
        self._stage_in = stage
        largest = max(int(np.prod(rest)) for unit in self.units for _, rest in unit["outputs"].values())
        # Two scratch buffers per state position for compaction (a state has at most two tensors).
        self._scratch = [DeviceBuffer(self.max_batch * largest * ITEMSIZE) for _ in range(2)]
        self._res.buffers += self._scratch
        logit_row = max(
            int(np.prod(unit["outputs"]["logits"][1])) for unit in self.units if "logits" in unit["outputs"]
        )
        self._stage_conf = HostBuffer(self.max_batch * ITEMSIZE)
        self._stage_logits = HostBuffer(self.max_batch * logit_row * ITEMSIZE)
        self._res.buffers += [self._stage_conf, self._stage_logits]
        # numpy views of the pinned staging memory, dropped at close
        self._views: tuple[np.ndarray, ...] = (stage.array(), self._stage_conf.array(), self._stage_logits.array())
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
                f"or rebuild the engines with a larger --max-batch (`{REBUILD} --max-batch N --force`)"
            )
        if tuple(x.shape[1:]) != self._image_rest:
            raise ValueError(f"frames of shape {tuple(x.shape[1:])}, the engines take {self._image_rest}")
        # The staging buffer is page-locked: a copy still queued would read it, so wait for the
        # stream before overwriting it (idle here in practice: every head ends with a sync).
        self.check(self.rt.cudaStreamSynchronize(self.stream))
        stage = self._views[0][: x.size].reshape(x.shape)
        np.copyto(stage, x)
        if not self.zero_copy:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self.check(self.rt.cudaMemcpyAsync(self._image_ptr, self._stage_in.ptr, stage.nbytes, kind, self.stream))
        return (_DevTensor(self._image_ptr, x.shape),)

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
        if self.use_graphs:
            b = bucket(n, unit["max_batch"])
            key = (idx, b, tuple(t.ptr for t in inputs))
            graph = self._graphs.get(key)
            if graph is not None:
                self.check(self.rt.cudaGraphLaunch(graph[0], self.stream))
                return self._outputs(unit, n)
            cap = MAX_GRAPHS if MAX_GRAPHS is not None else self._graph_capacity
            if self._graph_failed.get((idx, b), 0) < CAPTURE_ATTEMPTS and len(self._graphs) < cap:
                padded = tuple(_DevTensor(t.ptr, (b, *t.shape[1:])) for t in inputs)
                if self._capture(key, unit, padded):
                    return self._outputs(unit, n)
        ctx = unit["context"]
        self._bind(ctx, unit, inputs)
        if not ctx.execute_async_v3(self._trt_stream):
            raise RuntimeError(f"TensorRT execution of {unit['name']} failed")
        return self._outputs(unit, n)

    @staticmethod
    def _outputs(unit: dict, n: int) -> dict:
        return {name: _DevTensor(ptr, (n, *rest)) for name, (ptr, rest) in unit["outputs"].items()}

    def _capture(self, key, unit: dict, inputs: tuple) -> bool:
        """A new context (on the shared activation memory) for this bucket and these addresses: one
        plain run (it also produces this call's outputs), then the same launch recorded into a graph.
        Any failure (no context, refused shape, capture invalidated, instantiate error) counts
        against the (unit, bucket) and returns False: the caller runs the plain path, nothing is
        retained; after ``CAPTURE_ATTEMPTS`` failures that (unit, bucket) is not tried again."""
        from edgeexit.runtime.backends.cuda import clear_error, graph_instantiate

        rt = self.rt
        graph = exec_graph = ctx = None
        try:
            ctx = self._new_context(unit)
            self._bind(ctx, unit, inputs)
            if not ctx.execute_async_v3(self._trt_stream):
                raise RuntimeError(f"TensorRT execution of {unit['name']} failed")
            self.check(rt.cudaStreamSynchronize(self.stream))  # as trtexec: warm-up done before capture
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            self.check(rt.cudaStreamBeginCapture(self.stream, mode))
            try:
                ok = ctx.execute_async_v3(self._trt_stream)
            finally:
                graph = self.check(rt.cudaStreamEndCapture(self.stream))
            if not ok:
                raise RuntimeError("execute_async_v3 failed under capture")
            exec_graph = graph_instantiate(graph)
        except Exception:  # noqa: BLE001 - any failure: no graph for this (unit, bucket)
            clear_error()
            self._graph_failed[key[:2]] = self._graph_failed.get(key[:2], 0) + 1
            if ctx is not None and ctx in self._res.contexts:
                self._res.contexts.remove(ctx)
            return False
        finally:
            if graph is not None:
                rt.cudaGraphDestroy(graph)  # the executable graph is all we keep
        self._res.graph_execs.append(exec_graph)
        self._graphs[key] = (exec_graph, ctx)
        return True

    def run_segment(self, pos: int, state: tuple) -> tuple:
        return tuple(self._execute(self._segment_units[pos], state).values())

    def run_head(self, pos: int, tap) -> HeadOutput:
        idx = self._head_units[pos]
        outs = self._execute(idx, (tap,))
        conf, logits = outs["confidence"], outs["logits"]
        n = conf.shape[0]
        host = self.units[idx]["host_conf"]  # mapped memory on an integrated GPU: no copy
        if host is None:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self.check(self.rt.cudaMemcpyAsync(self._stage_conf.ptr, conf.ptr, n * ITEMSIZE, kind, self.stream))
            host = self._views[1]
        self.check(self.rt.cudaStreamSynchronize(self.stream))  # before the host reads anything
        return HeadOutput(host[:n].copy(), logits, self._fetch_logits)

    def _fetch_logits(self, logits: _DevTensor, rows) -> np.ndarray:
        from edgeexit.runtime.backends.cuda import copy_rows

        rows = np.arange(logits.shape[0]) if rows is None else np.asarray(rows)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        copy_rows(self._stage_logits.ptr, logits.ptr, rows, logits.row_bytes, kind, self.stream)
        self.check(self.rt.cudaStreamSynchronize(self.stream))
        width = int(np.prod(logits.shape[1:]))
        return self._views[2][: len(rows) * width].reshape(len(rows), *logits.shape[1:]).copy()

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        from edgeexit.runtime.backends.cuda import copy_rows

        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        out = []
        for pos, t in enumerate(state):
            dst = self._scratch[pos].ptr
            copy_rows(dst, t.ptr, rows, t.row_bytes, kind, self.stream)
            out.append(_DevTensor(dst, (len(rows), *t.shape[1:])))
        return tuple(out)

    def graph_stats(self) -> GraphStats:
        """The CUDA graphs captured so far, per (unit name, batch bucket), and the failed captures."""
        captured: dict[tuple[str, int], int] = {}
        for idx, b, _ in list(self._graphs):  # a copy: another thread may capture meanwhile
            key = (self._unit_names[idx], b)
            captured[key] = captured.get(key, 0) + 1
        failed = {(self._unit_names[idx], b): n for (idx, b), n in list(self._graph_failed.items())}
        return GraphStats.of(captured, failed, MAX_GRAPHS if MAX_GRAPHS is not None else self._graph_capacity)

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self._graphs.clear()
        self._views = ()  # numpy views of pinned memory must not outlive it
        self._finalizer()  # releases contexts and engines, then frees the CUDA objects, once
