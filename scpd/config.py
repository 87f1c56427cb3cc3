"""TOML config -> validated, frozen dataclasses. Every problem is reported with its dotted key path.

Shape is checked first, then cross-field rules; all problems of a file are collected and raised
together as ConfigErrors, so an operator fixes a config in one pass.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scpd.errors import ConfigError, ConfigErrors

DEFAULT_CONFIG_PATH = "/etc/scpd/config.toml"
DEFAULT_STATE_DIR = "/var/lib/scpd"
DEFAULT_EXCLUDES = (".*", "*.part", "*.tmp", "*.swp", "*~")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGkmg]i?)?(B|bit)/s")
_RATE_PREFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3,
                  "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_duration(text: str) -> float:
    """'500ms', '10s', '5m', '1h30m' -> seconds. Raises ValueError."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f'expected a duration like "500ms", "10s", "5m" or "1h30m", got "{text}"')
    return total


def parse_rate(text: str) -> float:
    """'500KB/s', '10MiB/s', '80Mbit/s' -> bytes per second. Raises ValueError."""
    match = _RATE_RE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f'expected a rate like "500KB/s", "10MiB/s" or "80Mbit/s", got "{text}"')
    number, prefix, unit = match.groups()
    rate = float(number) * _RATE_PREFIXES[(prefix or "").lower()]
    return rate / 8 if unit == "bit" else rate


@dataclass(frozen=True)
class RetryPolicy:
    initial_seconds: float = 1.0
    max_seconds: float = 300.0
    give_up_after_seconds: float | None = None  # None: never give up on retryable errors


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    user: str
    known_hosts: Path
    remote_dir: str
    port: int = 22
    identity_file: Path | None = None
    password_file: Path | None = None
    host_key_policy: str = "strict"
    protocol: str = "scp"
    rate_bytes_per_second: float | None = None
    connections: int = 2
    preserve_times: bool = True
    preserve_mode: bool = True
    connect_timeout_seconds: float = 10.0
    io_timeout_seconds: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class Watch:
    name: str
    path: Path
    targets: tuple[str, ...]
    recursive: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDES
    settle_seconds: float = 2.0
    on_success: str = "keep"
    archive_dir: Path | None = None
    follow_symlinks: bool = False
    poll: bool = False                     # for NFS/CIFS, where inotify sees no remote writes
    poll_interval_seconds: float = 5.0
    rescan_interval_seconds: float = 600.0  # the safety net under the event stream


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    targets: dict[str, Target]
    watches: tuple[Watch, ...]
    rate_bytes_per_second: float | None = None
    log_level: str = "info"  # debug | info | warning | error
    log_target: str = "auto"  # auto (journald under systemd, else stderr) | journal | stderr

    def watch(self, name: str) -> Watch:
        return next(w for w in self.watches if w.name == name)


LOG_LEVELS = ("debug", "info", "warning", "error")


