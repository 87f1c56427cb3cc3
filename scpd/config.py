"""TOML config -> validated, frozen dataclasses. Every problem is reported with its dotted key path.

Shape is checked first, then cross-field rules; all problems of a file are collected and raised
together as ConfigErrors, so an operator fixes a config in one pass.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import re
import shlex
import socket
import stat
import string
import struct
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scpd.errors import ConfigError, ConfigErrors
from scpd.logs import printable

DEFAULT_CONFIG_PATH = "/etc/scpd/config.toml"
DEFAULT_STATE_DIR = "/var/lib/scpd"
DEFAULT_EXCLUDES = (".*", "*.part", "*.tmp", "*.swp", "*~")

# Bounds on every duration and rate. Past them a value is a slip (a stray digit, a wrong unit),
# not a wish, and a number that large (or inf, which "9" * 400 + "s" parses to) breaks the
# timers and token buckets it feeds. A year covers any settle time, timeout or retry cap;
# give_up_after = "never" is how to say longer. 1 TiB/s is beyond any link, and below 1 B/s a
# token bucket would wait minutes for a single byte.
MAX_DURATION_SECONDS = 365 * 86400.0
MIN_RATE_BYTES_PER_SECOND = 1.0
MAX_RATE_BYTES_PER_SECOND = float(1024**4)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII digits only: \d would also take "\uff11" or "\u0663", which float() then reads.
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGkmg]i?)?(B|bit)/s", re.ASCII)
_RATE_PREFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3,
                  "ki": 1024, "mi": 1024**2, "gi": 1024**3}

# What Path.exists() takes for "not there (yet)"; every other error of stat() is a problem
# to report (a name too long, a parent without search permission), not an exception to raise.
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)

# remote_dir's placeholders, filled by remote_dir_for(). Only these, written plainly.
PLACEHOLDERS = ("hostname", "watch")

# A host name as DNS has it (RFC 1123 labels, ASCII): what getaddrinfo() is given for
# metrics_listen, never a URL, a path or a port range.
_HOST_NAME_RE = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                           r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?",
                           re.ASCII)
_LISTEN_EXAMPLE = '"127.0.0.1:9308" or "[::1]:9308"'


def parse_duration(text: str) -> float:
    """'500ms', '10s', '5m', '1h30m' -> seconds, at most MAX_DURATION_SECONDS.
    Raises ValueError."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError('expected a duration like "500ms", "10s", "5m" or "1h30m",'
                         f" got {_quote(text)}")
    if not total <= MAX_DURATION_SECONDS:  # also false for nan and inf
        raise ValueError(f"expected a duration of at most 365d (a year), got {_quote(text)}")
    return total


