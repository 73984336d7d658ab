#!/bin/sh
# Fetch TensorRT's Python *bindings* wheels (no TensorRT libraries: nothing here can run them) into
# the git-ignored build/trt-wheels/, unpacked, so tests/test_trt_surface.py can read each version's
# tensorrt.so string table and check the simulated API surfaces (tests/fake_gpu/) against it.
set -e
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
mkdir -p build/trt-wheels && cd build/trt-wheels
for spec in "tensorrt-cu12-bindings==11.4.0.106" "tensorrt-cu12-bindings==10.3.0" "tensorrt-cu12-bindings==10.0.1" "tensorrt-bindings==8.6.1"; do
  "../../$PIP" download --no-deps -q -d . "$spec" || "$PIP" download --no-deps -q -d . "$spec"
done
for w in *.whl; do d="${w%%-cp*}"; mkdir -p "$d"; unzip -q -o "$w" -d "$d"; done
find . -name 'tensorrt*.so'
