"""Config loading: durations, rates, defaults, and every problem reported with its key path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from scpd import config
from scpd.config import DEFAULT_EXCLUDES, Config, RetryPolicy, parse_duration, parse_rate
from scpd.errors import ConfigError, ConfigErrors

# -- helpers -------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(raw: dict[str, Any], prefix: str = "") -> str:
    """Just enough of a TOML writer for these tests: scalars, lists, tables, [[arrays]]."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in raw.items()
             if not isinstance(value, dict) and not _is_table_array(value)]
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            lines += ["", f"[{name}]", to_toml(value, name)]
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{name}]]", to_toml(item, name)]
    return "\n".join(lines)


class ConfigFiles:
    """A valid config with its throwaway files; tests change `raw` and call write()/load()."""

    def __init__(self, root: Path):
        self.root = root
        self.identity = root / "id_ed25519"
        # config.py checks only that the key exists and is private, not what it holds.
        self.identity.write_text("not a real key\n")
        self.identity.chmod(0o600)
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE\n")
        self.watched = root / "reports"
        self.watched.mkdir()
        self.state_dir = root / "state"
        self.raw: dict[str, Any] = {
            "daemon": {"state_dir": str(self.state_dir)},
            "targets": {
                "offsite": {
                    "host": "backup.example.com",
                    "user": "reports",
                    "identity_file": str(self.identity),
                    "known_hosts": str(self.known_hosts),
                    "remote_dir": "/srv/incoming/{hostname}",
                },
            },
            "watch": [{"name": "reports", "path": str(self.watched), "targets": ["offsite"]}],
        }
        self.path = root / "config.toml"

    @property
    def target(self) -> dict[str, Any]:
        return self.raw["targets"]["offsite"]

    @property
    def watch(self) -> dict[str, Any]:
        return self.raw["watch"][0]

    def use_password_file(self, mode: int) -> Path:
        """The target logs in with a password file of this mode instead of the key."""
        password = self.root / "password"
        password.write_text("hunter2\n")
        password.chmod(mode)
        del self.target["identity_file"]
        self.target["password_file"] = str(password)
        return password

    def write(self) -> Path:
        self.path.write_text(to_toml(self.raw) + "\n", encoding="utf-8")
        return self.path

    def load(self) -> Config:
        return config.load(self.write())

    def errors(self) -> list[ConfigError]:
        """The problems load() reports; fails the test if it loads."""
        with pytest.raises(ConfigErrors) as info:
            self.load()
        return info.value.errors

    def error(self, key_path: str) -> ConfigError:
        """The one problem reported, which must be about key_path."""
        errors = self.errors()
        assert [e.key_path for e in errors] == [key_path], [str(e) for e in errors]
        assert str(errors[0]).startswith(f"{key_path}: ")
        return errors[0]


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConfigFiles:
    for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return ConfigFiles(tmp_path)


# -- parse_duration and parse_rate ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0),
    ("1.5s", 1.5), ("2m30s", 150.0), ("0s", 0.0),
])
def test_parse_duration_reads_the_units_of_the_design(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "5x", "", "m5", "5m30", "-1s", "1.5", "ten s", "5 m"])
def test_parse_duration_rejects_bad_text_and_names_it(text: str) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(text)
    assert f'got "{text}"' in str(info.value)


@pytest.mark.parametrize(("text", "rate"), [
    ("500KB/s", 500_000), ("10MiB/s", 10_485_760), ("80Mbit/s", 10_000_000),
    ("1GB/s", 1_000_000_000), ("64KiB/s", 65_536), ("100B/s", 100), ("1.5MB/s", 1_500_000),
])
def test_parse_rate_reads_bytes_and_bits_with_decimal_and_binary_prefixes(
        text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["10MB", "fast", "", "0KB/s", "-5KB/s", "10XB/s", "MB/s",
                                  "10 MB per second"])
def test_parse_rate_rejects_bad_text_and_names_it(text: str) -> None:
    with pytest.raises(ValueError, match="rate") as info:
        parse_rate(text)
    assert f'got "{text}"' in str(info.value)


# -- a valid file ------------------------------------------------------------------------------


