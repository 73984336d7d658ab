"""The drift monitor (runtime/monitor.py): the e-detector's guarantee and power on seeded simulations,
the reference `calibrate` stores, and the wiring through Cascade, Streams and `edgeexit run`."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgeexit.cli import app
from edgeexit.runtime.monitor import (
    BET_GAPS,
    LEVEL_EVERY,
    DriftMonitor,
    DriftOptions,
    DriftUnavailableError,
    clopper_pearson,
    frame_levels,
    input_level,
    parse_reference,
    reference_statistics,
)


def _reference(p_low: float, p_high: float, exits: int = 1, classes: int | None = None) -> dict:
    """A reference whose exits have median 0.5 and the given rate bounds (the monitor's inputs)."""
    ref = {
        "version": 1,
        "frames": 10_000,
        "delta": 1e-3,
        "exits": [{"q": 0.5, "below": 5000, "low": p_low, "high": p_high} for _ in range(exits)],
        "thresholds": [0.9] * (exits - 1) + [0.0],
    }
    if classes:
        ref["classes"] = {"counts": [100] * classes, "high": [1.0 / classes + 0.01] * classes}
    return parse_reference(ref, exits)


def _run_length(monitor: DriftMonitor, conf: np.ndarray, labels=None) -> int | None:
    """Frames until the first alarm (None: no alarm)."""
    labels = [None] * len(conf) if labels is None else labels
    for t, (c, y) in enumerate(zip(conf.tolist(), labels, strict=True), 1):
        if monitor.observe(0, c, y):
            return t
    return None


def test_clopper_pearson_matches_closed_forms():
    # k = 0: the upper bound solves (1 - p)^n = delta; k = n: the lower bound solves p^n = delta
    lo, hi = clopper_pearson(0, 100, 1e-3)
    assert lo == 0.0 and hi == pytest.approx(1 - 1e-3 ** (1 / 100), abs=1e-9)
    lo, hi = clopper_pearson(100, 100, 1e-3)
    assert hi == 1.0 and lo == pytest.approx(1e-3 ** (1 / 100), abs=1e-9)
    lo, hi = clopper_pearson(2500, 5000, 1e-3)  # about 3.1 standard errors either side of 0.5
    assert 0.5 - 0.025 < lo < 0.5 - 0.02 and 0.5 + 0.02 < hi < 0.5 + 0.025


def test_false_alarms_on_in_distribution_frames_stay_within_the_guarantee():
    """At the calibration rate (0.5, inside its bounds), 2·10^5 seeded frames with the monitor restarted
    after each alarm: at most one false alarm per 1/alpha frames (here far fewer: the bounds' slack
    makes every bet lose on average)."""
    rng = np.random.default_rng(0)
    lo, hi = clopper_pearson(2500, 5000, 1e-3)
    alpha, frames, alarms = 1e-3, 200_000, 0
    conf = rng.random(frames)
    m = DriftMonitor(_reference(lo, hi), DriftOptions(alpha=alpha, labels=False))
    for c in conf.tolist():
        if m.observe(0, c):
            alarms += 1
            m = DriftMonitor(_reference(lo, hi), DriftOptions(alpha=alpha, labels=False))
    assert alarms <= alpha * frames / 10  # 20 allowed by 1/alpha; the seed gives 3


def test_average_run_length_at_the_bound_is_at_least_one_over_alpha():
    """The worst case the guarantee allows: the true rate sits exactly on the upper bound (each bet
    is then a fair game). Run lengths, capped at 20/alpha, still average at least 1/alpha."""
    rng = np.random.default_rng(1)
    alpha, cap = 0.02, 1000
    lengths = []
    for _ in range(60):
        m = DriftMonitor(_reference(0.0, 0.5), DriftOptions(alpha=alpha, labels=False))
        t = _run_length(m, rng.random(cap))
        lengths.append(cap if t is None else t)
    assert np.mean(lengths) >= 1 / alpha


@pytest.mark.parametrize("rate, channel", [(0.72, "confidence down"), (0.28, "confidence up")])
def test_a_shift_either_way_alarms_within_a_bounded_delay(rate, channel):
    """The below-median rate moved 22 points up (less confident) or down (more confident): alarmed
    within 400 frames at alpha = 1e-4 on every seed, by the half facing the shift."""
    lo, hi = clopper_pearson(2500, 5000, 1e-3)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        conf = np.where(rng.random(2000) < rate, 0.25, 0.75)  # below q = 0.5 with probability `rate`
        m = DriftMonitor(_reference(lo, hi), DriftOptions(alpha=1e-4, labels=False))
        t = _run_length(m, conf)
        assert t is not None and t <= 400, t
        assert m.channel == channel and m.first_alarm_frame == t


def test_label_shift_alarms_on_the_label_channel_only():
    """Confidence as at calibration but only two classes of ten answered: the label channel alarms;
    with the labels switched off the same frames raise nothing."""
    rng = np.random.default_rng(2)
    conf = rng.random(3000)
    labels = rng.integers(0, 2, 3000).tolist()
    lo, hi = clopper_pearson(2500, 5000, 1e-3)
    m = DriftMonitor(_reference(lo, hi, classes=10), DriftOptions(alpha=1e-4))
    t = _run_length(m, conf, labels)
    assert t is not None and t < 200 and m.channel == "labels"
    off = DriftMonitor(_reference(lo, hi, classes=10), DriftOptions(alpha=1e-4, labels=False))
    assert _run_length(off, conf, labels) is None
    # all ten classes at their calibration shares: no alarm
    m = DriftMonitor(_reference(lo, hi, classes=10), DriftOptions(alpha=1e-4))
    assert _run_length(m, conf, rng.integers(0, 10, 3000).tolist()) is None


def test_sampling_every_kth_frame():
    m = DriftMonitor(_reference(0.45, 0.55), DriftOptions(every=4, labels=False))
    for _ in range(10):
        m.observe(0, 0.1)
    s = m.state()
    assert s["frames"] == 10 and s["sampled_frames"] == 3 and s["every"] == 4  # frames 1, 5 and 9
    live = DriftMonitor(_reference(0.45, 0.55), DriftOptions(), live=True)
    assert live.every == 10


def test_options_and_reference_errors():
    with pytest.raises(ValueError, match="alpha must be a number in"):
        DriftOptions(alpha=0)
    with pytest.raises(ValueError, match="alpha must be a number in"):
        DriftOptions(alpha=True)
    with pytest.raises(ValueError, match="whole number >= 1"):
        DriftOptions(every=0)
    with pytest.raises(ValueError, match="must list 2 exits"):
        parse_reference({"version": 1, "exits": [{"q": 0.5, "low": 0.4, "high": 0.6}]}, 2)
    with pytest.raises(ValueError, match="low <= high"):
        parse_reference({"version": 1, "exits": [{"q": 0.5, "low": 0.7, "high": 0.6}]}, 1)


def test_reference_statistics_from_exit_confidences():
    rng = np.random.default_rng(3)
    conf = rng.random((1000, 3))
    answered = rng.integers(0, 4, 1000)
    ref = reference_statistics(conf, answered, 4, [0.8, 2.0, 0.0])
    for k, e in enumerate(ref["exits"]):
        assert e["q"] == pytest.approx(np.median(conf[:, k]))
        assert e["below"] == int((conf[:, k] < e["q"]).sum())
        assert e["low"] < e["below"] / 1000 < e["high"]
    assert sum(ref["classes"]["counts"]) == 1000
    for c, h in zip(ref["classes"]["counts"], ref["classes"]["high"], strict=True):
        assert c / 1000 < h < 1
    assert parse_reference(json.loads(json.dumps(ref)), 3)["frames"] == 1000


def _plain_e_detector(ref: dict, alpha: float, every: int, stream) -> list[tuple[float, bool]]:
    """The e-detector written as plainly as the mathematics reads, for comparison with the monitor's
    fast update: every bet's CUSUM M = max(1, M) · E in a list; the label channel's moving histogram
    h kept whole (h <- (1 - eta) h + eta e_y after each frame); the input level read on every
    LEVEL_EVERY-th sampled frame. Returns (statistic, alarm) after each sampled frame."""
    eta, mix = 1 / 64, 0.5

    def bets(lo: float, hi: float) -> list[tuple[float, float, bool]]:
        out = []
        for bound, upper in ((hi, True), (lo, False)):
            p = min(max(bound, 1e-6), 1 - 1e-6)
            cap = 0.9 / p if upper else 0.9 / (1 - p)
            out += [(min(g / (p * (1 - p)), cap), bound, upper) for g in BET_GAPS]
        return out

    def step(m: list[float], grid, x: float) -> list[float]:
        return [max(1.0, a) * (1 + lam * ((x - b) if up else (b - x))) for a, (lam, b, up) in zip(m, grid, strict=True)]

    k = len(BET_GAPS)
    conf_grid = [bets(e["low"], e["high"]) for e in ref["exits"]]
    level = ref.get("level")
    level_grid = bets(level["low"], level["high"]) if level else None
    counts = np.asarray(ref["classes"]["counts"], float)
    pi, high = counts / counts.sum(), np.asarray(ref["classes"]["high"])
    h = pi.copy()
    w = 1 / ((4 if level else 2) + 1)
    mc, mlev, mlab = [1.0] * 2 * k, [1.0] * 2 * k, 1.0
    out, alarm, sampled = [], False, 0
    for t, (pos, c, y, lev) in enumerate(stream):
        if t % every:
            continue
        sampled += 1
        mc = step(mc, conf_grid[pos], float(c < ref["exits"][pos]["q"]))
        if level and sampled % LEVEL_EVERY == 0:
            mlev = step(mlev, level_grid, float(lev < level["q"]))
        mlab = max(1.0, mlab) * ((1 - mix) * pi[y] + mix * h[y]) / high[y]
        h = (1 - eta) * h
        h[y] += eta
        s = w / k * (sum(mc) + (sum(mlev) if level else 0.0)) + w * mlab
        alarm = s >= 1 / alpha
        out.append((s, alarm))
        if alarm:  # the first alarm is what is compared
            break
    return out


@pytest.mark.parametrize("with_level, every", [(True, 1), (False, 1), (True, 3)])
def test_fast_update_gives_the_plain_e_processes_values(with_level, every):
    """The monitor's written-out update against `_plain_e_detector` on a seeded random stream that
    drifts half way (less confident, darker, two classes): the same statistic after every sampled
    frame (to rounding) and the alarm on the same frame."""
    rng = np.random.default_rng(7)
    lo, hi = clopper_pearson(2500, 5000, 1e-3)
    ref = _reference(lo, hi, exits=2, classes=10)
    if with_level:
        ref = parse_reference({**ref, "level": {"q": 0.3, "below": 2500, "low": lo, "high": hi, "stride": 1}}, 2)
    n = 4000
    late = np.arange(n) >= n // 2
    conf = np.where(late, rng.random(n) * 0.8, rng.random(n))
    level = np.where(late, rng.normal(0.1, 0.2, n), rng.normal(0.3, 0.2, n))
    labels = np.where(late, rng.integers(0, 2, n), rng.integers(0, 10, n))
    pos = rng.integers(0, 2, n)
    stream = list(zip(pos.tolist(), conf.tolist(), labels.tolist(), level.tolist(), strict=True))
    plain = _plain_e_detector(ref, 1e-4, every, stream)
    m = DriftMonitor(ref, DriftOptions(alpha=1e-4, every=every))
    got = []
    for t, (p, c, y, lev) in enumerate(stream):
        alarm = m.observe(p, c, y, level=lev)
        if t % every == 0:
            got.append((m.statistic, alarm))
        if alarm:
            break
    assert len(got) > 10 and got[-1][1] and not got[-2][1]  # the stream alarms, after the change
    assert m.first_alarm_sample == len(got) and (len(got) - 1) * every < n and m.first_alarm_sample > n // 2 // every
    assert [a for _, a in got] == [a for _, a in plain[: len(got)]]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in plain[: len(got)]], rtol=1e-9)