@dataclass(frozen=True)
class ListenAddress:
    """Where a TCP server listens: an IP address literal or a host name, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """'127.0.0.1:9308', '[::1]:9308', 'metrics.example.com:9308' -> ListenAddress.
    Raises ValueError. Names are not resolved here (check --offline must not need DNS)."""
    text = text.strip()
    shape = f"expected HOST:PORT like {_LISTEN_EXAMPLE}, got {_quote(text)}"
    if text.startswith("["):
        host, bracket_colon, port_text = text[1:].partition("]:")
        if not bracket_colon:
            raise ValueError(shape)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_quote(host)} in brackets is not an IPv6 address (brackets are"
                             f" for IPv6 only), in {_quote(text)}") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError(shape)
        if ":" in host:
            if _is_ipv6(host) or _is_ipv6(text):
                raise ValueError(f"write an IPv6 address in brackets, like \"[::1]:9308\","
                                 f" got {_quote(text)}")
            raise ValueError(shape)
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{_quote(host)} is not an IPv4 address, in {_quote(text)}"
                                 ) from None
        elif not _HOST_NAME_RE.fullmatch(host):
            raise ValueError(f"{_quote(host)} is neither an IP address nor a host name, in"
                             f" {_quote(text)} (expected HOST:PORT like {_LISTEN_EXAMPLE})")
    if not re.fullmatch(r"[0-9]{1,5}", port_text, re.ASCII) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port 1-65535 after the last colon, got {_quote(text)}")
    return ListenAddress(host, int(port_text))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def parse_rate(text: str) -> float:
    """'500KB/s', '10MiB/s', '80Mbit/s' -> bytes per second, between
    MIN_RATE_BYTES_PER_SECOND and MAX_RATE_BYTES_PER_SECOND. Raises ValueError."""
    match = _RATE_RE.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError('expected a rate like "500KB/s", "10MiB/s" or "80Mbit/s",'
                         f" got {_quote(text)}")
    number, prefix, unit = match.groups()
    rate = float(number) * _RATE_PREFIXES[(prefix or "").lower()]
    rate = rate / 8 if unit == "bit" else rate
    if not MIN_RATE_BYTES_PER_SECOND <= rate <= MAX_RATE_BYTES_PER_SECOND:
        raise ValueError(f"expected a rate from 1B/s to 1TiB/s, got {_quote(text)}")
    return rate


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
    passphrase_file: Path | None = None  # unlocks an encrypted identity_file
    use_agent: bool = False  # also offer the keys of the ssh-agent at $SSH_AUTH_SOCK
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
    metrics_listen: ListenAddress | None = None  # Prometheus metrics over HTTP; None: off

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
        # One line each, whatever a key, a name or a path in the file holds: the CLI prints
        # one `scpd:` line per problem, and a newline or an escape sequence would forge more.
        self.errors.append(ConfigError(printable(key_path), printable(problem)))

    def table(self, raw: Any, key_path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(key_path, f"expected a table, got {_show(raw)}")
            return {}
        for key in sorted(set(raw) - allowed):
            self.fail(f"{key_path}.{_key_part(key)}" if key_path else _key_part(key),
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
        problem = _path_problem(text)
        if problem:
            self.fail(f"{key_path}.{key}", problem)
            return None
        try:
            return Path(_expand_credentials(text))
        except ValueError as exc:
            self.fail(f"{key_path}.{key}", str(exc))
            return None

    def secret_path(self, table: dict[str, Any], key: str, key_path: str) -> Path | None:
        """A key, password or passphrase file. A relative path names a systemd credential
        (LoadCredential=NAME:...): it is looked up in $CREDENTIALS_DIRECTORY. Relative paths
        meant nothing documented before (the working directory, "/" under systemd)."""
        path = self.local_path(table, key, key_path)
        if path is None or path.is_absolute():
            return path
        full = f"{key_path}.{key}"
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            tilde = " (~ is not expanded)" if str(path).startswith("~") else ""
            self.fail(full, f"{_quote(str(path))} is a relative path{tilde}: give an absolute"
                            " path, or a credential name with LoadCredential= under systemd,"
                            " which is looked up in $CREDENTIALS_DIRECTORY (not set here)")
            return None
        if ".." in path.parts or not Path(directory).is_absolute():
            self.fail(full, f"{_quote(str(path))} must name a file in $CREDENTIALS_DIRECTORY"
                            f" ({_quote(directory)})")
            return None
        return Path(directory) / path

    # -- sections ---------------------------------------------------------------------------

    def config(self, path: Path, raw: dict[str, Any]) -> Config:
        top = self.table(raw, "", {"daemon", "targets", "watch"})
        daemon = self.table(top.get("daemon", {}), "daemon",
                            {"state_dir", "bandwidth_limit", "log_level", "log_target",
                             "metrics_listen"})
        default_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT_STATE_DIR
        state_text = self.get(daemon, "state_dir", "daemon", str, default_state)
        if problem := _path_problem(state_text):
            self.fail("daemon.state_dir", problem)
            state_text = default_state
        state_dir = Path(state_text)
        if not state_dir.is_absolute():
            self.fail("daemon.state_dir", f"must be an absolute path, got {_quote(state_text)}")
        rate = self.parsed(daemon, "bandwidth_limit", "daemon", parse_rate)
        log_level = self.choice(daemon, "log_level", "daemon", LOG_LEVELS, "info")
        log_target = self.choice(daemon, "log_target", "daemon", ("auto", "journal", "stderr"),
                                 "auto")
        metrics_listen = self.parsed(daemon, "metrics_listen", "daemon", parse_listen)
        raw_targets = top.get("targets", {})
        names = set(raw_targets) if isinstance(raw_targets, dict) else set()
        targets_raw = self.table(raw_targets, "targets", names)
        for name in targets_raw:
            if problem := _name_problem(name):
                self.fail(f"targets.{_key_part(name)}", f"target name {problem}")
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
                      rate_bytes_per_second=rate, log_level=log_level, log_target=log_target,
                      metrics_listen=metrics_listen)

    def target(self, name: str, raw: Any) -> Target:
        kp = f"targets.{_key_part(name)}"
        t = self.table(raw, kp, {
            "host", "port", "user", "identity_file", "password_file", "passphrase_file",
            "use_agent", "known_hosts", "host_key_policy", "remote_dir", "protocol",
            "bandwidth_limit", "connections", "preserve_times", "preserve_mode",
            "connect_timeout", "io_timeout", "retry_initial", "retry_max", "give_up_after"})
        port = t.get("port", 22)
        if "port" in t and (not isinstance(port, int) or isinstance(port, bool)
                            or not 1 <= port <= 65535):
            self.fail(f"{kp}.port", f"expected an integer 1-65535, got {_show(port)}")
            port = 22
        connections = self.get(t, "connections", kp, int, 2)
        if not 1 <= connections <= 32:
            self.fail(f"{kp}.connections", f"expected an integer 1-32, got {connections}")
            connections = 2
        use_agent = self.get(t, "use_agent", kp, bool, False)
        identity = self.secret_path(t, "identity_file", kp)
        password = self.secret_path(t, "password_file", kp)
        if not use_agent and "identity_file" not in t and "password_file" not in t:
            self.fail(f"{kp}.identity_file",
                      "missing (set identity_file or password_file, or use_agent = true)")
        if "passphrase_file" in t and "identity_file" not in t:
            self.fail(f"{kp}.passphrase_file",
                      "only used with identity_file (it unlocks that key); set identity_file"
                      " or remove passphrase_file")
            passphrase = None
        else:
            passphrase = self.secret_path(t, "passphrase_file", kp)
        for key, secret in (("identity_file", identity), ("password_file", password),
                            ("passphrase_file", passphrase)):
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
        elif not self.check_placeholders(f"{kp}.remote_dir", remote_dir):
            remote_dir = "."  # never filled in: the config does not load
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
            elif not value.isprintable():
                # paramiko would send a NUL or an escape sequence on to DNS and to sshd.
                self.fail(f"{kp}.{key}", f"must not contain NUL or control characters, got"
                                         f" {_quote(value)}")
        return Target(
            name=name,
            host=host,
            user=user,
            known_hosts=known_hosts or Path(),
            remote_dir=remote_dir,
            port=port,
            identity_file=identity,
            password_file=password,
            passphrase_file=passphrase,
            use_agent=use_agent,
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
            # Once it has a name, problems are reported under it.
            kp = f"watch.{_key_part(raw['name'])}"
        w = self.table(raw, kp, {
            "name", "path", "targets", "recursive", "include", "exclude", "default_excludes",
            "settle", "on_success", "archive_dir", "follow_symlinks", "poll", "poll_interval",
            "rescan_interval"})
        name = self.get(w, "name", f"watch[{index}]", str, f"watch{index}", required=True)
        if "name" in w and (problem := _name_problem(name) or _path_part_problem(name)):
            # The name is a key path here, a log field, and {watch} in remote paths.
            self.fail(f"{kp}.name", f"watch name {problem}")
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
        if on_success == "move" and "archive_dir" not in w:
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
                self.fail(f"watch.{_key_part(w.name)}.name",
                          "defined twice (watch names must be unique)")
            seen.add(w.name)

    def check_overlaps(self, watches: tuple[Watch, ...]) -> None:
        """A file under two watches is owed to both: neither may delete or move it alone."""
        for w in watches:
            if w.on_success == "keep":
                continue
            for other in watches:
                if other is not w and (w.path.is_relative_to(other.path)
                                       or other.path.is_relative_to(w.path)):
                    self.fail(f"watch.{_key_part(w.name)}.on_success",
                              f'"{w.on_success}" cannot be used: its path overlaps watch'
                              f' "{other.name}", which also owes those files')
                    break

    def check_placeholders(self, key_path: str, template: str) -> bool:
        """Only {hostname} and {watch}, written plainly: str.format would also run attribute
        and index lookups ({watch.__class__}), conversions and format specs, and a spec like
        {hostname:>999999999} builds a gigabyte. Nothing is formatted here."""
        known = "known: {hostname}, {watch}; write {{ and }} for a literal brace"
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion
                      in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:
            self.fail(key_path, f"not a valid template: {exc} ({known})")
            return False
        for name, spec, conversion in fields:
            if name not in PLACEHOLDERS or spec or conversion:
                field_text = "{" + name + (f"!{conversion}" if conversion else "") \
                    + (f":{spec}" if spec else "") + "}"
                self.fail(key_path, f"unknown placeholder {_quote(field_text)} ({known};"
                                    " no attributes, indexes, conversions or format specs)")
                return False
        return True

    def check_secret_file(self, key_path: str, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self.fail(key_path, f"file not found: {path}")
            return
        except OSError as exc:
            self.fail(key_path, f"cannot read {path}: {exc.strerror}")
            return
        if not stat.S_ISREG(st.st_mode):
            # A FIFO would block the reader forever; a directory is a slip.
            self.fail(key_path, f"{path} is not a regular file")
            return
        # Stricter than ssh, on purpose: ssh checks only a key its own user owns (a user's key
        # is theirs to share), and so would accept, run as root, a 0644 key owned by nobody.
        # A daemon's secret that another account can read is no longer a secret, whoever owns
        # it: any access by group or others is refused.
        grants = _access_by_others(path, st)
        if grants:
            mode = stat.S_IMODE(st.st_mode)
            self.fail(key_path, f"{path} is {_describe_access(grants)} (mode {mode:04o};"
                                f" run chmod 600 {shlex.quote(str(path))})")
        elif not os.access(path, os.R_OK):
            self.fail(key_path, f"{path} is not readable by this user")

    def check_known_hosts(self, key_path: str, path: Path, policy: str) -> None:
        try:
            st = path.stat()
        except OSError as exc:
            if exc.errno not in _MISSING_ERRNOS:
                self.fail(key_path, f"cannot read {path}: {exc.strerror}")
            elif policy == "strict":
                self.fail(key_path, f"file not found: {path} (strict host key checking needs it;"
                                    " fill it with ssh-keyscan)")
            return
        if not stat.S_ISREG(st.st_mode):
            self.fail(key_path, f"{path} is not a regular file")
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
            self.fail(key_path, f"must be an absolute path, got {_quote(str(path))}")
            return
        try:
            st = path.stat()
        except OSError as exc:
            if exc.errno not in _MISSING_ERRNOS:  # a name too long, no permission, ...
                self.fail(key_path, f"cannot use {path}: {exc.strerror}")
            return
        if not stat.S_ISDIR(st.st_mode):
            self.fail(key_path, f"not a directory: {path}")
        elif not os.access(path, os.R_OK | os.X_OK):
            self.fail(key_path, f"{path} is not readable by this user")


def remote_dir_for(target: Target, watch: Watch) -> str:
    """The target's remote_dir with its placeholders filled for this machine and watch."""
    return target.remote_dir.format(hostname=socket.gethostname(), watch=watch.name)