def test_config_loads_a_full_valid_file_into_dataclasses(cfg: ConfigFiles) -> None:
    archive = cfg.root / "archive"
    cfg.raw["daemon"]["bandwidth_limit"] = "50MiB/s"
    cfg.target.update({
        "port": 2222, "host_key_policy": "accept-new", "protocol": "sftp",
        "bandwidth_limit": "10MiB/s", "connections": 4, "preserve_times": False,
        "preserve_mode": False, "connect_timeout": "5s", "io_timeout": "1m",
        "retry_initial": "500ms", "retry_max": "10m", "give_up_after": "1d",
        "remote_dir": "/srv/incoming/{hostname}/{watch}",
    })
    cfg.watch.update({
        "recursive": False, "include": ["*.pdf", "*.csv"], "exclude": ["*.bak"],
        "settle": "1h30m", "on_success": "move", "archive_dir": str(archive),
        "follow_symlinks": True, "poll": True, "poll_interval": "30s",
        "rescan_interval": "1h",
    })

    loaded = cfg.load()

    assert loaded.path == cfg.path
    assert loaded.state_dir == cfg.state_dir
    assert loaded.rate_bytes_per_second == 50 * 1024 * 1024
    target = loaded.targets["offsite"]
    assert target == config.Target(
        name="offsite", host="backup.example.com", user="reports",
        known_hosts=cfg.known_hosts, remote_dir="/srv/incoming/{hostname}/{watch}", port=2222,
        identity_file=cfg.identity, password_file=None, host_key_policy="accept-new",
        protocol="sftp", rate_bytes_per_second=10 * 1024 * 1024, connections=4,
        preserve_times=False, preserve_mode=False, connect_timeout_seconds=5.0,
        io_timeout_seconds=60.0,
        retry=RetryPolicy(initial_seconds=0.5, max_seconds=600.0,
                          give_up_after_seconds=86400.0))
    assert loaded.watches == (config.Watch(
        name="reports", path=cfg.watched, targets=("offsite",), recursive=False,
        include=("*.pdf", "*.csv"), exclude=(*DEFAULT_EXCLUDES, "*.bak"),
        settle_seconds=5400.0, on_success="move", archive_dir=archive, follow_symlinks=True,
        poll=True, poll_interval_seconds=30.0, rescan_interval_seconds=3600.0),)
    assert loaded.watch("reports").path == cfg.watched


def test_config_fills_in_the_defaults_of_the_design(cfg: ConfigFiles) -> None:
    del cfg.raw["daemon"]

    loaded = cfg.load()

    assert loaded.state_dir == Path("/var/lib/scpd")
    assert loaded.rate_bytes_per_second is None
    target = loaded.targets["offsite"]
    assert target.port == 22
    assert target.protocol == "scp"
    assert target.host_key_policy == "strict"
    assert target.preserve_times is True
    assert target.preserve_mode is True
    assert target.connections == 2
    assert target.rate_bytes_per_second is None
    assert target.password_file is None
    # DESIGN 4.6: "default 1 s doubling to 5 min"; retryable errors are never given up on.
    assert target.retry == RetryPolicy(initial_seconds=1.0, max_seconds=300.0,
                                       give_up_after_seconds=None)
    watch = loaded.watches[0]
    assert watch.recursive is True
    assert watch.settle_seconds == 2.0
    assert watch.on_success == "keep"
    assert watch.archive_dir is None
    assert watch.include == ()
    assert watch.exclude == (".*", "*.part", "*.tmp", "*.swp", "*~")
    assert watch.follow_symlinks is False
    assert watch.poll is False
    assert watch.poll_interval_seconds == 5.0
    assert watch.rescan_interval_seconds == 600.0


def test_config_state_dir_defaults_to_the_one_systemd_gives(
        cfg: ConfigFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    del cfg.raw["daemon"]
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/scpd-test:/var/lib/other")

    assert cfg.load().state_dir == Path("/var/lib/scpd-test")


def test_config_exclude_adds_to_the_default_excludes(cfg: ConfigFiles) -> None:
    cfg.watch["exclude"] = ["*.bak", "junk"]

    assert cfg.load().watches[0].exclude == (*DEFAULT_EXCLUDES, "*.bak", "junk")


def test_config_default_excludes_false_drops_them(cfg: ConfigFiles) -> None:
    cfg.watch.update({"exclude": ["*.bak"], "default_excludes": False})

    assert cfg.load().watches[0].exclude == ("*.bak",)


def test_config_give_up_after_never_means_retry_forever(cfg: ConfigFiles) -> None:
    cfg.target["give_up_after"] = "never"

    assert cfg.load().targets["offsite"].retry.give_up_after_seconds is None


def test_config_accepts_a_password_file_instead_of_an_identity_file(cfg: ConfigFiles) -> None:
    password = cfg.use_password_file(0o600)

    target = cfg.load().targets["offsite"]

    assert (target.identity_file, target.password_file) == (None, password)


# -- bad files: each problem with its key path ---------------------------------------------------


def test_config_reports_unparseable_toml_with_the_path_of_the_file(cfg: ConfigFiles) -> None:
    cfg.path.write_text('[daemon\nstate_dir = "/x"\n')

    with pytest.raises(ConfigErrors) as info:
        config.load(cfg.path)

    [error] = info.value.errors
    assert error.key_path == str(cfg.path)
    assert str(error).startswith(f"{cfg.path}: not valid TOML")


def test_config_reports_a_missing_config_file_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigErrors) as info:
        config.load(missing)

    assert str(info.value) == f"{missing}: config file not found"


@pytest.mark.parametrize(("where", "key_path"), [
    ("top", "bogus"),
    ("daemon", "daemon.bogus"),
    ("target", "targets.offsite.bogus"),
])
def test_config_rejects_an_unknown_key_with_its_path(
        cfg: ConfigFiles, where: str, key_path: str) -> None:
    table = {"top": cfg.raw, "daemon": cfg.raw["daemon"], "target": cfg.target}[where]
    table["bogus"] = 1

    error = cfg.error(key_path)

    assert "unknown key" in error.problem
    assert "known keys:" in error.problem