def test_input_level_channel_alarms_on_darker_frames_and_older_references_still_monitor():
    """Confidence and classes as at calibration, the input darker: the level channel alarms (it reads
    every LEVEL_EVERY-th sampled frame); a reference without the level block (calibrated before it)
    monitors with the channels it has and does not alarm on the same frames."""
    rng = np.random.default_rng(5)
    lo, hi = clopper_pearson(2500, 5000, 1e-3)
    base = _reference(lo, hi, classes=10)
    with_level = parse_reference({**base, "level": {"q": 0.0, "below": 2500, "low": lo, "high": hi, "stride": 1}}, 1)
    n = 3000
    conf, labels = rng.random(n).tolist(), rng.integers(0, 10, n).tolist()
    frames = rng.normal(-0.3, 0.1, (n, 1, 4, 4)).astype(np.float32)  # below the median brightness 0
    m = DriftMonitor(with_level, DriftOptions(alpha=1e-4))
    t = next((i for i in range(n) if m.observe(0, conf[i], labels[i], x=frames[i][None])), None)
    assert t is not None and t < 100 * LEVEL_EVERY and m.channel == "input darker"
    assert m.state()["input_level_watched"] is True
    old = DriftMonitor(base, DriftOptions(alpha=1e-4))
    assert not any(old.observe(0, conf[i], labels[i], x=frames[i][None]) for i in range(n))
    assert old.state()["input_level_watched"] is False and old.state()["sampled_frames"] == n
    # no input and no level given: that frame's level is not read (e-value 1), the rest goes on
    quiet = DriftMonitor(with_level, DriftOptions(alpha=1e-4))
    assert not any(quiet.observe(0, conf[i], labels[i]) for i in range(n))


