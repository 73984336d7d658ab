"""The SIMULATED TensorRT / cuda-python (tests/fake_gpu/) anchored to the real API names.

TensorRT: the real Python bindings of 8.6.1, 10.0.1, 10.3.0 and 11.4.0.106 are on PyPI (without TensorRT's
libraries); `benchmarks/fetch_trt_bindings.sh` unpacks them into build/trt-wheels/, and each
tensorrt.so's string table lists every class, method and enum name of that version. Checked: every
name a fake surface defines is in its version's table, and every TensorRT name edgeexit calls on
that version is too (and the names that version dropped are not called). cuda-python: the fake
runtime's names against the real `cuda.bindings.runtime` installed with torch.
"""

from __future__ import annotations

import re
import subprocess
from enum import IntEnum
from pathlib import Path

import pytest
from fake_gpu import FakeContext, FakeCudart, FakeEngine, make_tensorrt

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "trt-wheels"
SO = {
    "8.6.1": "tensorrt_bindings-8.6.1",
    "10.0.1": "tensorrt_cu12_bindings-10.0.1",
    "10.3.0": "tensorrt_cu12_bindings-10.3.0",
    "11.4.0": "tensorrt_cu12_bindings-11.4.0.106",
}
# What edgeexit's TensorRT code calls (export/tensorrt.py, runtime/backends/tensorrt.py), per version.
CALLED_ALL = [
    "Logger",
    "WARNING",
    "Builder",
    "Runtime",
    "OnnxParser",
    "create_network",
    "parse_from_file",
    "num_errors",
    "get_error",
    "create_builder_config",
    "set_memory_pool_limit",
    "MemoryPoolType",
    "WORKSPACE",
    "create_timing_cache",
    "set_timing_cache",
    "get_timing_cache",
    "serialize",
    "create_optimization_profile",
    "set_shape",
    "add_optimization_profile",
    "build_serialized_network",
    "deserialize_cuda_engine",
    "NetworkDefinitionCreationFlag",
    "num_io_tensors",
    "get_tensor_name",
    "get_tensor_mode",
    "get_tensor_dtype",
    "get_tensor_profile_shape",
    "TensorIOMode",
    "INPUT",
    "OUTPUT",
    "DataType",
    "FLOAT",
    "create_execution_context",
    "set_input_shape",
    "set_tensor_address",
    "execute_async_v3",
]
CALLED = {
    "8.6.1": CALLED_ALL
    + [
        "EXPLICIT_BATCH",
        "BuilderFlag",
        "FP16",
        "INT8",
        "device_memory_size",
        "create_execution_context_without_device_memory",
        "device_memory",
        "set_optimization_profile_async",
    ],
    "10.0.1": CALLED_ALL  # no device_memory_size_v2 / set_device_memory before 10.1: the older spelling
    + [
        "STRONGLY_TYPED",
        "device_memory_size",
        "create_execution_context_without_device_memory",
        "device_memory",
    ],
    "10.3.0": CALLED_ALL
    + [
        "STRONGLY_TYPED",
        "ExecutionContextAllocationStrategy",
        "USER_MANAGED",
        "device_memory_size_v2",
        "set_device_memory",
    ],
    "11.4.0": CALLED_ALL
    + [
        "STRONGLY_TYPED",
        "ExecutionContextAllocationStrategy",
        "USER_MANAGED",
        "device_memory_size_v2",
        "set_device_memory",
    ],
}
GONE_IN_11 = ["platform_has_fast_fp16", "EXPLICIT_BATCH", "create_execution_context_without_device_memory"]


# The linker merges string literals by suffix: these enum names are stored only inside the longer
# literal named here (found in the wheels' tables), never as a whole word of their own.
TAIL_MERGED = {"INPUT": "CONDITIONAL_INPUT", "OUTPUT": "CONDITIONAL_OUTPUT", "STATIC": "SHARED_STATIC"}


class _Table:
    """The string table; a name counts only as a whole word of it (method names also appear inside
    the docstrings, e.g. ":attr:`num_errors`"), never as the tail of a longer word, except the few
    names of `TAIL_MERGED`, accepted when the literal that holds them is there.
    What it cannot catch: a name found only in a docstring counts; which class owns a name, and
    signatures, are not checked."""

    def __init__(self, text: str) -> None:
        self.text, self.words = text, set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))

    def __contains__(self, name: str) -> bool:
        return name in self.words or TAIL_MERGED.get(name) in self.words


def _table(version: str) -> _Table:
    so = next((WHEELS / SO[version]).rglob("tensorrt*.so"), None) if (WHEELS / SO[version]).is_dir() else None
    if so is None:
        pytest.skip(f"TensorRT {version} bindings wheel not fetched: run benchmarks/fetch_trt_bindings.sh")
    out = subprocess.run(["strings", "-n", "3", str(so)], capture_output=True, text=True, check=True).stdout
    return _Table(out)


