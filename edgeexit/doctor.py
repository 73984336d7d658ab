"""`edgeexit doctor [ARTIFACT]`: what this machine can run, and whether an artifact runs here.

Every probe tolerates absence: a missing library is reported (with its import error verbatim),
never raised. Only the runtime extra is needed (numpy, onnxruntime); torch is never imported.
The TensorRT and CUDA layers are asked through their public functions (runtime/backends/tensorrt.py,
cuda.py, device.py), each inside its own try, so that a change there shows as a probe error here
rather than a crash.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys
from pathlib import Path

from edgeexit.util import bounded_text, run_probe


def _try(fn, *args):
    """(value, None) or (None, 'ExceptionType: message')."""
    try:
        return fn(*args), None
    except BaseException as e:  # SystemExit from a broken native module too
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"{type(e).__name__}: {e}".strip()


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- probes -----------------------------------------------------------------------------------------
def python_info() -> dict:
    venv = sys.prefix != sys.base_prefix
    system_site = None
    if venv:
        cfg = Path(sys.prefix) / "pyvenv.cfg"
        try:
            text = cfg.read_text().lower()
            system_site = "include-system-site-packages = true" in text
        except OSError:
            pass
    return {
        "version": platform.python_version(),
        "executable": sys.executable,
        "venv": venv,
        "venv_system_site_packages": system_site,
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def numpy_info() -> dict:
    np, err = _try(importlib.import_module, "numpy")
    return {"version": np.__version__} if np is not None else {"version": None, "error": err}


def onnxruntime_info() -> dict:
    ort, err = _try(importlib.import_module, "onnxruntime")
    if ort is None:
        return {"version": None, "providers": [], "error": err}
    providers, perr = _try(ort.get_available_providers)
    out = {"version": ort.__version__, "providers": providers or []}
    if perr:
        out["error"] = perr
    return out


def jetson_info() -> dict:
    model = None
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            model = Path(p).read_bytes().decode(errors="replace").strip("\x00\n ")
            break
        except OSError:
            continue
    release = None
    try:
        release = Path("/etc/nv_tegra_release").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        pass
    is_jetson = release is not None or bool(model and ("jetson" in model.lower() or "nvidia" in model.lower()))
    mode = None
    if is_jetson or shutil.which("nvpmodel"):
        from edgeexit.runtime import device

        mode, _ = _try(device.jetson_power_mode)
    return {"jetson": is_jetson, "model": model if is_jetson else None, "l4t": release, "power_mode": mode}


def _system_tensorrt() -> str | None:
    """Where JetPack (or apt) installed TensorRT's Python bindings system-wide, if it did."""
    for root in ("/usr/lib/python3/dist-packages", f"/usr/lib/python3.{sys.version_info.minor}/dist-packages"):
        if (Path(root) / "tensorrt").is_dir():
            return root
    return None


def tensorrt_info(py: dict, jetson: dict) -> dict:
    trt, err = _try(importlib.import_module, "tensorrt")
    out: dict = {"version": None, "usable": False}
    if trt is None:
        out["import_error"] = err
        system = _system_tensorrt()
        if py["venv"] and system and not py["venv_system_site_packages"]:
            out["why"] = (
                f"this is a venv without system site-packages, and TensorRT is installed system-wide in {system}"
                f"{' (JetPack)' if jetson['jetson'] else ''}: recreate the venv with "
                "`python3 -m venv --system-site-packages`, or symlink the tensorrt package into it"
            )
            out["jetson_venv"] = True
        elif jetson["jetson"]:
            out["why"] = "not installed: it comes with JetPack (`sudo apt install python3-libnvinfer`)"
        else:
            out["why"] = "not installed: `pip install 'tensorrt>=8.6,<12' cuda-python` on a machine with an NVIDIA GPU"
        return out
    out["version"] = getattr(trt, "__version__", None)
    from edgeexit.runtime.backends import tensorrt as trt_backend

    check = getattr(trt_backend, "check_trt_version", None)
    if check is not None and out["version"]:
        _, verr = _try(check, out["version"])
        if verr:
            out["why"] = verr.split(": ", 1)[-1]
            return out
    _, rerr = _try(_tensorrt_starts, trt, trt_backend)
    if rerr:  # e.g. the CUDA 13 wheel on a driver < 580: the Runtime cannot be constructed
        out["why"] = rerr.split(": ", 1)[-1]
        return out
    out["usable"] = True
    return out