def test_input_level_and_its_reference():
    rng = np.random.default_rng(4)
    x = rng.random((50, 3, 40, 40)).astype(np.float32)
    levels, stride = frame_levels(x)
    assert stride == 3 * 40 * 40 // 1024 == 4
    assert levels[7] == pytest.approx(float(x[7].reshape(-1)[::4].mean()), rel=1e-5)
    assert input_level(x[7][None], stride) == levels[7]  # one frame or a batch's row: the same value
    small = rng.random((5, 1, 28, 28)).astype(np.float32)
    assert frame_levels(small)[1] == 1 and input_level(small[0], 1) == pytest.approx(float(small[0].mean()), rel=1e-5)
    ref = reference_statistics(rng.random((50, 2)), None, 3, [0.9, 0.0], levels=(levels, stride))
    lev = ref["level"]
    assert lev["q"] == pytest.approx(np.median(levels)) and lev["below"] == int((levels < lev["q"]).sum())
    assert lev["stride"] == 4 and lev["low"] < lev["below"] / 50 < lev["high"]
    assert parse_reference(json.loads(json.dumps(ref)), 2)["level"]["stride"] == 4
    for bad, match in (({**lev, "stride": 0}, "stride must be"), ({**lev, "low": 0.9, "high": 0.1}, "low <= high")):
        with pytest.raises(ValueError, match=match):
            parse_reference({**ref, "level": bad}, 2)