def test_config_rejects_an_unknown_key_in_a_watch_and_says_which_watch(cfg: ConfigFiles) -> None:
    cfg.watch["setle"] = "2s"  # a typo of settle

    [error] = cfg.errors()

    # A named watch reports its problems under its name, unknown keys included.
    assert error.key_path == "watch.reports.setle"
    assert "unknown key" in error.problem
    assert "settle" in error.problem  # the known keys are listed, so the typo is obvious


def test_config_rejects_a_port_of_the_wrong_type_with_the_exact_message(cfg: ConfigFiles) -> None:
    cfg.target["port"] = "22x"

    error = cfg.error("targets.offsite.port")

    assert str(error) == 'targets.offsite.port: expected an integer 1-65535, got "22x"'


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_config_rejects_port_out_of_range(cfg: ConfigFiles, port: int) -> None:
    cfg.target["port"] = port

    error = cfg.error("targets.offsite.port")

    assert str(error) == f"targets.offsite.port: expected an integer 1-65535, got {port}"


def test_config_rejects_a_port_of_true_although_python_counts_it_an_int(cfg: ConfigFiles) -> None:
    cfg.target["port"] = True

    assert cfg.error("targets.offsite.port").problem == "expected an integer 1-65535, got true"


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("preserve_times", "yes", 'expected true or false, got "yes"'),
    ("connections", "2", 'expected an integer, got "2"'),
    ("connections", 0, "expected an integer 1-32, got 0"),
    ("host", 42, "expected a string, got 42"),
    ("protocol", "rsync", 'expected one of scp, sftp, got "rsync"'),
    ("host_key_policy", "no", 'expected one of strict, accept-new, got "no"'),
])
def test_config_rejects_a_target_value_of_the_wrong_type_or_choice(
        cfg: ConfigFiles, key: str, value: Any, problem: str) -> None:
    cfg.target[key] = value

    assert cfg.error(f"targets.offsite.{key}").problem == problem


@pytest.mark.parametrize("key", ["host", "user", "known_hosts", "remote_dir"])
def test_config_rejects_a_target_missing_a_required_key(cfg: ConfigFiles, key: str) -> None:
    del cfg.target[key]

    assert "missing" in cfg.error(f"targets.offsite.{key}").problem


def test_config_rejects_a_target_without_identity_file_or_password_file(
        cfg: ConfigFiles) -> None:
    del cfg.target["identity_file"]

    error = cfg.error("targets.offsite.identity_file")

    assert "password_file" in error.problem


def test_config_rejects_a_missing_identity_file(cfg: ConfigFiles) -> None:
    cfg.identity.unlink()

    error = cfg.error("targets.offsite.identity_file")

    assert error.problem == f"file not found: {cfg.identity}"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_rejects_an_identity_file_others_can_read(cfg: ConfigFiles, mode: int) -> None:
    cfg.identity.chmod(mode)

    error = cfg.error("targets.offsite.identity_file")

    assert f"mode {mode:04o}" in error.problem
    assert f"chmod 600 {cfg.identity}" in error.problem


def test_config_rejects_a_password_file_others_can_read(cfg: ConfigFiles) -> None:
    cfg.use_password_file(0o644)

    error = cfg.error("targets.offsite.password_file")

    assert "readable by group and others" in error.problem
    assert "hunter2" not in str(error)  # the secret itself is never shown


def test_config_rejects_a_missing_known_hosts_with_the_strict_policy(cfg: ConfigFiles) -> None:
    cfg.known_hosts.unlink()

    error = cfg.error("targets.offsite.known_hosts")

    assert str(cfg.known_hosts) in error.problem
    assert "ssh-keyscan" in error.problem


def test_config_accepts_a_missing_known_hosts_with_the_accept_new_policy(
        cfg: ConfigFiles) -> None:
    cfg.known_hosts.unlink()
    cfg.target["host_key_policy"] = "accept-new"

    assert cfg.load().targets["offsite"].known_hosts == cfg.known_hosts


@pytest.mark.parametrize("marker", ["@revoked", "@cert-authority"])
def test_config_rejects_known_hosts_with_a_marker_line(cfg: ConfigFiles, marker: str) -> None:
    with cfg.known_hosts.open("a") as f:
        f.write(f"{marker} * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF\n")

    error = cfg.error("targets.offsite.known_hosts")

    assert "line 2" in error.problem
    assert "remove the line" in error.problem


def test_config_rejects_a_watch_naming_an_undefined_target(cfg: ConfigFiles) -> None:
    cfg.watch["targets"] = ["offsite", "nowhere"]

    error = cfg.error("watch.reports.targets")

    assert error.problem == 'unknown target "nowhere" (defined: offsite)'


def test_config_rejects_a_watch_without_targets(cfg: ConfigFiles) -> None:
    cfg.watch["targets"] = []

    assert "at least one" in cfg.error("watch.reports.targets").problem


def test_config_accepts_a_watch_path_that_does_not_exist_yet(cfg: ConfigFiles) -> None:
    # A mount not up yet, or a directory another service creates: scpd waits for it.
    cfg.watched.rmdir()

    assert cfg.load().watch("reports").path == cfg.watched


