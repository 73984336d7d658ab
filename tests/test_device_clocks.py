"""`clocks_locked` on a model of a JetPack 6 Orin's sysfs (layout as jetson_stats reads it: the GPU
devfreq node is 17000000.ga10b, recognised by its device-tree node name). A model of the files, not
a board: it cannot catch other L4T layouts than the ones written here."""

from __future__ import annotations

from pathlib import Path

from edgeexit.runtime.device import clocks_locked


def _orin(root: Path, gpu_min: int, gpu_max: int, cpu_locked: bool = True) -> Path:
    for i in range(2):
        cpu = root / f"devices/system/cpu/cpu{i}/cpufreq"
        cpu.mkdir(parents=True)
        (cpu / "scaling_min_freq").write_text("1510400\n" if cpu_locked else "729600\n")
        (cpu / "scaling_max_freq").write_text("1510400\n")
    for name, node, lo, hi in (("17000000.ga10b", "ga10b", gpu_min, gpu_max), ("15340000.vic", "vic", 115, 729)):
        entry = root / "class/devfreq" / name
        (entry / "device/of_node").mkdir(parents=True)
        (entry / "device/of_node/name").write_bytes(node.encode() + b"\x00")
        (entry / "min_freq").write_text(f"{lo}\n")
        (entry / "max_freq").write_text(f"{hi}\n")
    return root


def test_an_orins_gpu_clock_is_seen_by_its_device_tree_name(tmp_path):
    # CPUs pinned, GPU still scaling (306 MHz .. 1.3 GHz): not locked; the video engine (vic) is no GPU
    assert clocks_locked(str(_orin(tmp_path / "a", 306000000, 1300500000))) is False
    assert clocks_locked(str(_orin(tmp_path / "b", 1300500000, 1300500000))) is True
    assert clocks_locked(str(_orin(tmp_path / "c", 1300500000, 1300500000, cpu_locked=False))) is False
    assert clocks_locked(str(tmp_path / "empty")) is None


def test_a_calibration_made_with_pinned_clocks_warns_when_they_scale(monkeypatch):
    from edgeexit.runtime import device
    from edgeexit.runtime.backends.base import RunnerInfo

    monkeypatch.setattr(device, "jetson_power_mode", lambda: "MAXN / 0")
    monkeypatch.setattr(device, "clocks_locked", lambda: False)
    info = RunnerInfo(name="tensorrt", version="10.3.0", device="Orin", extra={"compute_capability": "8.7"})
    calibrated = {**device.fingerprint(info), "jetson_clocks_locked": True}
    assert device.fingerprint_changes(calibrated, info) == ["jetson_clocks_locked: calibrated True, now False"]