def test_a_long_alarm_keeps_finite_numbers():
    """After the alarm the statistic keeps moving but is scaled down above its cap: finite forever."""
    m = DriftMonitor(_reference(0.45, 0.55, classes=3), DriftOptions(alpha=1e-4))
    for _ in range(20_000):
        m.observe(0, 0.1, 0)
    s = m.state()
    assert s["alarm"] and s["first_alarm_frame"] < 100 and math.isfinite(s["statistic"]) and s["statistic"] >= 1e4


# --- wiring, on a real tiny artifact --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_artifact, tmp_path_factory):
    from edgeexit.calibrate.run import run_calibration

    dest = tmp_path_factory.mktemp("drift") / "model.edgeexit"
    shutil.copytree(tiny_artifact, dest)
    run_calibration(
        dest,
        budget_fraction=1.5,
        backend="onnxruntime",
        repeats=30,
        verify_images=100,
        iso_accuracy=False,
        ladder_steps=2,
    )
    return dest


@pytest.mark.slow
def test_calibrate_stores_the_reference_from_its_exit_statistics(calibrated):
    from edgeexit.runtime.artifact import Artifact
    from edgeexit.runtime.plan import CascadePlan

    art = Artifact.load(calibrated)
    ref = art.calibration.drift_reference
    assert ref is not None and len(ref["exits"]) == art.num_exits
    (stats,) = list(calibrated.glob("calibration_stats.*.npz"))
    with np.load(stats) as z:
        conf, pred = z["confidence"], z["prediction"]
    assert ref["frames"] == len(conf)
    for k, e in enumerate(ref["exits"]):
        assert e["q"] == pytest.approx(float(np.quantile(conf[:, k], 0.5)))
        assert e["below"] == int((conf[:, k] < e["q"]).sum())
        assert 0 <= e["low"] <= e["below"] / len(conf) <= e["high"] <= 1
    plan = CascadePlan.from_thresholds(art.calibration.thresholds, art.num_exits)
    answered = pred[np.arange(len(conf)), plan.exit_positions(conf)]
    assert list(ref["classes"]["counts"]) == np.bincount(answered, minlength=len(art.class_names)).tolist()
    assert list(ref["thresholds"]) == plan.to_list()
    # the input brightness of the same frames, preprocessed as the runtime does
    from edgeexit.runtime import Cascade
    from edgeexit.runtime.manifest import load_calibration_frames

    stored = load_calibration_frames(art)
    cal_idx = stored["calibration"]  # the fixture keeps the first 100 verification frames (verify_images)
    idx = np.concatenate([cal_idx, stored["verification"][: len(conf) - len(cal_idx)]])
    with Cascade.load(calibrated, backend="onnxruntime") as c:
        levels, stride = frame_levels(c.preprocessor.batch(stored["frames"][idx]))
    lev = ref["level"]
    assert lev["stride"] == stride and lev["q"] == pytest.approx(float(np.quantile(levels, 0.5)))
    assert lev["below"] == int((levels < lev["q"]).sum()) and lev["low"] <= lev["below"] / len(conf) <= lev["high"]


