"""docs/cli.md's generated part: every command's ``--help``, rendered at 110 columns without colour.

    python -m edgeexit.clidocs          # rewrite docs/cli.md (the hand-written part below END is kept)
    python -m edgeexit.clidocs --check  # exit 1 when docs/cli.md is not what the code says

tests/test_cli.py runs the check, so a changed option fails the suite until the docs follow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
COMMANDS = ("train", "eval", "export", "engines", "calibrate", "run", "doctor", "bench", "info", "quickstart")
END = "<!-- end of the generated help: the sections below are written by hand -->"
HEADER = """# edgeexit command line

Generated from `edgeexit COMMAND --help` by `python -m edgeexit.clidocs` (the test suite checks it).
Exit codes: 0 success, 1 failure while working, 2 bad usage or bad input (one-line reason, no traceback;
set `EDGEEXIT_DEBUG=1` to see the traceback of an unexpected failure).

JSON outputs (`--json FILE`): `eval` → split/exits/budgeted, `bench` → backend/device/units/
full_cascade_ms/early_exit_ms, `calibrate` → budget_ms/metric/thresholds/evaluated_exits/predicted/
measured/baseline_msdnet, `run` → frames/exit_histogram/latency_ms.
"""


def _help(args: list[str]) -> str:
    from typer.testing import CliRunner

    from edgeexit.cli import app

    env = {"COLUMNS": "110", "TERM": "dumb", "NO_COLOR": "1", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
    result = CliRunner().invoke(app, [*args, "--help"], env=env, prog_name="edgeexit")
    if result.exit_code != 0:
        raise RuntimeError(f"edgeexit {' '.join(args)} --help failed: {result.output[-500:]}")
    return "\n".join(line.rstrip() for line in result.output.splitlines()).strip("\n")


def render() -> str:
    """The generated part of docs/cli.md, END included."""
    parts = [HEADER, "```", _help([]), "```", ""]
    for name in COMMANDS:
        parts += [f"## edgeexit {name}", "", "```", _help([name]), "```", ""]
    return "\n".join(parts) + END


def updated(text: str) -> str:
    """``text`` (docs/cli.md) with its generated part replaced."""
    tail = text.split(END, 1)[1] if END in text else "\n"
    return render() + tail


def main(argv: list[str]) -> int:
    current = DOC.read_text() if DOC.is_file() else ""
    new = updated(current)
    if "--check" in argv:
        if new != current:
            print(f"{DOC} is out of date: run `python -m edgeexit.clidocs`", file=sys.stderr)
            return 1
        return 0
    tmp = DOC.with_name(f".{DOC.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    os.replace(tmp, DOC)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
