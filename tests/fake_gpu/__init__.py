"""A SIMULATED TensorRT and CUDA runtime, for testing edgeexit's TensorRT backend without a GPU.

This checks *our* logic — buffers, addresses, shapes, compaction, graphs, contexts, lifetimes —
not TensorRT: an "engine" here is the unit's ONNX file run by ONNX Runtime, and "device memory" is
host memory behind addresses of its own, so a GPU's rules can be enforced. Each module lists the
rules it enforces:

- `fake_gpu.cudart`: cuda-python's runtime (``FakeCudart``): address spaces, asynchronous
  execution, capture rules, handles, integrated GPUs.
- `fake_gpu.tensorrt`: the ``tensorrt`` module per API surface (``make_tensorrt``): device
  pointers and 256-byte alignment, set-up work under capture, builder flags and their numerics,
  driver and flavour, the 8.6 and 10.0 spellings.
- here: ``install`` (both into ``sys.modules``) and ``add_engines`` (engines for an artifact).

What the simulation cannot catch (a test passing here says nothing about these; they need a GPU):
- Real kernels and numerics: an "engine" is the ONNX file run by ONNX Runtime in FP32 (with the
  rounding above), so real FP16/INT8 accuracy, TensorRT's layer fusions, tactic choice, timing
  caches and build failures of real TensorRT (unsupported ops, workspace too small) are not exercised.
- Timing: nothing here measures speed; latency tables, CUDA graph gains and copy/compute overlap
  are not real. Queued work runs at the sync, in order, on one host thread: races between two
  real streams, or between a stream and the host beyond the stale-read rule, are not modelled.
- An enqueue that is really synchronous (a driver or TensorRT version that blocks in
  `execute_async_v3`) looks the same as an asynchronous one to our code, and so do drivers whose
  errors arrive later than the call that caused them (only the sticky illegal-address is modelled).
- Memory limits (out-of-memory at cudaMalloc or at context creation), multi-GPU, MIG, MPS,
  driver/runtime version mismatches beyond the checks the backend itself makes, and the Python
  packaging of TensorRT (which wheel, which libs) — tests/test_trt_surface.py checks the names only.
The tests that run on this simulation are marked ``sim`` (``pytest -m sim`` runs them alone).

Every name here is anchored to the real bindings by tests/test_trt_surface.py (cuda-python's
names and enum values; TensorRT's per-version string tables). Modelled on the documented APIs:
TensorRT's name-based tensor API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`,
returning False on failure) and cuda-python's runtime (calls return `(err, *values)`).
"""

from __future__ import annotations

import json
import sys
import types

from .cudart import DEVICE_BASE, CudaError, FakeCudart
from .tensorrt import FakeContext, FakeEngine, make_tensorrt

__all__ = [
    "DEVICE_BASE",
    "CudaError",
    "FakeContext",
    "FakeCudart",
    "FakeEngine",
    "add_engines",
    "install",
    "make_tensorrt",
]


def install(monkeypatch, version: str = "10.3.0", max_batch: int = 64, tf32: bool = False):
    """Put the simulated tensorrt and cuda.bindings.runtime in sys.modules; returns (trt, cudart)."""
    from edgeexit.runtime.backends import cuda

    cudart = FakeCudart()
    trt = make_tensorrt(cudart, version, max_batch)
    trt.tf32 = tf32
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    pkg = types.ModuleType("cuda")
    pkg.bindings = bindings
    for name, mod in (("tensorrt", trt), ("cuda", pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda, "_runtime", None)
    return trt, cudart


def add_engines(artifact, version: str = "10.3.0", max_batch: int = 64, precision: str = "fp32") -> None:
    """Build every unit's engine with the REAL `edgeexit.export.tensorrt.build_engines` against the
    simulated TensorRT installed by `install` (the "plan" is the unit's ONNX with the profile max
    and TensorRT version in its metadata), and write the manifest entries it records."""
    from edgeexit.export.tensorrt import build_engines

    path = artifact / "manifest.json"
    m = json.loads(path.read_text())
    bare = [{**u, "engines": []} for u in m["units"]]
    units = build_engines(
        artifact, bare, half=precision == "fp16", int8=precision == "int8", max_batch=max_batch, workspace_gib=1.0
    )
    m["units"] = [u.to_json(artifact) for u in units]
    path.write_text(json.dumps(m))
