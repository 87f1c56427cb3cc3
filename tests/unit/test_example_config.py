"""The shipped config.example.toml documents every key and is what scpd accepts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from scpd import config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.toml"

# Keys whose values are local paths; the test points them at throwaway files.
_LOCAL_PATH_LINE = re.compile(
    r'^(?P<key>state_dir|identity_file|password_file|passphrase_file|known_hosts|path'
    r'|archive_dir)'
    r'\s*=\s*"(?P<value>[^"]*)"', re.MULTILINE)
_KEY_LINE = re.compile(r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_-]*)\s*=", re.MULTILINE)


def localized_example(root: Path) -> str:
    """The example's text with its local paths moved under root, the files they name made."""
    made: dict[str, Path] = {}

    def replace(match: re.Match[str]) -> str:
        key, value = match["key"], match["value"]
        if value not in made:
            local = root / value.lstrip("/").replace("/", "_")
            if key == "path":
                local.mkdir()
            elif key in ("identity_file", "password_file", "passphrase_file", "known_hosts"):
                local.write_text("secret\n" if key != "known_hosts" else "")
                local.chmod(0o600)
            made[value] = local
        return f'{key} = "{made[value]}"'

    return _LOCAL_PATH_LINE.sub(replace, EXAMPLE.read_text(encoding="utf-8"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "SCPD_CONFIG", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


def test_example_config_is_valid_toml() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))

    assert raw["targets"] and raw["watch"]


@pytest.mark.usefixtures("clean_env")
def test_example_config_loads_and_uses_every_key_scpd_knows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Record every table the reader walks: the keys it allows and the keys the example sets.
    known: dict[str, set[str]] = {}
    used: dict[str, set[str]] = {}
    original_table = config._Reader.table

    def recording_table(self: Any, raw: Any, key_path: str, allowed: set[str]) -> Any:
        if not key_path.startswith("targets") or key_path.count(".") == 1:
            kind = re.sub(r"^(targets|watch)[.\[].*", r"\1.*", key_path) or "(top)"
            known.setdefault(kind, set()).update(allowed)
            used.setdefault(kind, set()).update(raw if isinstance(raw, dict) else ())
        return original_table(self, raw, key_path, allowed)

    monkeypatch.setattr(config._Reader, "table", recording_table)
    path = tmp_path / "config.toml"
    path.write_text(localized_example(tmp_path), encoding="utf-8")

    loaded = config.load(path)

    assert set(known) == {"(top)", "daemon", "targets.*", "watch.*"}
    for kind, keys in known.items():
        missing = keys - used[kind]
        assert not missing, f"config.example.toml does not show {kind} keys {sorted(missing)}"
    assert loaded.watches and loaded.targets


def test_example_config_explains_every_key_with_a_comment() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    explained: set[str] = set()
    for number, line in enumerate(lines):
        if match := _KEY_LINE.match(line):
            above = lines[number - 1].lstrip() if number else ""
            if "#" in line or above.startswith("#"):
                explained.add(match["key"])
    every_key = {m["key"] for m in _KEY_LINE.finditer("\n".join(lines))}

    assert every_key - explained == set()


def test_example_config_states_the_defaults_of_the_design() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")

    for default in ("Default: 22.", 'Default: "scp".', 'Default: "strict".', 'Default: "2s".',
                    'Default: "keep".', "Default: 2.", 'Default: "1s".', 'Default: "5m".'):
        assert default in text


@pytest.mark.usefixtures("clean_env")
def test_check_offline_on_the_unedited_example_names_each_missing_file_by_key() -> None:
    # On a machine without /etc/scpd and /var/reports the example cannot load; what an
    # operator sees then is one scpd: line per problem, each with its key path.
    env = {k: v for k, v in os.environ.items()
           if k not in ("CREDENTIALS_DIRECTORY", "SCPD_CONFIG", "JOURNAL_STREAM")}
    if Path("/etc/scpd/id_ed25519").exists():
        pytest.skip("this machine has a real /etc/scpd/id_ed25519")

    result = subprocess.run(
        [sys.executable, "-m", "scpd", "check", "--offline", "-c", str(EXAMPLE)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 78, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines
    key_path = re.compile(r"^scpd: (targets\.[\w-]+|watch\.[\w-]+|daemon)\.\w+: ")
    for line in lines:
        assert key_path.match(line), line
    assert any(line.startswith("scpd: targets.offsite.identity_file: ") for line in lines)