def _tensorrt_starts(trt, trt_backend) -> None:
    """TensorRT starts here: the wheel's CUDA major against the driver's, then a real `trt.Runtime`
    (a CUDA 13 wheel on a driver < 580 imports fine and fails only there)."""
    trt_backend.check_tensorrt_runs(trt)


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    res = run_probe([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"], timeout_s=10)
    text = res.text.strip() if res is not None and res.returncode == 0 else ""
    line = text.splitlines()[0] if text else ""
    parts = [bounded_text(p) for p in line.split(",")]
    if len(parts) < 3:
        return {}
    return {"name": parts[0], "compute_capability": parts[1], "driver_version": parts[2]}


def _cuda_version(v: int | None) -> str | None:
    return None if not v else f"{v // 1000}.{(v % 1000) // 10}"


def cuda_info() -> dict:
    """cuda-python version, the driver's CUDA version, whether they match; the GPU."""
    out: dict = {
        "cuda_python": _dist_version("cuda-python") or _dist_version("cuda-bindings"),
        "driver_cuda": None,
        "runtime_cuda": None,
        "match": None,
        "gpu": None,
        "compute_capability": None,
    }
    smi = _nvidia_smi()
    if smi:
        out["driver_version"] = smi["driver_version"]
    from edgeexit.runtime.backends import cuda

    rt, err = _try(cuda.cudart)
    if rt is None:
        out["error"] = err.split(": ", 1)[-1] if err else None
    else:
        drv, derr = _try(lambda: cuda.check(rt.cudaDriverGetVersion()))
        run, _ = _try(lambda: cuda.check(rt.cudaRuntimeGetVersion()))
        out["driver_cuda"], out["runtime_cuda"] = _cuda_version(drv), _cuda_version(run)
        if drv == 0 and not derr:
            derr = "no NVIDIA driver loaded (cudaDriverGetVersion reports 0)"
        if derr:
            out["error"] = derr.split(": ", 1)[-1] if ": " in derr and "(" not in derr.split(": ", 1)[0] else derr
            if "InsufficientDriver" in derr and not smi:
                out["error"] = f"no NVIDIA driver loaded ({out['error']})"
        if drv and out["cuda_python"]:
            major = int(out["cuda_python"].split(".")[0])
            out["match"] = drv // 1000 >= major
            if not out["match"]:
                out["why"] = (
                    f"cuda-python {out['cuda_python']} needs a driver for CUDA {major}.x; this driver supports "
                    f"CUDA {out['driver_cuda']}: `pip install 'cuda-python>={drv // 1000},<{drv // 1000 + 1}'`"
                )
        dev, gerr = _try(cuda.cuda_device_info)
        if dev:
            out["gpu"], out["compute_capability"] = dev.get("name"), dev.get("compute_capability")
        elif gerr and "error" not in out:
            out["error"] = gerr.split(": ", 1)[-1]
    if out["gpu"] is None and smi:
        out["gpu"], out["compute_capability"] = smi["name"], smi["compute_capability"]
    return out


def opencv_info() -> dict:
    cv2, err = _try(importlib.import_module, "cv2")
    if cv2 is None:
        return {"version": None, "error": err, "video_backends": {}}
    info, _ = _try(cv2.getBuildInformation)
    backends = {}
    in_video = False
    for line in (info or "").splitlines():
        if line.strip().startswith("Video I/O"):
            in_video = True
            continue
        if in_video:
            if line.strip() and not line.startswith("    "):
                break
            key, _, value = line.strip().partition(":")
            if value:
                backends[key.strip()] = value.strip()
    wanted = {}
    for name, keys in (("V4L2", ("v4l/v4l2", "v4l2", "v4l")), ("GStreamer", ("gstreamer",)), ("FFmpeg", ("ffmpeg",))):
        value = next((v for k, v in backends.items() if k.lower() in keys), None)
        wanted[name] = bool(value) and not value.upper().startswith("NO")
    return {"version": cv2.__version__, "video_backends": wanted, "video_io": backends}


def tensorrt_install_why(cuda: dict) -> str:
    """Why TensorRT is absent and the ONE command that installs it on this machine (x86 or other
    non-Jetson): the wheel's CUDA major follows the driver (cuda-python 13 needs driver >= 580)."""
    if not cuda.get("gpu"):
        return "not installed; it needs an NVIDIA GPU and none was found here (ONNX Runtime runs these artifacts)"
    driver = cuda.get("driver_cuda")
    try:
        major = int(str(driver).split(".")[0])
    except ValueError:
        major = 12
    if major >= 13:
        return "not installed: `pip install 'tensorrt-cu13>=10,<12' 'cuda-python>=13,<14'`"
    return "not installed: `pip install 'tensorrt-cu12>=8.6,<12' 'cuda-python>=12,<13'`"


def _one_install_command(why: str) -> str:
    """The backend choice's reason without the general TensorRT install text (it names commands for
    several machines); the TensorRT line gives the one for this machine."""
    from edgeexit.runtime.backends.tensorrt import INSTALL_HINT

    return why.replace(INSTALL_HINT, "TensorRT is not installed (see the TensorRT line)")


# Camera indices doctor tries, and the time it may spend on them all: a camera opens in well under a
# second, and an index with nothing behind it fails at once.
CAMERA_INDICES = 10
CAMERA_PROBE_S = 5.0


def camera_info(indices: int = CAMERA_INDICES, budget_s: float = CAMERA_PROBE_S) -> dict:
    """The cameras OpenCV can open here (index, frame size), trying indices 0..indices-1 for at most
    ``budget_s`` in all. On Linux only the indices with a /dev/videoN node are tried (none: no camera,
    and OpenCV is not asked at all)."""
    import time

    cv2, err = _try(importlib.import_module, "cv2")
    if cv2 is None:
        return {"probed": [], "found": [], "error": err}
    candidates = list(range(indices))
    if sys.platform.startswith("linux"):
        candidates = [i for i in candidates if Path(f"/dev/video{i}").exists()]
    found, probed, t0 = [], [], time.perf_counter()
    level = _quiet_opencv(cv2)
    try:
        for i in candidates:
            if time.perf_counter() - t0 > budget_s:
                break
            probed.append(i)
            cap = cv2.VideoCapture(i)
            try:
                ok, frame = cap.read() if cap.isOpened() else (False, None)
            except Exception:
                ok, frame = False, None
            finally:
                cap.release()
            if ok and frame is not None:
                found.append({"index": i, "width": int(frame.shape[1]), "height": int(frame.shape[0])})
    finally:
        _quiet_opencv(cv2, level)
    return {"probed": probed, "found": found, "seconds": round(time.perf_counter() - t0, 3)}


def _quiet_opencv(cv2, level=None):
    """Silence OpenCV's per-index warnings while probing (returns the level to restore)."""
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:
        return None
    try:
        if level is not None:
            logging.setLogLevel(level)
            return level
        old = logging.getLogLevel()
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)
        return old
    except Exception:
        return None


def _camera_line(cams: dict | None) -> str:
    if not cams:
        return "Cameras       not probed"
    if cams.get("error"):
        return "Cameras       unknown: OpenCV is absent (`pip install 'edgeexit[camera]'`)"
    if not cams["found"]:
        where = f"tried {', '.join(map(str, cams['probed']))}" if cams["probed"] else "no /dev/video device"
        return f"Cameras       no camera found ({where}): `run --source N` needs one"
    return (
        "Cameras       "
        + ", ".join(f"{c['index']} ({c['width']}×{c['height']})" for c in cams["found"])
        + " (use `run --source INDEX`)"
    )


# -- artifact -----------------------------------------------------------------------------------
def artifact_report(artifact, trt: dict, cuda: dict) -> dict:
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.backends import choose_backend

    art = Artifact.load(artifact)  # ArtifactError (exit 2) for a broken one
    name, why = choose_backend(art, "auto")
    out: dict = {"path": str(artifact), "auto_backend": name, "auto_why": why, "problems": []}
    engines = [e.info for e in art.engines]
    if engines:
        found = {(e.get("device_name"), e.get("compute_capability"), e.get("trt_version")) for e in engines}
        built = sorted(found, key=lambda t: tuple("" if v is None else str(v) for v in t))  # a field may be absent
        out["engines"] = [{"device_name": d, "compute_capability": c, "trt_version": v} for d, c, v in built]
        here_cc, here_trt = cuda.get("compute_capability"), trt.get("version")
        mismatch = []
        for d, c, v in built:
            if here_cc is None:
                mismatch.append(f"built for {d} (sm {c}) but this machine has no usable GPU")
            elif c != here_cc:
                mismatch.append(f"built for {d} (sm {c}) but this GPU is {cuda.get('gpu')} (sm {here_cc})")
            if here_trt is None:
                mismatch.append(f"built with TensorRT {v} but TensorRT is not importable here")
            elif v != here_trt:
                mismatch.append(f"built with TensorRT {v} but this is TensorRT {here_trt}")
        out["engines_match"] = not mismatch
        if mismatch:
            out["problems"].append(
                "its TensorRT engines do not fit this device: "
                + "; ".join(dict.fromkeys(mismatch))
                + f": rebuild them here with `edgeexit engines {artifact} --force` "
                "(or run its ONNX units with --backend onnxruntime)"
            )
        elif name != "tensorrt":
            out["problems"].append(f"its engines match this device but `auto` will not use them: {why}")
    else:
        out["engines"], out["engines_match"] = [], None
    out.update(_load_and_run(artifact, name, art))
    if out.get("load_error"):
        out["problems"].append(f"the {name} backend cannot run it: {out['load_error']}")
    out["ok"] = not out["problems"]
    return out


def _load_and_run(artifact, backend: str, art) -> dict:
    """Load with the backend auto picks and classify one blank frame; compare the calibration's
    device fingerprint with this device."""
    import warnings

    import numpy as np

    from edgeexit.runtime import Cascade

    calib = art.calibration
    out: dict = {"calibrated": calib is not None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cascade = Cascade.load(artifact, backend=backend)
    except Exception as e:
        out["load_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return out
    try:
        h, w = art.preprocessing.input_size
        cascade.predict(np.zeros((h, w, 3), dtype=np.uint8))
        out["backend_info"] = {k: v for k, v in cascade.backend_info.items() if k != "why"}
        if calib is not None:
            changes = list(cascade.fingerprint_changes)
            out["calibrated_here"] = not changes
            out["calibration_device"] = dict(calib.device) if calib.device is not None else None
            out["calibration_changes"] = changes
    except Exception as e:
        out["load_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        cascade.close()
    return out


def diagnose(artifact=None) -> dict:
    py = python_info()
    jetson = jetson_info()
    trt = tensorrt_info(py, jetson)
    cuda = cuda_info()
    if trt["version"] is None and not jetson["jetson"] and not trt.get("jetson_venv"):
        trt["why"] = tensorrt_install_why(cuda)
    report = {
        "python": py,
        "numpy": numpy_info(),
        "onnxruntime": onnxruntime_info(),
        "tensorrt": trt,
        "cuda": cuda,
        "jetson": jetson,
        "opencv": opencv_info(),
        "cameras": camera_info(),
        "cpu_threads": os.cpu_count(),
        "torch_imported": sys.modules.get("torch") is not None,
    }
    if artifact is not None:
        art = artifact_report(artifact, trt, cuda)
        report["artifact"] = art
        report["auto_backend"] = art["auto_backend"]
        report["ok"] = art["ok"]
        report["reason"] = "; ".join(art["problems"]) if art["problems"] else None
    else:
        from edgeexit.runtime.backends import choose_backend

        # with no artifact: what auto would pick for an artifact that has engines
        name, why = choose_backend(None, "auto")
        report["auto_backend"] = name
        report["auto_why"] = why
        ort_ok = report["onnxruntime"]["version"] is not None
        report["ok"] = ort_ok
        report["reason"] = None if ort_ok else f"ONNX Runtime is not importable: {report['onnxruntime']['error']}"
    report["torch_imported"] = sys.modules.get("torch") is not None
    return report


def doctor_text(report: dict) -> list[str]:
    """The report as plain lines (no markup: library messages may contain brackets)."""

    def yn(ok) -> str:
        return "yes" if ok else ("no" if ok is not None else "-")

    py, ort, trt, cuda, jet, cv = (report[k] for k in ("python", "onnxruntime", "tensorrt", "cuda", "jetson", "opencv"))
    lines = [
        f"Python        {py['version']} ({py['executable']}{', venv' if py['venv'] else ''})",
        f"numpy         {report['numpy'].get('version') or report['numpy'].get('error')}",
        f"ONNX Runtime  {ort['version'] or 'absent: ' + str(ort.get('error'))}"
        + (f"; providers {', '.join(ort['providers'])}" if ort["providers"] else ""),
    ]
    if trt["version"]:
        lines.append(
            f"TensorRT      {trt['version']}, usable {yn(trt['usable'])}"
            + (f": {trt['why']}" if trt.get("why") else "")
        )
    else:
        lines.append(f"TensorRT      absent: {trt.get('import_error')}")
        if trt.get("why"):
            lines.append(f"              {trt['why']}")
    cp = cuda.get("cuda_python") or "absent"
    drv = cuda.get("driver_version") or cuda.get("driver_cuda") or "-"
    lines.append(
        f"cuda-python   {cp}; driver {drv} (CUDA {cuda.get('driver_cuda') or '-'}), match {yn(cuda.get('match'))}"
        + (f": {cuda['why']}" if cuda.get("why") else "")
        + (f" ({cuda['error']})" if cuda.get("error") else "")
    )
    gpu = cuda.get("gpu")
    lines.append(f"GPU           {gpu + ', sm ' + str(cuda.get('compute_capability')) if gpu else 'none found'}")
    lines.append(
        "Jetson        "
        + (
            f"{jet['model']}, {jet.get('l4t') or 'L4T ?'}, power mode {jet.get('power_mode') or '?'}"
            if jet["jetson"]
            else "no"
        )
    )
    if cv["version"]:
        vb = ", ".join(f"{k} {yn(v)}" for k, v in cv["video_backends"].items())
        lines.append(f"OpenCV        {cv['version']}; video: {vb}")
    else:
        lines.append(
            f"OpenCV        absent ({cv.get('error')}): video and camera sources need `pip install 'edgeexit[camera]'`"
        )
    lines.append(_camera_line(report.get("cameras")))
    why = report.get("auto_why") or report["artifact"]["auto_why"]
    lines.append(f"auto backend  {report['auto_backend']} ({_one_install_command(why)})")
    art = report.get("artifact")
    if art:
        lines += _artifact_lines(art, yn)
    verdict = "ok: it can run here" if report["ok"] else f"not ok: {report['reason']}"
    lines.append(verdict if art else ("ok" if report["ok"] else f"not ok: {report['reason']}"))
    return lines


def _artifact_lines(art: dict, yn) -> list[str]:
    lines: list[str] = []
    lines.append(f"artifact      {art['path']}")
    if art["engines"]:
        built = "; ".join(
            f"{e['device_name']} sm {e['compute_capability']} TensorRT {e['trt_version']}" for e in art["engines"]
        )
        lines.append(f"  engines     {built}: match this device {yn(art['engines_match'])}")
    else:
        lines.append("  engines     none (ONNX units only)")
    if art["calibrated"]:
        here = art.get("calibrated_here")
        lines.append(
            f"  calibrated  here {yn(here)}"
            + ("" if here or here is None else ": " + "; ".join(art.get("calibration_changes", [])))
        )
    else:
        lines.append("  calibrated  no: run `edgeexit calibrate` on this device")
    return lines
