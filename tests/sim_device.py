"""`edgeexit` as on a Jetson set up by the README: the SIMULATED TensorRT and CUDA of
tests/fake_gpu/ installed, and torch, torchvision, onnx, onnxslim and edgeexit's dataset and
training modules made unimportable (a meta-path blocker, and ``None`` in ``sys.modules``).

    python tests/sim_device.py TRT_VERSION [--integrated] -- edgeexit ARGS...

Every import the blocker refused is printed to stderr at exit (``sim-device: blocked imports: ...``),
so a test can tell "never imported" from "imported, failed and fell back". What it cannot catch:
everything the docstring of tests/fake_gpu/__init__.py lists, and imports of other heavy modules not named in BLOCKED.
"""

from __future__ import annotations

import atexit
import sys
import types
from pathlib import Path

BLOCKED = ("torch", "torchvision", "onnx", "onnxslim", "onnxscript")
BLOCKED_EDGEEXIT = ("edgeexit.data.datasets", "edgeexit.train", "edgeexit.export.exporter", "edgeexit.export.parity")
attempts: list[str] = []


def _blocked(name: str) -> bool:
    return name.split(".")[0] in BLOCKED or any(name == b or name.startswith(b + ".") for b in BLOCKED_EDGEEXIT)


class Blocker:
    """Refuses the blocked modules, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named '{name}' (made unimportable: a device has no {name})")
        return None


def install(version: str, integrated: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fake_gpu  # imports onnx for its own "engines" before the blocker goes up

    cudart = fake_gpu.FakeCudart()
    cudart.integrated = integrated
    trt = fake_gpu.make_tensorrt(cudart, version)
    trt.tf32 = True  # FP32 engines round to TF32, TensorRT's default on Ampere and later (an Orin too)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    pkg = types.ModuleType("cuda")
    pkg.bindings = bindings
    sys.modules.update({"tensorrt": trt, "cuda": pkg, "cuda.bindings": bindings, "cuda.bindings.runtime": cudart})
    for name in list(sys.modules):
        if _blocked(name):
            sys.modules[name] = None  # `import onnx` now fails for edgeexit; fake_gpu keeps its reference
    sys.meta_path.insert(0, Blocker())
    atexit.register(lambda: print(f"sim-device: blocked imports: {sorted(set(attempts)) or 'none'}", file=sys.stderr))


def main(argv: list[str]) -> None:
    split = argv.index("--")
    opts, args = argv[:split], argv[split + 1 :]
    install(opts[0], "--integrated" in opts)
    from edgeexit.cli import main as cli_main

    sys.argv = ["edgeexit", *args]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