def default_config_path() -> str:
    return os.environ.get("SCPD_CONFIG") or DEFAULT_CONFIG_PATH


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigErrors listing every problem found."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigErrors([ConfigError(str(path), "config file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigErrors([ConfigError(str(path), f"cannot read: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([ConfigError(str(path), f"not valid TOML: {exc}")]) from None
    reader = _Reader()
    config = reader.config(path, raw)
    if reader.errors:
        raise ConfigErrors(reader.errors)
    return config


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a table"}


class _Reader:
    """Walks the raw TOML, collecting ConfigError for every problem instead of stopping."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def fail(self, key_path: str, problem: str) -> None:
        self.errors.append(ConfigError(key_path, problem))

    def table(self, raw: Any, key_path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(key_path, f"expected a table, got {_show(raw)}")
            return {}
        for key in sorted(set(raw) - allowed):
            self.fail(f"{key_path}.{key}" if key_path else key,
                      f"unknown key (known keys: {', '.join(sorted(allowed))})")
        return raw

    def get(self, table: dict[str, Any], key: str, key_path: str, kind: type,
            default: Any = None, *, required: bool = False) -> Any:
        full = f"{key_path}.{key}" if key_path else key
        if key not in table:
            if required:
                self.fail(full, "missing (this key is required)")
            return default
        value = table[key]
        # bool is an int in Python; a port of `true` is still wrong.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(full, f"expected {_TYPE_NAMES[kind]}, got {_show(value)}")
            return default
        return value

    def parsed(self, table: dict[str, Any], key: str, key_path: str,
               parse: Callable[[str], Any], default: Any = None) -> Any:
        text = self.get(table, key, key_path, str)
        if text is None:
            return default
        try:
            return parse(text)
        except ValueError as exc:
            self.fail(f"{key_path}.{key}", str(exc))
            return default

    def choice(self, table: dict[str, Any], key: str, key_path: str, choices: tuple[str, ...],
               default: str) -> str:
        value = self.get(table, key, key_path, str, default)
        if value not in choices:
            self.fail(f"{key_path}.{key}",
                      f"expected one of {', '.join(choices)}, got {_show(value)}")
            return default
        return value

    def string_list(self, table: dict[str, Any], key: str, key_path: str) -> tuple[str, ...]:
        value = self.get(table, key, key_path, list, [])
        if not all(isinstance(item, str) for item in value):
            self.fail(f"{key_path}.{key}", f"expected a list of strings, got {_show(value)}")
            return ()
        return tuple(value)

    def local_path(self, table: dict[str, Any], key: str, key_path: str,
                   *, required: bool = False) -> Path | None:
        text = self.get(table, key, key_path, str, required=required)
        if text is None:
            return None
        try:
            return Path(_expand_credentials(text))
        except ValueError as exc:
            self.fail(f"{key_path}.{key}", str(exc))
            return None

    # -- sections ---------------------------------------------------------------------------

    def config(self, path: Path, raw: dict[str, Any]) -> Config:
        top = self.table(raw, "", {"daemon", "targets", "watch"})
        daemon = self.table(top.get("daemon", {}), "daemon",
                            {"state_dir", "bandwidth_limit", "log_level", "log_target"})
        default_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR
        state_dir = Path(self.get(daemon, "state_dir", "daemon", str, default_state))
        if not state_dir.is_absolute():
            self.fail("daemon.state_dir", f'must be an absolute path, got "{state_dir}"')
        rate = self.parsed(daemon, "bandwidth_limit", "daemon", parse_rate)
        log_level = self.choice(daemon, "log_level", "daemon", LOG_LEVELS, "info")
        log_target = self.choice(daemon, "log_target", "daemon", ("auto", "journal", "stderr"),
                                 "auto")
        raw_targets = top.get("targets", {})
        names = set(raw_targets) if isinstance(raw_targets, dict) else set()
        targets_raw = self.table(raw_targets, "targets", names)
        targets = {name: self.target(name, value) for name, value in targets_raw.items()}
        watches_raw = top.get("watch", [])
        if not isinstance(watches_raw, list):
            self.fail("watch", "expected [[watch]] tables (an array of tables)")
            watches_raw = []
        if not watches_raw:
            self.fail("watch", "no [[watch]] defined: scpd has nothing to do")
        watches = tuple(self.watch(i, w, targets) for i, w in enumerate(watches_raw))
        self.check_unique_watch_names(watches)
        self.check_overlaps(watches)
        return Config(path=path, state_dir=state_dir, targets=targets, watches=watches,
                      rate_bytes_per_second=rate, log_level=log_level, log_target=log_target)

    def target(self, name: str, raw: Any) -> Target:
        kp = f"targets.{name}"
        t = self.table(raw, kp, {
            "host", "port", "user", "identity_file", "password_file", "known_hosts",
            "host_key_policy", "remote_dir", "protocol", "bandwidth_limit", "connections",
            "preserve_times", "preserve_mode", "connect_timeout", "io_timeout",
            "retry_initial", "retry_max", "give_up_after"})
        port = t.get("port", 22)
        if "port" in t and (not isinstance(port, int) or isinstance(port, bool)
                            or not 1 <= port <= 65535):
            self.fail(f"{kp}.port", f"expected an integer 1-65535, got {_show(port)}")
            port = 22
        connections = self.get(t, "connections", kp, int, 2)
        if not 1 <= connections <= 32:
            self.fail(f"{kp}.connections", f"expected an integer 1-32, got {connections}")
            connections = 2
        identity = self.local_path(t, "identity_file", kp)
        password = self.local_path(t, "password_file", kp)
        if identity is None and password is None and "identity_file" not in t \
                and "password_file" not in t:
            self.fail(f"{kp}.identity_file", "missing (set identity_file or password_file)")
        for key, secret in (("identity_file", identity), ("password_file", password)):
            if secret is not None:
                self.check_secret_file(f"{kp}.{key}", secret)
        policy = self.choice(t, "host_key_policy", kp, ("strict", "accept-new"), "strict")
        known_hosts = self.local_path(t, "known_hosts", kp, required=True)
        if known_hosts is not None:
            self.check_known_hosts(f"{kp}.known_hosts", known_hosts, policy)
        remote_dir = self.get(t, "remote_dir", kp, str, "", required=True)
        if "remote_dir" in t and not remote_dir:
            self.fail(f"{kp}.remote_dir", 'must not be empty (use "." for the login directory)')
        if "\n" in remote_dir or "\0" in remote_dir:
            self.fail(f"{kp}.remote_dir", "must not contain a newline or NUL")
        self.check_placeholders(f"{kp}.remote_dir", remote_dir)
        retry = RetryPolicy(
            initial_seconds=self.parsed(t, "retry_initial", kp, _positive_duration, 1.0),
            max_seconds=self.parsed(t, "retry_max", kp, _positive_duration, 300.0),
            give_up_after_seconds=self.parsed(t, "give_up_after", kp, _give_up_duration))
        if retry.max_seconds < retry.initial_seconds:
            self.fail(f"{kp}.retry_max", "must not be shorter than retry_initial")
        host = self.get(t, "host", kp, str, "", required=True)
        user = self.get(t, "user", kp, str, "", required=True)
        for key, value in (("host", host), ("user", user)):
            if isinstance(t.get(key), str) and not value.strip():
                self.fail(f"{kp}.{key}", "must not be empty")
        return Target(
            name=name,
            host=host,
            user=user,
            known_hosts=known_hosts or Path(),
            remote_dir=remote_dir,
            port=port,
            identity_file=identity,
            password_file=password,
            host_key_policy=policy,
            protocol=self.choice(t, "protocol", kp, ("scp", "sftp"), "scp"),
            rate_bytes_per_second=self.parsed(t, "bandwidth_limit", kp, parse_rate),
            connections=connections,
            preserve_times=self.get(t, "preserve_times", kp, bool, True),
            preserve_mode=self.get(t, "preserve_mode", kp, bool, True),
            connect_timeout_seconds=self.parsed(t, "connect_timeout", kp, _positive_duration,
                                                10.0),
            io_timeout_seconds=self.parsed(t, "io_timeout", kp, _positive_duration, 30.0),
            retry=retry,
        )

    def watch(self, index: int, raw: Any, targets: dict[str, Target]) -> Watch:
        kp = f"watch[{index}]"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            kp = f"watch.{raw['name']}"  # once it has a name, problems are reported under it
        w = self.table(raw, kp, {
            "name", "path", "targets", "recursive", "include", "exclude", "default_excludes",
            "settle", "on_success", "archive_dir", "follow_symlinks", "poll", "poll_interval",
            "rescan_interval"})
        name = self.get(w, "name", f"watch[{index}]", str, f"watch{index}", required=True)
        path = self.local_path(w, "path", kp, required=True)
        if path is not None:
            self.check_watch_dir(f"{kp}.path", path)
        target_names = self.string_list(w, "targets", kp)
        if "targets" in w and not target_names:
            self.fail(f"{kp}.targets", "expected at least one target name")
        elif "targets" not in w:
            self.fail(f"{kp}.targets", "missing (this key is required)")
        for t in target_names:
            if t not in targets:
                known = ", ".join(sorted(targets)) or "none defined"
                self.fail(f"{kp}.targets", f'unknown target "{t}" (defined: {known})')
        excludes = self.string_list(w, "exclude", kp)
        if self.get(w, "default_excludes", kp, bool, True):
            excludes = DEFAULT_EXCLUDES + excludes
        on_success = self.choice(w, "on_success", kp, ("keep", "delete", "move"), "keep")
        archive_dir = self.local_path(w, "archive_dir", kp)
        if on_success == "move" and archive_dir is None:
            self.fail(f"{kp}.archive_dir", 'required when on_success = "move"')
        if archive_dir is not None and on_success != "move":
            self.fail(f"{kp}.archive_dir", 'only used with on_success = "move"')
        if archive_dir is not None and not archive_dir.is_absolute():
            self.fail(f"{kp}.archive_dir", f'must be an absolute path, got "{archive_dir}"')
        elif archive_dir is not None and path is not None and archive_dir.is_relative_to(path):
            self.fail(f"{kp}.archive_dir", "must be outside the watched path")
        return Watch(
            name=name,
            path=path or Path(),
            targets=tuple(dict.fromkeys(target_names)),
            recursive=self.get(w, "recursive", kp, bool, True),
            include=self.string_list(w, "include", kp),
            exclude=excludes,
            settle_seconds=self.parsed(w, "settle", kp, parse_duration, 2.0),
            on_success=on_success,
            archive_dir=archive_dir,
            follow_symlinks=self.get(w, "follow_symlinks", kp, bool, False),
            poll=self.get(w, "poll", kp, bool, False),
            poll_interval_seconds=self.parsed(w, "poll_interval", kp, _positive_duration, 5.0),
            rescan_interval_seconds=self.parsed(w, "rescan_interval", kp, _positive_duration,
                                                600.0),
        )

    # -- cross-field and file-system rules -------------------------------------------------

    def check_unique_watch_names(self, watches: tuple[Watch, ...]) -> None:
        seen: set[str] = set()
        for w in watches:
            if w.name in seen:
                self.fail(f"watch.{w.name}.name", "defined twice (watch names must be unique)")
            seen.add(w.name)

    def check_overlaps(self, watches: tuple[Watch, ...]) -> None:
        """A file under two watches is owed to both: neither may delete or move it alone."""
        for w in watches:
            if w.on_success == "keep":
                continue
            for other in watches:
                if other is not w and (w.path.is_relative_to(other.path)
                                       or other.path.is_relative_to(w.path)):
                    self.fail(f"watch.{w.name}.on_success",
                              f'"{w.on_success}" cannot be used: its path overlaps watch'
                              f' "{other.name}", which also owes those files')
                    break

    def check_placeholders(self, key_path: str, template: str) -> None:
        try:
            template.format(hostname="h", watch="w")
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            self.fail(key_path, f"unknown placeholder {exc} (known: {{hostname}}, {{watch}})")

    def check_secret_file(self, key_path: str, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self.fail(key_path, f"file not found: {path}")
            return
        except OSError as exc:
            self.fail(key_path, f"cannot read {path}: {exc.strerror}")
            return
        if st.st_mode & 0o077 and os.geteuid() == st.st_uid:
            # As ssh does: a secret others can read is no longer a secret.
            mode = stat.S_IMODE(st.st_mode)
            self.fail(key_path, f"{path} is readable by others (mode {mode:04o};"
                                f" run chmod 600 {path})")
        elif not os.access(path, os.R_OK):
            self.fail(key_path, f"{path} is not readable by this user")

    def check_known_hosts(self, key_path: str, path: Path, policy: str) -> None:
        if not path.exists():
            if policy == "strict":
                self.fail(key_path, f"file not found: {path} (strict host key checking needs it;"
                                    " fill it with ssh-keyscan)")
            return
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            self.fail(key_path, f"cannot read {path}: {exc.strerror}")
            return
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("@"):
                # paramiko cannot honour @revoked or @cert-authority; ignoring them is unsafe.
                self.fail(key_path, f"{path} line {number}: markers like @revoked and"
                                    " @cert-authority are not supported; remove the line")

    def check_watch_dir(self, key_path: str, path: Path) -> None:
        # A missing directory is not an error: scpd warns and starts watching when it appears
        # (a mount not up yet, a directory another service creates).
        if not path.is_absolute():
            self.fail(key_path, f"must be an absolute path, got {_show(str(path))}")
        elif not path.exists():
            return
        elif not path.is_dir():
            self.fail(key_path, f"not a directory: {path}")
        elif not os.access(path, os.R_OK | os.X_OK):
            self.fail(key_path, f"{path} is not readable by this user")


def remote_dir_for(target: Target, watch: Watch) -> str:
    """The target's remote_dir with its placeholders filled for this machine and watch."""
    return target.remote_dir.format(hostname=socket.gethostname(), watch=watch.name)


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f'expected a duration greater than zero, got "{text}"')
    return seconds


def _give_up_duration(text: str) -> float | None:
    return None if text.strip() == "never" else _positive_duration(text)


def _expand_credentials(text: str) -> str:
    """Expand $CREDENTIALS_DIRECTORY (systemd LoadCredential=); no other variables."""
    for spelling in ("${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"):
        if spelling in text:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ValueError("uses $CREDENTIALS_DIRECTORY, but it is not set (it is set by"
                                 " systemd for units with LoadCredential=)")
            text = text.replace(spelling, directory)
    return text


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)