def test_config_rejects_a_relative_watch_path(cfg: ConfigFiles) -> None:
    cfg.watch["path"] = "reports"

    assert "absolute" in cfg.error("watch.reports.path").problem


def test_config_rejects_a_file_as_watch_path(cfg: ConfigFiles) -> None:
    cfg.watch["path"] = str(cfg.known_hosts)

    assert cfg.error("watch.reports.path").problem == f"not a directory: {cfg.known_hosts}"


def test_config_rejects_duplicate_watch_names(cfg: ConfigFiles) -> None:
    cfg.raw["watch"].append(dict(cfg.watch))

    error = cfg.error("watch.reports.name")

    assert "defined twice" in error.problem


def test_config_rejects_a_file_without_any_watch(cfg: ConfigFiles) -> None:
    del cfg.raw["watch"]

    assert "nothing to do" in cfg.error("watch").problem


def test_config_rejects_on_success_move_without_archive_dir(cfg: ConfigFiles) -> None:
    cfg.watch["on_success"] = "move"

    error = cfg.error("watch.reports.archive_dir")

    assert "move" in error.problem


def test_config_rejects_an_archive_dir_inside_the_watched_path(cfg: ConfigFiles) -> None:
    # Moving a delivered file into the watched tree would deliver it again.
    cfg.watch.update({"on_success": "move", "archive_dir": str(cfg.watched / "done")})

    assert "outside" in cfg.error("watch.reports.archive_dir").problem


def test_config_rejects_an_unknown_on_success(cfg: ConfigFiles) -> None:
    cfg.watch["on_success"] = "archive"

    assert cfg.error("watch.reports.on_success").problem == \
        'expected one of keep, delete, move, got "archive"'


@pytest.mark.parametrize(("where", "key", "value", "key_path"), [
    ("watch", "settle", "2", "watch.reports.settle"),
    ("watch", "settle", "soon", "watch.reports.settle"),
    ("watch", "poll_interval", "0s", "watch.reports.poll_interval"),
    ("watch", "rescan_interval", "often", "watch.reports.rescan_interval"),
    ("target", "connect_timeout", "10", "targets.offsite.connect_timeout"),
    ("target", "io_timeout", "0s", "targets.offsite.io_timeout"),
    ("target", "retry_initial", "1x", "targets.offsite.retry_initial"),
    ("target", "give_up_after", "forever", "targets.offsite.give_up_after"),
    ("target", "bandwidth_limit", "10MB", "targets.offsite.bandwidth_limit"),
    ("daemon", "bandwidth_limit", "fast", "daemon.bandwidth_limit"),
])
def test_config_rejects_a_bad_duration_or_rate_with_its_key_and_text(
        cfg: ConfigFiles, where: str, key: str, value: str, key_path: str) -> None:
    table = {"watch": cfg.watch, "target": cfg.target, "daemon": cfg.raw["daemon"]}[where]
    table[key] = value

    error = cfg.error(key_path)

    assert f'got "{value}"' in error.problem


def test_config_rejects_retry_max_shorter_than_retry_initial(cfg: ConfigFiles) -> None:
    cfg.target.update({"retry_initial": "10m", "retry_max": "1m"})

    assert "retry_initial" in cfg.error("targets.offsite.retry_max").problem


@pytest.mark.parametrize("remote_dir", ["/srv/{host}", "/srv/{0}", "/srv/{hostname"])
def test_config_rejects_an_unknown_remote_dir_placeholder(cfg: ConfigFiles,
                                                          remote_dir: str) -> None:
    cfg.target["remote_dir"] = remote_dir

    error = cfg.error("targets.offsite.remote_dir")

    assert "{hostname}, {watch}" in error.problem


def test_config_rejects_attribute_access_in_a_remote_dir_placeholder(cfg: ConfigFiles) -> None:
    cfg.target["remote_dir"] = "/srv/{hostname.short}"

    assert "{hostname}, {watch}" in cfg.error("targets.offsite.remote_dir").problem


def test_config_rejects_a_newline_in_remote_dir(cfg: ConfigFiles) -> None:
    cfg.target["remote_dir"] = "/srv/in\ncoming"

    assert "newline" in cfg.error("targets.offsite.remote_dir").problem


@pytest.mark.parametrize("spelling", ["$CREDENTIALS_DIRECTORY", "${CREDENTIALS_DIRECTORY}"])
def test_config_expands_credentials_directory_in_secret_paths(
        cfg: ConfigFiles, monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cfg.root))
    cfg.target["identity_file"] = f"{spelling}/id_ed25519"

    assert cfg.load().targets["offsite"].identity_file == cfg.identity


def test_config_reports_credentials_directory_when_it_is_not_set(cfg: ConfigFiles) -> None:
    cfg.target["identity_file"] = "$CREDENTIALS_DIRECTORY/id_ed25519"

    error = cfg.error("targets.offsite.identity_file")

    assert "CREDENTIALS_DIRECTORY" in error.problem
    assert "LoadCredential=" in error.problem