def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than zero, got {_quote(text)}")
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
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()  # as TOML writes it; date includes datetime
    return _shorten(repr(value))


_SHOWN_CHARACTERS = 80  # of a value in a message: enough to recognise it, not a screenful


def _quote(text: str) -> str:
    """A value from the file as a message shows it: in quotes, shortened, on one line."""
    return f'"{_shorten(printable(text))}"'


def _shorten(text: str) -> str:
    if len(text) <= _SHOWN_CHARACTERS:
        return text
    return f"{text[:_SHOWN_CHARACTERS]}... ({len(text)} characters)"


def _key_part(name: str) -> str:
    """A table or key name as one part of a dotted key path, quoted as TOML would need it:
    targets.offsite, but targets."backup.example.com" and a "" key not left invisible."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return name
    return '"' + printable(name.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _path_problem(text: str) -> str | None:
    """What makes text unusable as a local path, before any system call sees it."""
    if "\0" in text:
        # os.stat() and open() raise ValueError("embedded null byte") on it.
        return f"must not contain a NUL byte, got {_quote(text)}"
    if not text:
        return "must not be empty"
    return None


def _name_problem(name: str) -> str | None:
    """Target and watch names are key paths, log fields and (watch) a remote path part."""
    if not name:
        return "must not be empty"
    if not name.isprintable():
        return f"must not contain NUL or control characters, got {_quote(name)}"
    return None


def _path_part_problem(name: str) -> str | None:
    """A watch's name is {watch} in remote_dir: one path component, never a way up."""
    if "/" in name or name in (".", ".."):
        return f'must be usable as one directory name (no "/", not "." or ".."), got' \
            f" {_quote(name)}"
    return None