def test_uncalibrated_artifact_says_the_monitor_is_unavailable(tiny_artifact):
    from edgeexit.runtime import Cascade

    with pytest.raises(DriftUnavailableError, match="run `edgeexit calibrate` again"):
        Cascade.load(tiny_artifact, backend="onnxruntime", drift=True)


@pytest.mark.slow
def test_cascade_feeds_its_monitor_the_first_evaluated_exit(calibrated, test_frames):
    from edgeexit.runtime import Cascade

    frames = test_frames[0][:60]
    with Cascade.load(calibrated, backend="onnxruntime") as plain:
        assert "_run" not in vars(plain)  # no monitor: the class's hot path, untouched
        assert plain.drift is None and plain.predict(frames[0]).first_confidence is None
        stats = plain.exit_statistics(plain.preprocessor.batch(frames))
    with Cascade.load(calibrated, backend="onnxruntime", drift=DriftOptions(alpha=1e-3)) as cascade:
        first = cascade.plan.groups[0][1]
        preds = [cascade.predict(f) for f in frames]
        got = np.array([p.first_confidence for p in preds])
        np.testing.assert_allclose(got, stats["confidence"][:, first], atol=1e-5)
        state = cascade.drift.state()
        assert state["sampled_frames"] == 60 and state["alpha"] == 1e-3 and state["alarm"] is False
        # a batch keeps the same confidences and feeds the same monitor
        batch = cascade.predict_batch(frames)
        np.testing.assert_allclose([p.first_confidence for p in batch], got, atol=1e-5)
        assert cascade.drift.state()["sampled_frames"] == 120
        # a view with the same plan (run's input order) watches with the same monitor; one with
        # other thresholds (verification) does not
        cascade.derive(input_order="BGR").predict(frames[0])
        assert cascade.drift.state()["sampled_frames"] == 121
        assert cascade.derive(thresholds=cascade.plan).drift is None