def test_config_reports_every_problem_in_a_file_together(cfg: ConfigFiles) -> None:
    cfg.raw["daemon"]["bogus"] = True
    cfg.target["port"] = "22x"
    cfg.identity.chmod(0o644)
    cfg.watch.update({"targets": ["nowhere"], "settle": "soon", "on_success": "move"})
    cfg.raw["watch"].append({"name": "logs", "path": "relative/logs", "targets": ["offsite"]})

    with pytest.raises(ConfigErrors) as info:
        cfg.load()

    assert sorted(e.key_path for e in info.value.errors) == sorted([
        "daemon.bogus",
        "targets.offsite.port",
        "targets.offsite.identity_file",
        "watch.reports.targets",
        "watch.reports.settle",
        "watch.reports.archive_dir",
        "watch.logs.path",
    ])
    # The exception's own text carries every problem, for callers that print only it.
    for error in info.value.errors:
        assert str(error) in str(info.value)


def test_config_reads_log_level_and_target_with_defaults(cfg: ConfigFiles) -> None:
    assert (cfg.load().log_level, cfg.load().log_target) == ("info", "auto")
    cfg.raw.setdefault("daemon", {}).update(log_level="warning", log_target="stderr")

    loaded = cfg.load()

    assert (loaded.log_level, loaded.log_target) == ("warning", "stderr")


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("log_level", "loud", 'expected one of debug, info, warning, error, got "loud"'),
    ("log_target", "syslog", 'expected one of auto, journal, stderr, got "syslog"'),
])
def test_config_rejects_an_unknown_log_level_or_target(cfg: ConfigFiles, key: str, value: str,
                                                       problem: str) -> None:
    cfg.raw.setdefault("daemon", {})[key] = value

    assert cfg.error(f"daemon.{key}").problem == problem


def test_config_has_metrics_off_by_default(cfg: ConfigFiles) -> None:
    assert cfg.load().metrics_listen is None


@pytest.mark.parametrize(("text", "host", "port", "shown"), [
    ("127.0.0.1:9308", "127.0.0.1", 9308, "127.0.0.1:9308"),
    ("0.0.0.0:1", "0.0.0.0", 1, "0.0.0.0:1"),  # noqa: S104 -- parsed here, never bound
    ("[::1]:9308", "::1", 9308, "[::1]:9308"),
    ("[::]:65535", "::", 65535, "[::]:65535"),
    ("[fe80::1%eth0]:9308", "fe80::1%eth0", 9308, "[fe80::1%eth0]:9308"),
    ("localhost:9308", "localhost", 9308, "localhost:9308"),
    ("metrics-1.example.com:9308", "metrics-1.example.com", 9308,
     "metrics-1.example.com:9308"),
    (" 127.0.0.1:9308 ", "127.0.0.1", 9308, "127.0.0.1:9308"),
])
def test_config_reads_metrics_listen_as_host_and_port(cfg: ConfigFiles, text: str, host: str,
                                                      port: int, shown: str) -> None:
    cfg.raw["daemon"]["metrics_listen"] = text

    listen = cfg.load().metrics_listen

    assert listen == config.ListenAddress(host, port)
    assert str(listen) == shown


@pytest.mark.parametrize(("value", "problem"), [
    ("127.0.0.1", 'expected HOST:PORT like "127.0.0.1:9308" or "[::1]:9308", got "127.0.0.1"'),
    (":9308", 'expected HOST:PORT like "127.0.0.1:9308" or "[::1]:9308", got ":9308"'),
    ("[::1]", 'expected HOST:PORT like "127.0.0.1:9308" or "[::1]:9308", got "[::1]"'),
    ("http://127.0.0.1:9308",
     'expected HOST:PORT like "127.0.0.1:9308" or "[::1]:9308", got "http://127.0.0.1:9308"'),
    ("::1:9308", 'write an IPv6 address in brackets, like "[::1]:9308", got "::1:9308"'),
    ("[127.0.0.1]:9308", '"127.0.0.1" in brackets is not an IPv6 address (brackets are for'
                         ' IPv6 only), in "[127.0.0.1]:9308"'),
    ("127.0.0.256:9308", '"127.0.0.256" is not an IPv4 address, in "127.0.0.256:9308"'),
    ("metrics_host:9308", '"metrics_host" is neither an IP address nor a host name, in'
                          ' "metrics_host:9308" (expected HOST:PORT like "127.0.0.1:9308" or'
                          ' "[::1]:9308")'),
    ("127.0.0.1:0", 'expected a port 1-65535 after the last colon, got "127.0.0.1:0"'),
    ("127.0.0.1:65536", 'expected a port 1-65535 after the last colon, got "127.0.0.1:65536"'),
    ("127.0.0.1:http", 'expected a port 1-65535 after the last colon, got "127.0.0.1:http"'),
    ("127.0.0.1:-1", 'expected a port 1-65535 after the last colon, got "127.0.0.1:-1"'),
    ("127.0.0.1:\uff19", 'expected a port 1-65535 after the last colon, got "127.0.0.1:\uff19"'),
    ("a\nb:9308", '"a\\nb" is neither an IP address nor a host name, in "a\\nb:9308"'
                  ' (expected HOST:PORT like "127.0.0.1:9308" or "[::1]:9308")'),
    (9308, "expected a string, got 9308"),
])
def test_config_rejects_a_bad_metrics_listen_with_its_key(cfg: ConfigFiles, value: Any,
                                                          problem: str) -> None:
    cfg.raw["daemon"]["metrics_listen"] = value

    assert cfg.error("daemon.metrics_listen").problem == problem


