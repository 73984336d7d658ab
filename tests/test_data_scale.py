"""The ImageFolder data path at scale: torchrun ranks share one decoded cache (one rank
decodes, the others wait), and the benchmark's memory probe sums the whole process tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{j}.jpg")
    return root


@pytest.mark.slow  # two torchrun ranks with decode workers: processes, torch imports, a training run
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_two_ranks_decode_once_and_train(tmp_path):
    data = _folder(tmp_path / "ds")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    edgeexit = shutil.which("edgeexit", path=os.path.dirname(sys.executable))
    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [torchrun, "--nproc_per_node", "2", edgeexit, "train", "--data", str(data), "--image-size", "16"]
    cmd += ["--width", "0.0625", "--epochs", "1", "--batch-size", "8", "--val-size", "8", "--method", "ce"]
    cmd += ["--out", str(out), "--cache-dir", str(cache), "--json", str(out / "result.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-2000:]
    assert text.count("decoded 48 images") == 1  # one rank decoded; the other mapped its file
    assert len(list(cache.glob("*.u8"))) == 1
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and (out / "model.pt").is_file()


def test_the_memory_probe_sums_the_process_tree():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import data_scale
    finally:
        sys.path.pop(0)
    # a child holding 200 MB of anonymous memory, under a shell: the probe must see it from the top
    code = "import time; b = bytearray(200 * 1024 * 1024); print('ready', flush=True); time.sleep(30)"
    proc = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{code}"'], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert data_scale.tree_anon_bytes(proc.pid) > 200e6
    finally:
        for line in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(line), 9)
        proc.kill()
        proc.wait()