def _write_pngs(folder, images, scale: float = 1.0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        out = np.clip(img[..., 0].astype(np.float32) * scale, 0, 255).astype(np.uint8)
        Image.fromarray(out).save(folder / f"{i:04d}.png")
    return folder


@pytest.mark.slow
def test_streams_give_each_camera_its_own_monitor(calibrated, test_frames, tmp_path):
    from edgeexit.runtime import Cascade, Streams

    images = test_frames[0][:400]
    normal = _write_pngs(tmp_path / "normal", images)
    dark = _write_pngs(tmp_path / "dark", images, 0.1)
    events = []
    with Cascade.load(calibrated, backend="onnxruntime") as cascade:
        opts = DriftOptions(alpha=1e-3)
        with Streams(cascade, [str(normal), str(dark)], drift=opts, on_event=lambda *e: events.append(e)) as s:
            for _ in s:
                pass
        summary = s.summary()
    normal_drift, dark_drift = (st["drift"] for st in summary["streams"])
    assert normal_drift["alarm"] is False and normal_drift["sampled_frames"] == 400
    assert dark_drift["alarm"] is True and dark_drift["first_alarm_frame"] <= 400
    assert dark_drift["sampled_frames"] == 400  # still watched after the alarm
    drift_events = [e for e in events if e[1] == "drift"]
    assert len(drift_events) == 1 and drift_events[0][0] == str(dark)


@pytest.mark.slow
def test_run_warns_on_a_darkened_folder(calibrated, test_frames, tmp_path):
    dark = _write_pngs(tmp_path / "dark", test_frames[0][:400], 0.1)
    out = tmp_path / "run.json"
    res = CliRunner().invoke(
        app, ["run", str(calibrated), "--source", str(dark), "--quiet", "--drift-alpha", "0.001", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "drift warning" in text and "--max-drop certificate" in text and "re-calibrate" in text
    d = json.loads(out.read_text())["drift"]
    assert d["alarm"] is True and d["alpha"] == 0.001 and 1 <= d["first_alarm_frame"] <= d["sampled_frames"] == 400
    assert d["statistic"] >= 1 / d["alpha"] and math.isfinite(d["statistic"])
    # the same folder undarkened: no warning; --no-drift: no block
    normal = _write_pngs(tmp_path / "normal", test_frames[0][:400])
    res = CliRunner().invoke(app, ["run", str(calibrated), "--source", str(normal), "--quiet", "--json", str(out)])
    assert res.exit_code == 0 and "drift warning" not in res.output
    assert json.loads(out.read_text())["drift"]["alarm"] is False
    res = CliRunner().invoke(app, ["run", str(calibrated), "--source", str(normal), "--quiet", "--no-drift"])
    assert res.exit_code == 0 and "drift" not in res.output


def test_run_refuses_a_bad_alpha_and_says_when_the_monitor_is_unavailable(tiny_artifact, test_frames, tmp_path):
    folder = _write_pngs(tmp_path / "few", test_frames[0][:5])
    res = CliRunner().invoke(app, ["run", str(tiny_artifact), "--source", str(folder), "--drift-alpha", "2"])
    assert res.exit_code == 2 and "--drift-alpha must be a number in (0, 1)" in " ".join(res.output.split())
    # an artifact calibrated before the monitor (here: never calibrated) runs, and says why it is not watched
    res = CliRunner().invoke(app, ["run", str(tiny_artifact), "--source", str(folder), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "drift monitor unavailable" in " ".join(res.output.split())


@pytest.mark.slow  # a calibration, then run on a video file
def test_run_samples_a_video_file_every_tenth_frame(calibrated, test_frames, tmp_path):
    """Neighbouring frames of a video are nearly one image: `run` on a video file read in order gives
    the monitor every LIVE_EVERY-th frame unless --drift-every says otherwise."""
    import cv2

    from edgeexit.runtime.monitor import LIVE_EVERY

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25, (28, 28))
    for img in test_frames[0][:45]:  # 28 x 28 x 1 gray
        writer.write(cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2BGR))
    writer.release()
    out = tmp_path / "run.json"
    for extra, sampled in (([], 45 // LIVE_EVERY + (45 % LIVE_EVERY > 0)), (["--drift-every", "1"], 45)):
        res = CliRunner().invoke(app, ["run", str(calibrated), "--source", str(clip), "--quiet", "--json", str(out),
                                       *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        summary = json.loads(out.read_text())
        assert summary["frames"] == 45 and summary["drift"]["sampled_frames"] == sampled