# -- found by the fuzzer (test_config_fuzz.py) and the audit: each once more, plainly ----------


@pytest.mark.parametrize(("where", "key", "key_path"), [
    ("daemon", "state_dir", "daemon.state_dir"),
    ("target", "identity_file", "targets.offsite.identity_file"),
    ("target", "password_file", "targets.offsite.password_file"),
    ("target", "passphrase_file", "targets.offsite.passphrase_file"),
    ("target", "known_hosts", "targets.offsite.known_hosts"),
    ("watch", "path", "watch.reports.path"),
    ("watch", "archive_dir", "watch.reports.archive_dir"),
])
def test_config_rejects_a_nul_byte_in_any_path_with_its_key(
        cfg: ConfigFiles, where: str, key: str, key_path: str) -> None:
    # os.stat() raised ValueError("embedded null byte"), which no caller caught: exit 70.
    table = {"daemon": cfg.raw["daemon"], "target": cfg.target, "watch": cfg.watch}[where]
    table[key] = str(cfg.root / "a\0b")
    if key == "archive_dir":
        cfg.watch["on_success"] = "move"

    error = cfg.error(key_path)

    assert "NUL" in error.problem
    assert "\\x00" in error.problem and "\0" not in str(error)


def test_check_offline_exits_78_not_70_for_a_nul_byte_in_a_path(
        cfg: ConfigFiles, capsys: pytest.CaptureFixture[str]) -> None:
    from scpd import cli

    cfg.target["password_file"] = "/etc/scpd/pass\0word"  # noqa: S105 -- a path, no secret

    code = cli.main(["check", "--offline", "-c", str(cfg.write())])

    err = capsys.readouterr().err
    assert code == 78, err
    assert err.startswith("scpd: targets.offsite.password_file: must not contain a NUL byte")
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("key", ["host", "user"])
@pytest.mark.parametrize("value", ["a\0b", "a\nb", "host\r", "\x1b[31mred", "h\x7f", "h\u200bost"])
def test_config_rejects_nul_or_control_characters_in_host_and_user(
        cfg: ConfigFiles, key: str, value: str) -> None:
    cfg.target[key] = value

    error = cfg.error(f"targets.offsite.{key}")

    assert "must not contain NUL or control characters" in error.problem
    assert str(error).isprintable()  # shown escaped, on one line


@pytest.mark.parametrize("remote_dir", [
    "/srv/{watch.__class__}", "/srv/{hostname.__class__.__mro__}", "/srv/{watch[0]}",
    "/srv/{hostname!r}", "/srv/{watch!s}", "/srv/{hostname:>10}", "/srv/{hostname:{watch}}",
    "/srv/{}", "/srv/{ hostname}", "/srv/{hostname!}", "/srv/}",
])
def test_config_rejects_anything_but_plain_placeholders_in_remote_dir(
        cfg: ConfigFiles, remote_dir: str) -> None:
    cfg.target["remote_dir"] = remote_dir

    error = cfg.error("targets.offsite.remote_dir")

    assert "{hostname}, {watch}" in error.problem


def test_config_refuses_a_huge_format_spec_without_formatting_it(cfg: ConfigFiles) -> None:
    import tracemalloc

    # Validation used to run str.format on it, building a string of a gigabyte.
    cfg.target["remote_dir"] = "/srv/{hostname:>999999999}"
    tracemalloc.start()
    try:
        error = cfg.error("targets.offsite.remote_dir")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert "format specs" in error.problem
    assert peak < 10_000_000


def test_config_fills_plain_placeholders_and_keeps_escaped_braces(cfg: ConfigFiles) -> None:
    cfg.target["remote_dir"] = "/srv/{{raw}}/{hostname}/{watch}"

    loaded = cfg.load()

    remote = config.remote_dir_for(loaded.targets["offsite"], loaded.watches[0])
    assert remote.startswith("/srv/{raw}/") and remote.endswith("/reports")


@pytest.mark.parametrize(("where", "key", "value", "bound"), [
    ("watch", "settle", "9" * 400 + "s", "365d"),   # float() made it inf
    ("watch", "rescan_interval", "366d", "365d"),
    ("target", "retry_max", "8761h", "365d"),
    ("target", "give_up_after", "1" + "0" * 30 + "ms", "365d"),
    ("target", "bandwidth_limit", "9" * 400 + "B/s", "1TiB/s"),
    ("daemon", "bandwidth_limit", "1025GiB/s", "1TiB/s"),
    ("target", "bandwidth_limit", "4bit/s", "1B/s"),
])
def test_config_rejects_durations_and_rates_beyond_their_bounds(
        cfg: ConfigFiles, where: str, key: str, value: str, bound: str) -> None:
    table = {"watch": cfg.watch, "target": cfg.target, "daemon": cfg.raw["daemon"]}[where]
    table[key] = value
    key_path = {"watch": "watch.reports", "target": "targets.offsite", "daemon": "daemon"}[where]

    error = cfg.error(f"{key_path}.{key}")

    assert bound in error.problem
    assert len(str(error)) < 250  # a 400-digit value is shown shortened


