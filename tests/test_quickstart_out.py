"""`quickstart --out` owns a folder only when it wrote it: checked before any training."""

from __future__ import annotations

from typer.testing import CliRunner

from edgeexit.cli import app


def _quickstart(out, *extra):
    return CliRunner().invoke(app, ["quickstart", "--out", str(out), "--epochs", "1", *extra])


def test_a_users_own_files_are_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "eval.json").write_text('{"mine": true}')
    for extra in ((), ("--force",)):
        res = _quickstart(out, *extra)
        assert res.exit_code == 2, res.output
        assert "eval.json, which the quickstart did not write" in " ".join(res.output.split())
    assert (out / "eval.json").read_text() == '{"mine": true}'
    assert not (out / "model.pt").exists()


def test_a_link_to_nothing_is_refused_before_training(tmp_path):
    out = tmp_path / "dangling"
    out.symlink_to(tmp_path / "nowhere")
    res = _quickstart(out)
    assert res.exit_code == 2 and "is a link to nothing" in " ".join(res.output.split())
    assert not (tmp_path / "nowhere").exists()


def test_the_quickstarts_own_folder_is_replaced_with_force_only(tmp_path, monkeypatch):
    from edgeexit import quickstart

    out = tmp_path / "run"
    quickstart._claim(out)
    (out / "model.pt").write_bytes(b"an earlier run")
    res = _quickstart(out)
    assert res.exit_code == 2 and "already holds a run (model.pt)" in " ".join(res.output.split())
    # with --force the checks pass and the work starts (stopped at its first step here)
    monkeypatch.setattr(quickstart, "_train", lambda *a, **k: (_ for _ in ()).throw(SystemExit(7)))
    res = _quickstart(out, "--force")
    assert res.exit_code == 7, res.output