def _fake_names(version: str) -> set[str]:
    trt = make_tensorrt(FakeCudart(), version)
    names = set()
    for attr in (
        "Logger",
        "Runtime",
        "Builder",
        "OnnxParser",
        "DataType",
        "TensorIOMode",
        "MemoryPoolType",
        "NetworkDefinitionCreationFlag",
        "BuilderFlag",
        "ExecutionContextAllocationStrategy",
    ):
        obj = getattr(trt, attr, None)
        if obj is None:
            continue
        names.add(attr)
        if isinstance(obj, type) and issubclass(obj, IntEnum):
            names |= set(obj.__members__)
        else:
            names |= {n for n in vars(obj) if not n.startswith("_")}
    for cls in (FakeEngine, FakeContext):  # the methods/properties a surface exposes (set by make_tensorrt)
        names |= {n for n in dir(cls) if not n.startswith("_")}
    builder = trt.Builder(None)
    for obj in (builder.create_network(0), builder.create_builder_config(), builder.create_optimization_profile()):
        names |= {n for n in dir(type(obj)) if not n.startswith("_")}
    internal = {
        "engine",
        "memory",
        "profile",
        "shapes",
        "addresses",
        "device_ptr",
        "trt",
        "session",
        "input_names",
        "output_names",
        "name",
        "profiles",
        "out_row_bytes",
        "activation_bytes",
        "dtypes",
        "contexts_made",
        "version",
        "max_batch",
        "severity",
        "logger",
        "network",
        "errors",
        "flags",
        "model",
        "source",
        "cache",
        "data",
    }
    return names - internal


@pytest.mark.parametrize("version", list(SO))
def test_every_name_of_the_fake_surface_is_in_that_versions_bindings(version):
    table = _table(version)
    missing = sorted(n for n in _fake_names(version) if n not in table)
    assert not missing, f"fake TensorRT {version} defines names the real bindings lack: {missing}"


@pytest.mark.parametrize("version", list(SO))
def test_every_tensorrt_name_edgeexit_calls_exists_in_that_version(version):
    table = _table(version)
    missing = sorted(n for n in CALLED[version] if n not in table)
    assert not missing, f"edgeexit calls names TensorRT {version} lacks: {missing}"
    if version.startswith("11"):
        assert not [n for n in GONE_IN_11 if n in table.words]  # the reason edgeexit no longer calls them there
        src = (ROOT / "edgeexit" / "export" / "tensorrt.py").read_text()
        assert "platform_has_fast_fp16" not in src


def test_the_fake_cuda_runtime_uses_only_real_cuda_python_names():
    runtime = pytest.importorskip("cuda.bindings.runtime")
    fake = FakeCudart()
    names = [n for n in {*dir(type(fake)), *vars(fake)} if n.startswith("cuda")]
    assert len(names) > 15
    missing = [n for n in names if not hasattr(runtime, n)]
    assert not missing, missing
    assert not hasattr(fake, "cudaGraphInstantiate")  # edgeexit calls the WithFlags spelling only


def test_the_fake_cuda_runtime_uses_cuda_pythons_values():
    """Error codes, copy kinds, capture modes and flags: the same numbers as the real runtime (a
    status the fake returns is the status a GPU would return)."""
    runtime = pytest.importorskip("cuda.bindings.runtime")
    fake = FakeCudart()
    for member in fake.cudaError_t:
        assert int(getattr(runtime.cudaError_t, member.name)) == int(member), member.name
    for enum in ("cudaMemcpyKind", "cudaStreamCaptureMode"):
        for member in getattr(fake, enum):
            assert int(getattr(getattr(runtime, enum), member.name)) == int(member), member.name
    for const in ("cudaStreamDefault", "cudaStreamNonBlocking", "cudaHostAllocDefault", "cudaHostAllocMapped"):
        assert int(getattr(fake, const)) == int(getattr(runtime, const)), const
    assert int(runtime.cudaStreamLegacy) == fake.cudaStreamLegacy
    props = fake.cudaGetDeviceProperties(0)[1]
    assert all(hasattr(runtime.cudaDeviceProp(), f) for f in vars(props))


def test_every_cuda_runtime_name_edgeexit_calls_is_real_and_simulated():
    """The cudart names in the backend's sources (``rt.cuda...``, ``cudart().cuda...``) exist in the
    real cuda-python runtime, and the fake defines each (so the simulation runs what ships)."""
    runtime = pytest.importorskip("cuda.bindings.runtime")
    src = (
        "".join((ROOT / "edgeexit" / "runtime" / "backends" / f).read_text() for f in ("cuda.py", "tensorrt.py"))
        + (ROOT / "benchmarks" / "gpu_check.py").read_text()
    )
    called = set(re.findall(r"(?:\brt|cudart\(\))\.(cuda\w+)", src))
    assert {"cudaMallocHost", "cudaHostAlloc", "cudaHostGetDevicePointer", "cudaFreeHost"} <= called
    fake = FakeCudart()
    assert not [n for n in called if not hasattr(runtime, n)]
    assert not [n for n in called if not hasattr(fake, n)]


def test_the_name_table_matches_whole_names_only():
    table = _Table("get_num_errors CONDITIONAL_INPUT UINT8 :attr:`set_shape`")
    assert "num_errors" not in table and "INT8" not in table  # tails of longer names do not count
    assert "set_shape" in table and "get_num_errors" in table
    assert "INPUT" in table  # stored only inside CONDITIONAL_INPUT by the linker (TAIL_MERGED)
    assert "OUTPUT" not in table  # its literal is not in this table