def test_parse_duration_and_rate_accept_their_bounds_exactly() -> None:
    assert parse_duration("365d") == config.MAX_DURATION_SECONDS == 365 * 86400
    assert parse_rate("1024GiB/s") == config.MAX_RATE_BYTES_PER_SECOND
    assert parse_rate("8bit/s") == config.MIN_RATE_BYTES_PER_SECOND == 1


@pytest.mark.parametrize("text", ["\uff11s", "\u0663m", "1\u0660s"])
def test_parse_duration_rejects_digits_other_than_ascii(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("name", ["a\nb", "x\0", "\x1b[2J"])
def test_config_rejects_control_characters_in_a_watch_name(cfg: ConfigFiles, name: str) -> None:
    # The name is a key path, a log field and {watch} in the remote path.
    cfg.watch["name"] = name

    errors = cfg.errors()

    assert any("watch name must not contain" in e.problem for e in errors)
    assert all(str(e).isprintable() for e in errors)


def _with_quoted_keys(cfg: ConfigFiles, replacements: dict[str, str]) -> list[ConfigError]:
    """The problems of cfg's file with some lines replaced (to_toml writes only bare keys)."""
    text = to_toml(cfg.raw) + "\n"
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    cfg.path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigErrors) as info:
        config.load(cfg.path)
    return info.value.errors


def test_config_rejects_control_characters_in_a_target_name(cfg: ConfigFiles) -> None:
    errors = _with_quoted_keys(cfg, {"[targets.offsite]": '[targets."off\\nsite"]',
                                     'targets = ["offsite"]': 'targets = ["off\\nsite"]'})

    assert [e.key_path for e in errors] == ['targets."off\\nsite"']
    assert "target name must not contain" in errors[0].problem


def test_config_quotes_an_odd_key_in_its_path_as_toml_would(cfg: ConfigFiles) -> None:
    # A key path of "" left the error without any path.
    errors = _with_quoted_keys(cfg, {"[daemon]": '"" = 1\n[daemon]',
                                     'user = "reports"': 'user = "reports"\n"a.b" = 1'})

    assert sorted(e.key_path for e in errors) == ['""', 'targets.offsite."a.b"']


def test_config_refuses_a_fifo_as_secret_or_known_hosts_instead_of_blocking(
        cfg: ConfigFiles) -> None:
    fifo = cfg.root / "fifo"
    os.mkfifo(fifo, 0o600)
    cfg.target.update(identity_file=str(fifo), known_hosts=str(fifo))

    errors = cfg.errors()

    assert sorted(e.key_path for e in errors) == ["targets.offsite.identity_file",
                                                  "targets.offsite.known_hosts"]
    assert all(e.problem == f"{fifo} is not a regular file" for e in errors)


@pytest.mark.parametrize(("where", "key"), [("watch", "path"), ("target", "known_hosts"),
                                           ("target", "identity_file")])
def test_config_reports_a_name_too_long_with_its_key(
        cfg: ConfigFiles, where: str, key: str) -> None:
    # Path.exists() raises OSError(ENAMETOOLONG): it was an uncaught internal error.
    table = cfg.watch if where == "watch" else cfg.target
    table[key] = str(cfg.root / ("x" * 300))

    error = cfg.error(f"{'watch.reports' if where == 'watch' else 'targets.offsite'}.{key}")

    assert "File name too long" in error.problem


# -- credentials -----------------------------------------------------------------------------


def test_config_looks_up_a_relative_secret_in_credentials_directory(
        cfg: ConfigFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd: LoadCredential=id_ed25519:/etc/scpd/id_ed25519, identity_file = "id_ed25519".
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cfg.root))
    cfg.target["identity_file"] = "id_ed25519"

    assert cfg.load().targets["offsite"].identity_file == cfg.identity


@pytest.mark.parametrize("key", ["identity_file", "password_file", "passphrase_file"])
def test_config_rejects_a_relative_secret_without_credentials_directory(
        cfg: ConfigFiles, key: str) -> None:
    cfg.target[key] = "ssh-key"

    error = cfg.error(f"targets.offsite.{key}")

    assert '"ssh-key" is a relative path' in error.problem
    assert "absolute" in error.problem
    assert "$CREDENTIALS_DIRECTORY" in error.problem and "LoadCredential=" in error.problem


def test_config_says_a_tilde_is_not_expanded(cfg: ConfigFiles) -> None:
    cfg.target["identity_file"] = "~/.ssh/id_ed25519"

    assert "~ is not expanded" in cfg.error("targets.offsite.identity_file").problem


def test_config_keeps_a_credential_name_inside_credentials_directory(
        cfg: ConfigFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(cfg.root / "creds"))
    cfg.target["identity_file"] = "../id_ed25519"

    assert "must name a file in $CREDENTIALS_DIRECTORY" in \
        cfg.error("targets.offsite.identity_file").problem


