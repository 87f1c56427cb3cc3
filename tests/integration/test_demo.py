"""`make demo` is the first thing a new user runs: it must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_shows_every_file_landing_and_cleans_up():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py")],
                            capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("landed: ") == 5, result.stdout
    assert "MISMATCH" not in result.stdout
    assert "scpd exited 0" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    workdir = next(line.split("(")[1].split(")")[0] for line in result.stdout.splitlines()
                   if "The config (" in line)
    assert not Path(workdir).exists(), "the demo must remove its temporary directory"