# Tags of a POSIX access ACL entry (acl_ea.h), as stored in the system.posix_acl_access xattr.
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_OTHER = 0x02, 0x04, 0x08, 0x20


def _access_by_others(path: Path, st: os.stat_result) -> dict[str, int]:
    """Who besides the file's owner and this process's user may use the file, with the rwx
    bits they get: {"group": 0o4, "others": 0o6, "user 1001": 0o4}.

    With a POSIX ACL, the mode's group bits are the ACL's mask, not the group's access. That
    is how systemd hands a unit's User= its credential on tmpfs: a root-owned 0400 file with
    an ACL entry for that user, which shows as mode 0440 and is private all the same."""
    mode = stat.S_IMODE(st.st_mode)
    grants: dict[str, int] = {}
    if mode & 0o070:
        mask = (mode >> 3) & 0o7
        entries = _posix_acl(path)
        if entries is None:
            grants["group"] = mask
        for tag, perm, uid_or_gid in entries or ():
            if tag in (_ACL_GROUP_OBJ, _ACL_GROUP) and perm & mask:
                grants["group"] = grants.get("group", 0) | perm & mask
            elif tag == _ACL_USER and perm & mask \
                    and uid_or_gid not in (st.st_uid, os.geteuid()):
                grants[f"user {uid_or_gid}"] = perm & mask
    if mode & 0o007:
        grants["others"] = mode & 0o007
    return grants


def _posix_acl(path: Path) -> list[tuple[int, int, int]] | None:
    """The entries (tag, permission bits, uid or gid) of the file's access ACL, or None when
    it has none (or it cannot be read: then the mode's group bits count as the group's)."""
    try:
        data = os.getxattr(path, "system.posix_acl_access")
    except (OSError, AttributeError):  # no ACL, no xattr support, or not Linux
        return None
    if len(data) < 4 or (len(data) - 4) % 8 or struct.unpack_from("<I", data)[0] != 2:
        return None
    return [struct.unpack_from("<HHI", data, offset) for offset in range(4, len(data), 8)]


def _describe_access(grants: dict[str, int]) -> str:
    """{"group": 0o4} -> "readable by group"; {"group": 0o6, "others": 0o6} -> "readable and
    writable by group and others"; {"group": 0o2, "others": 0o4} -> "writable by group and
    readable by others"."""
    def kinds(perm: int) -> str:
        return " and ".join(word for bit, word in ((4, "readable"), (2, "writable"),
                                                   (1, "executable")) if perm & bit)

    if len(set(grants.values())) == 1:
        who = list(grants)
        return f"{kinds(next(iter(grants.values())))} by " + (
            f"{', '.join(who[:-1])} and {who[-1]}" if len(who) > 1 else who[0])
    return " and ".join(f"{kinds(perm)} by {who}" for who, perm in grants.items())