def test_config_reads_passphrase_file_and_use_agent(cfg: ConfigFiles) -> None:
    passphrase = cfg.root / "passphrase"
    passphrase.write_text("correct horse\n")
    passphrase.chmod(0o400)
    cfg.target.update(passphrase_file=str(passphrase), use_agent=True)

    target = cfg.load().targets["offsite"]

    assert (target.identity_file, target.passphrase_file, target.use_agent) == \
        (cfg.identity, passphrase, True)


def test_config_defaults_to_no_passphrase_and_no_agent(cfg: ConfigFiles) -> None:
    target = cfg.load().targets["offsite"]

    assert (target.passphrase_file, target.use_agent) == (None, False)


def test_config_rejects_a_passphrase_file_without_an_identity_file(cfg: ConfigFiles) -> None:
    password = cfg.use_password_file(0o600)
    cfg.target["passphrase_file"] = str(password)

    assert "only used with identity_file" in cfg.error("targets.offsite.passphrase_file").problem


def test_config_rejects_a_passphrase_file_others_can_read(cfg: ConfigFiles) -> None:
    passphrase = cfg.root / "passphrase"
    passphrase.write_text("correct horse\n")
    passphrase.chmod(0o640)
    cfg.target["passphrase_file"] = str(passphrase)

    error = cfg.error("targets.offsite.passphrase_file")

    assert "readable by group" in error.problem
    assert "correct horse" not in str(error)


def test_config_with_use_agent_needs_no_identity_or_password_file(cfg: ConfigFiles) -> None:
    del cfg.target["identity_file"]
    cfg.target["use_agent"] = True

    target = cfg.load().targets["offsite"]

    assert (target.identity_file, target.password_file, target.use_agent) == (None, None, True)


def test_config_rejects_use_agent_that_is_not_a_boolean(cfg: ConfigFiles) -> None:
    cfg.target["use_agent"] = "yes"

    assert cfg.error("targets.offsite.use_agent").problem == 'expected true or false, got "yes"'


@pytest.mark.parametrize(("mode", "access"), [
    (0o640, "readable by group"),
    (0o620, "writable by group"),
    (0o610, "executable by group"),
    (0o660, "readable and writable by group"),
    (0o604, "readable by others"),
    (0o602, "writable by others"),
    (0o644, "readable by group and others"),
    (0o624, "writable by group and readable by others"),
])
def test_config_says_exactly_what_group_or_others_may_do_with_a_secret(
        cfg: ConfigFiles, mode: int, access: str) -> None:
    cfg.identity.chmod(mode)

    error = cfg.error("targets.offsite.identity_file")

    assert error.problem == f"{cfg.identity} is {access} (mode {mode:04o};" \
                            f" run chmod 600 {cfg.identity})"


def test_config_quotes_the_path_in_the_chmod_to_run_for_the_shell(cfg: ConfigFiles) -> None:
    key = cfg.root / "my key $(id)"
    key.write_text("not a real key\n")
    key.chmod(0o644)
    cfg.target["identity_file"] = str(key)

    error = cfg.error("targets.offsite.identity_file")

    assert error.problem.endswith(f"run chmod 600 '{key}')")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the key to another user")
def test_config_rejects_a_secret_others_can_read_whoever_owns_it(cfg: ConfigFiles) -> None:
    # ssh checks only keys its user owns; run as root, that accepted a 0644 key of nobody's.
    cfg.identity.chmod(0o644)
    os.chown(cfg.identity, 65534, 65534)

    assert "readable by group and others" in cfg.error("targets.offsite.identity_file").problem


def _set_access_acl(path: Path, *, user_ids: list[int]) -> None:
    """An access ACL: owner r, the given users r, nothing for group and others (mask r)."""
    import struct

    undefined = 0xFFFFFFFF
    entries = [(0x01, 4, undefined), *((0x02, 4, uid) for uid in user_ids),
               (0x04, 0, undefined), (0x10, 4, undefined), (0x20, 0, undefined)]
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", data)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on {path.parent}: {exc.strerror}")


def test_config_accepts_a_credential_systemd_shares_with_this_user_by_an_acl(
        cfg: ConfigFiles) -> None:
    # On tmpfs, systemd gives User= its credential as a root-owned 0400 file with an ACL
    # entry for that user: the mode then reads 0440, and the file is private all the same.
    cfg.identity.chmod(0o400)
    _set_access_acl(cfg.identity, user_ids=[os.geteuid()])
    assert cfg.identity.stat().st_mode & 0o777 == 0o440

    assert cfg.load().targets["offsite"].identity_file == cfg.identity


def test_config_rejects_a_secret_an_acl_shares_with_another_user(cfg: ConfigFiles) -> None:
    cfg.identity.chmod(0o400)
    _set_access_acl(cfg.identity, user_ids=[54321])

    error = cfg.error("targets.offsite.identity_file")

    assert f"{cfg.identity} is readable by user 54321 (mode 0440;" in error.problem


@pytest.mark.parametrize("name", ["a/b", "..", "."])
def test_config_rejects_a_watch_name_that_is_not_one_directory_name(
        cfg: ConfigFiles, name: str) -> None:
    # {watch} in remote_dir: "../x" or "a/b" would move files out of the tree meant for them.
    cfg.watch["name"] = name

    errors = cfg.errors()

    assert any("usable as one directory name" in e.problem for e in errors), errors
