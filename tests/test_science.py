"""benchmarks/science.py: the grid's order and shards, resume, label noise, and the report's statistics."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def science():
    spec = importlib.util.spec_from_file_location("science", ROOT / "benchmarks" / "science.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["science"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


# --- statistics -------------------------------------------------------------------------------------------


def test_t_quantile_matches_closed_forms(science):
    # df=1: tan(pi (p - 1/2)); df=2: t = sqrt(2 q^2 / (1 - q^2)) with q = 2p - 1 (F(t) = 1/2 + t / (2 sqrt(2 + t^2)))
    assert science.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert science.t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), rel=1e-9)
    assert science.t_quantile(0.975, 10) == pytest.approx(2.228138851986274, rel=1e-9)  # published table value
    assert science.t_quantile(0.975, 1000) == pytest.approx(1.962339, rel=1e-5)


def test_mean_interval_by_hand(science):
    mean, half, n = science.mean_interval([0.90, 0.92, 0.97])
    sd = math.sqrt(((0.90 - 0.93) ** 2 + (0.92 - 0.93) ** 2 + (0.97 - 0.93) ** 2) / 2)
    assert (mean, n) == (pytest.approx(0.93), 3)
    t2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # 4.3027
    assert half == pytest.approx(t2 * sd / math.sqrt(3), rel=1e-8)
    assert science.mean_interval([0.5])[1] is None  # one seed: no interval, never a made-up one
    assert science.verdict(0.01, 0.005) == "win"
    assert science.verdict(-0.01, 0.005) == "loss"
    assert science.verdict(0.004, 0.005) == "tie"
    assert science.verdict(0.01, None) == "n/a"


def _fake_run(out: Path, regime: str, method: str, seed: int, exits: list[float], cascade: dict) -> None:
    path = out / regime / method / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"images": 5000, "epochs": 2, "noise": 0.0}
    payload = {
        "format": "edgeexit-science-run",
        "regime": regime,
        "method": method,
        "seed": seed,
        "config": config,
        "exit_accuracy": exits,
        "cascade": {"accuracy": cascade, "cost_model_sha256": "abc"},
        "seconds": {"train": 1.0},
    }
    path.write_text(json.dumps(payload))


def test_report_paired_differences_by_hand(science, tmp_path):
    out = tmp_path / "science"
    final = {"ce": [0.90, 0.91, 0.89], "sd": [0.92, 0.90, 0.91], "mlcsd": [0.93, 0.94, 0.92]}
    c50 = {"ce": [0.80, 0.82, 0.81], "sd": [0.85, 0.86, 0.84], "mlcsd": [0.83, 0.84, 0.82]}
    for method in final:
        for seed in range(3):
            _fake_run(
                out, "low", method, seed, [0.5, final[method][seed]], {"40": None, "50": c50[method][seed], "70": 0.9}
            )
    js, md = tmp_path / "science.json", tmp_path / "table.md"
    assert science.main(["report", "--out", str(out), "--json", str(js), "--md", str(md)]) == 0
    doc = json.loads(js.read_text())
    assert len(doc["runs"]) == 9 and {r["method"] for r in doc["runs"]} == {"ce", "sd", "mlcsd"}
    paired = doc["summary"]["low"]["paired"]
    t2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))

    def by_hand(a, b):
        d = np.subtract(a, b)
        return d.mean(), t2 * d.std(ddof=1) / math.sqrt(3)

    # MLCSD - CE final exit: diffs 0.03, 0.03, 0.03 -> zero spread, a win
    m, h = by_hand(final["mlcsd"], final["ce"])
    got = paired["mlcsd - ce"]["final exit"]
    assert (got["mean"], got["half"], got["verdict"]) == (pytest.approx(m), pytest.approx(h, abs=1e-12), "win")
    # MLCSD - SD final exit: diffs 0.01, 0.04, 0.01 -> mean 0.02, interval crosses 0: a tie
    m, h = by_hand(final["mlcsd"], final["sd"])
    got = paired["mlcsd - sd"]["final exit"]
    assert (got["mean"], got["half"]) == (pytest.approx(m), pytest.approx(h))
    assert got["verdict"] == "tie" and m - h < 0 < m + h
    # MLCSD - SD cascade at 50 %: diffs -0.02, -0.02, -0.02 -> a loss
    assert paired["mlcsd - sd"]["cascade 50%"]["verdict"] == "loss"
    assert paired["mlcsd - sd"]["cascade 40%"]["n"] == 0  # infeasible everywhere: no numbers invented
    mean, half, n = science.mean_interval(c50["sd"])
    cell = doc["summary"]["low"]["methods"]["sd"]["cascade 50%"]
    assert (cell["mean"], cell["half_width_95"], cell["n"]) == (pytest.approx(mean), pytest.approx(half), 3)
    text = md.read_text()
    assert f"{100 * mean:.2f} ± {100 * half:.2f}" in text
    assert "**win**" in text and "**tie**" in text and "**loss**" in text


def test_report_without_runs_is_one_line(science, tmp_path, capsys):
    assert science.main(["report", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no finished runs") and err.count("\n") == 1


# --- the grid ---------------------------------------------------------------------------------------------


def test_grid_is_seed_major_and_shards_partition_it(science):
    regimes = science.REGIME_SETS["session"]
    cells = science.grid(regimes, None, [0, 1, 2])
    per_seed = sum(len(r.methods) for r in regimes.values())
    assert [c.seed for c in cells] == [0] * per_seed + [1] * per_seed + [2] * per_seed
    issue = science.grid(science.REGIME_SETS["issue"], None, [0])  # the paper's alpha = 5: the issue's set
    assert "mlcsd-a5" in {c.method for c in issue if c.regime == "full-short"}
    a, b = science.shard(cells, "1/2"), science.shard(cells, "2/2")
    assert not set(a) & set(b) and set(a) | set(b) == set(cells)
    assert abs(len(a) - len(b)) <= 1
    assert [c.seed for c in a] == sorted(c.seed for c in a)  # each shard is seed-major too
    for bad in ("0/2", "3/2", "x", "1-2"):
        with pytest.raises(science.ScienceError):
            science.shard(cells, bad)


def test_every_preset_of_the_issue_is_there(science):
    issue = science.REGIME_SETS["issue"]
    assert (issue["full-short"].images, issue["full-short"].epochs) == (None, 5)
    assert (issue["low-data"].images, issue["low-data"].epochs) == (5000, 30)
    assert issue["label-noise"].noise == 0.2 and issue["long"].epochs >= 20
    assert all(r.width == 0.25 and r.exits == 8 for s in ("issue", "session") for r in science.REGIME_SETS[s].values())
    assert set(science.METHODS) >= {"ce", "sd", "byot", "mlcsd", "mlcsd-frozen", "mlcsd-a5"}
    cfg = science.run_config("x", issue["low-data"], "mlcsd-a5", 0, 1)
    assert (cfg["train_method"], cfg["alpha"]) == ("mlcsd", 5.0)
    assert science.run_config("x", issue["low-data"], "mlcsd", 0, 1)["alpha"] == 0.5  # the fast recipe's
    assert science.run_config("x", issue["low-data"], "mlcsd-frozen", 0, 1)["teacher_weights"] == "frozen"


def test_override(science):
    before = science.REGIME_SETS["session"]["low-data"]
    regimes = science.apply_override(science.REGIME_SETS["session"], "low-data:epochs=10,images=all")
    assert (regimes["low-data"].epochs, regimes["low-data"].images) == (10, None)
    assert (
        regimes["low-data"].noise == before.noise
        and regimes["full-short"] == science.REGIME_SETS["session"]["full-short"]
    )
    assert science.REGIME_SETS["session"]["low-data"] == before  # the table itself is not edited
    for bad in ("nope:epochs=1", "low-data", "low-data:speed=3", "low-data:epochs=ten", "low-data:noise=1.5"):
        with pytest.raises(science.ScienceError):
            science.apply_override(science.REGIME_SETS["session"], bad)


# --- label noise ------------------------------------------------------------------------------------------


def test_symmetric_noise_rate_and_determinism(science):
    labels = np.random.default_rng(7).integers(0, 10, 20000)
    noisy = science.symmetric_noise(labels, 0.2, seed=3, num_classes=10)
    flipped = noisy != labels
    assert abs(flipped.mean() - 0.2) < 0.01  # every flip is to another class: the realised rate is the rate
    assert noisy.min() >= 0 and noisy.max() <= 9
    counts = np.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()  # uniform over the other classes
    assert np.array_equal(noisy, science.symmetric_noise(labels, 0.2, seed=3, num_classes=10))
    assert not np.array_equal(noisy, science.symmetric_noise(labels, 0.2, seed=4, num_classes=10))


def test_label_noise_touches_training_labels_only(science):
    from edgeexit.train import trainer
    from edgeexit.train.trainer import TrainConfig

    cfg = TrainConfig.from_recipe("fashion-mnist", "ce", out="unused", train_images=2000, val_size=500)
    original = trainer.prepare_data
    clean_train, clean_val, _ = original(cfg)
    record: dict = {}
    with science.noisy_training_labels(0.2, 5, record):
        noisy_train, noisy_val, _ = trainer.prepare_data(cfg)
    assert trainer.prepare_data is original  # restored
    realised = float((noisy_train.labels != clean_train.labels).float().mean())
    assert record["realised"] == pytest.approx(realised) and 0.15 < realised < 0.25
    assert record["images"] == 2000
    assert bool((noisy_val.labels == clean_val.labels).all())  # held-out (model selection, calibration): clean
    again, _, _ = original(cfg)  # the loaded dataset itself was not edited in place
    assert bool((again.labels == clean_train.labels).all())


# --- end to end: a tiny regime, two shards, then a rerun that skips everything ---------------------------


@pytest.mark.slow
def test_shards_then_resume_skip_finished(science, tmp_path, capsys):
    out = tmp_path / "science"
    base = ["run", "--out", str(out), "--regime-set", "smoke", "--regimes", "smoke", "--seeds", "0", "1"]
    base += ["--repeats", "20"]
    cells = science.grid({"smoke": science.REGIME_SETS["smoke"]["smoke"]}, None, [0, 1])
    first = science.shard(cells, "1/2")
    assert science.main([*base, "--shard", "1/2"]) == 0
    done = {p.relative_to(out).as_posix() for p in out.glob("*/*/seed*.json")}
    assert done == {f"{c.key}.json" for c in first}
    assert science.main([*base, "--shard", "2/2"]) == 0
    paths = sorted(out.glob("*/*/seed*.json"))
    assert len(paths) == 4
    run = json.loads(paths[0].read_text())
    assert len(run["exit_accuracy"]) == 8 and all(0 <= a <= 1 for a in run["exit_accuracy"])
    assert set(run["cascade"]["accuracy"]) == {"40", "50", "70"}
    assert run["cascade"]["final_exit_test_accuracy"] == pytest.approx(run["exit_accuracy"][-1], abs=0.01)
    assert min(run["cascade"]["onnx_torch_prediction_agreement"]) >= 0.99
    assert set(run["seconds"]) >= {"train", "eval", "export", "calibrate", "total"}
    assert run["config"]["images"] == 256 and run["config"]["epochs"] == 1
    cm = json.loads((out / "costmodel.json").read_text())
    assert all(json.loads(p.read_text())["cascade"]["cost_model_sha256"] == run["cascade"]["cost_model_sha256"]
               for p in paths)  # fmt: skip
    assert min(cm["torch_vs_onnx"]["prediction_agreement"]) >= 0.99
    mtimes = [p.stat().st_mtime_ns for p in paths]
    capsys.readouterr()
    assert science.main(base) == 0  # a rerun: everything finished, nothing trained again
    assert capsys.readouterr().out.count("done, skipped") == 4
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # a finished run recorded with another config is refused, not silently reused
    assert science.main([*base, "--override", "smoke:epochs=2"]) == 2
    assert "was run with epochs=1" in capsys.readouterr().err


def test_report_sets_every_method_against_ce_with_speedup_and_training_cost(science, tmp_path):
    """A partial grid (l2w has 2 seeds of CE's 3): each method − CE paired by the seeds both have, the
    --max-drop speed-up as a ratio, and training seconds with the throughput against CE per seed."""
    out = tmp_path / "science"
    c50 = {"ce": [0.80, 0.82, 0.81], "l2w": [0.81, 0.83], "ce-ge": [0.79, 0.80, 0.80]}
    speed = {"ce": [1.10, 1.20, 1.15], "l2w": [1.30, 1.40], "ce-ge": [1.10, 1.20, 1.15]}
    train_s = {"ce": [10.0, 12.0, 11.0], "l2w": [15.0, 18.0], "ce-ge": [10.0, 12.0, 11.0]}
    for method, values in c50.items():
        for seed, v in enumerate(values):
            _fake_run(out, "five", method, seed, [0.5, 0.9], {"40": None, "50": v, "70": 0.9})
            path = out / "five" / method / f"seed{seed}.json"
            run = json.loads(path.read_text())
            run["cascade"]["max_drop"] = {"max_drop": 0.005, "speedup": speed[method][seed]}
            run["seconds"] = {"train": train_s[method][seed], "training_resumed": False}
            path.write_text(json.dumps(run))
    js, md = tmp_path / "s.json", tmp_path / "s.md"
    assert science.main(["report", "--out", str(out), "--json", str(js), "--md", str(md)]) == 0
    doc = json.loads(js.read_text())["summary"]["five"]
    assert set(doc["paired"]) == {"l2w - ce", "ce-ge - ce"}
    row = doc["paired"]["l2w - ce"]
    assert row["cascade 50%"]["n"] == 2 and row["cascade 50%"]["mean"] == pytest.approx(0.01)
    assert row["speed-up @0.5pt"]["mean"] == pytest.approx(0.2) and row["speed-up @0.5pt"]["verdict"] == "win"
    cost = doc["training"]["l2w"]
    assert cost["throughput_vs_ce"] == pytest.approx(math.sqrt(10 / 15 * 12 / 18)) and cost["paired_with_ce"] == 2
    assert cost["images_per_s"] == pytest.approx(np.mean([5000 * 2 / 15, 5000 * 2 / 18]))
    text = md.read_text()
    assert "1.15 ± " in text and " ×" in text  # the speed-up is a ratio, not a percentage
    assert "| l2w | 2 | 16 ± " in text and "0.67× (n=2)" in text


def test_cascade_set_has_six_methods_ten_seed_regimes_and_records_the_new_options(science):
    cascade = science.REGIME_SETS["cascade"]
    assert max(r.epochs for r in cascade.values()) >= 5 and len(cascade) >= 2
    assert all(set(r.methods) == {"ce", "ce-ge", "l2w", "l2w-ge", "ce-2stage", "mlcsd-frozen-gate"} for r in
               cascade.values())  # fmt: skip
    five = cascade["five-epochs"]
    cfg = science.run_config("five-epochs", five, "ce-2stage", 0, 1)
    assert cfg["two_stage"] == pytest.approx(0.2 * five.epochs) and "gradient_equilibrium" not in cfg
    cfg = science.run_config("five-epochs", five, "l2w-ge", 0, 1)
    assert cfg["train_method"] == "l2w" and cfg["gradient_equilibrium"] is True and cfg["target_budget"] == 0.5
    cfg = science.run_config("five-epochs", five, "mlcsd-frozen-gate", 0, 1)
    assert (cfg["teacher_weights"], cfg["distill_gate"]) == ("frozen", 0.8)
    # a run of the earlier grid, which had none of the new options, still matches its config
    old = science.run_config("low-data", science.REGIME_SETS["session"]["low-data"], "ce", 0, 1)
    assert not {"gradient_equilibrium", "two_stage", "distill_gate", "target_budget", "selection_images"} & set(old)
