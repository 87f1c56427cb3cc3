"""The shipped systemd units load cleanly and stay hardened, checked offline by systemd-analyze.

systemd-analyze verify exits 0 on an unknown key or an unparsable value (it only warns), so
any output on stderr counts as a failure. It also fails for an ExecStart binary that does not
exist, so each unit is checked as a copy whose ExecStart points at an executable that does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
INSTALLED_SCPD = "/usr/local/bin/scpd"
MAX_EXPOSURE = 1.5  # systemd-analyze's 0-10 scale; both units measure 1.2 (README)

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)

# (file shipped in systemd/, name the copy is checked under, config it must read)
UNITS = [
    ("scpd.service", "scpd.service", "/etc/scpd/config.toml"),
    ("scpd@.service", "scpd@.service", "/etc/scpd/%i.toml"),
    ("scpd@.service", "scpd@backup.service", "/etc/scpd/%i.toml"),
]


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _scpd_executable(tmp_path: Path) -> Path:
    """The scpd entry point of this environment, or a stand-in when it is not installed."""
    installed = Path(sys.executable).with_name("scpd")
    if installed.is_file():
        return installed
    stub = tmp_path / "bin" / "scpd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def _checkable_copy(tmp_path: Path, shipped: str, checked_as: str) -> Path:
    text = (UNITS_DIR / shipped).read_text()
    exec_start = f"ExecStart={INSTALLED_SCPD} "
    assert text.count(exec_start) == 1, f"{shipped} should start {INSTALLED_SCPD} exactly once"
    copy = tmp_path / "units" / checked_as
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(text.replace(exec_start, f"ExecStart={_scpd_executable(tmp_path)} "))
    return copy


@pytest.mark.parametrize(("shipped", "checked_as", "config"), UNITS)
def test_unit_runs_scpd_as_a_notify_service_with_its_config(
        shipped: str, checked_as: str, config: str) -> None:
    settings = _service_settings(UNITS_DIR / shipped)

    assert settings["ExecStart"] == [f"{INSTALLED_SCPD} run -c {config}"]
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["TimeoutStopSec"] == ["10s"]
    assert settings["WatchdogSec"] == ["30s"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["StateDirectoryMode"] == ["0700"]
    expected_state = "scpd/%i" if "@" in shipped else "scpd"
    assert settings["StateDirectory"] == [expected_state]


@pytest.mark.parametrize(("shipped", "checked_as", "config"), UNITS)
def test_unit_passes_systemd_analyze_verify_without_any_warning(
        tmp_path: Path, shipped: str, checked_as: str, config: str) -> None:
    unit = _checkable_copy(tmp_path, shipped, checked_as)

    result = _analyze("verify", "--man=no", str(unit))

    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@pytest.mark.parametrize(("shipped", "checked_as", "config"), UNITS)
def test_unit_exposure_level_is_at_most_1_5(
        tmp_path: Path, shipped: str, checked_as: str, config: str) -> None:
    unit = _checkable_copy(tmp_path, shipped, checked_as)

    # --threshold is the exposure times ten: the command fails above 1.5.
    result = _analyze("security", "--offline=true", "--threshold=15", str(unit))

    assert result.returncode == 0, result.stdout + result.stderr
    exposure = _overall_exposure(result.stdout)
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_verify_check_catches_a_misspelled_key(tmp_path: Path) -> None:
    # The reason stderr must be empty above: a typo is a warning with exit status 0.
    unit = _checkable_copy(tmp_path, "scpd.service", "scpd.service")
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))

    result = _analyze("verify", "--man=no", str(unit))

    assert result.returncode == 0
    assert "Unknown key 'ProtectSytem'" in result.stderr


def _overall_exposure(report: str) -> float:
    # e.g. "→ Overall exposure level for scpd.service: 1.2 OK 🙂"
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) ", report)
    assert match, f"no overall exposure line in:\n{report}"
    return float(match.group(1))


def _service_settings(unit: Path) -> dict[str, list[str]]:
    """Key -> values of the [Service] section, in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings
