"""Property-based fuzzing of the config loader and of `scpd check --offline`.

Each example starts from a valid config and throws random TOML at its keys: strings with NUL
and control characters, huge numbers, nan and inf, nested tables, arrays, dates, unknown keys,
odd units, format fields in remote_dir, paths that are too long, loop, or name a FIFO. The
properties: config.load returns a Config whose numbers are finite and bounded and whose
remote_dir can be filled in, or it raises ConfigErrors, each one line naming a key path;
never any other exception. Through the CLI: exit 0 or 78, one `scpd: ` line per problem,
never a traceback.

Bounded and reproducible: a fixed number of examples, derandomized, no example database, so
that CI runs exactly what a developer ran (about 10 s in all).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scpd import cli, config
from scpd.errors import ConfigError, ConfigErrors

FUZZ = settings(
    max_examples=350,
    deadline=timedelta(seconds=1),  # generous for a slow CI machine; a loop or a 1 GB string
    derandomize=True,               # is far slower than that
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- writing any value as TOML ---------------------------------------------------------------


def toml_string(text: str) -> str:
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def toml_value(value: Any) -> str:
    """Any value as inline TOML: a whole document is `daemon = {...}`, `watch = [{...}]`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    return value.isoformat()  # date, time, datetime


def toml_document(raw: dict[str, Any]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in raw.items())


# -- the valid starting point ---------------------------------------------------------------


class Base:
    """A valid config and the files it names, plus odd files for paths to point at."""

    def __init__(self, root: Path):
        self.root = root
        key = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        self.identity = self._secret("id_ed25519", key)
        self.password = self._secret("password", b"hunter2\n")
        self.passphrase = self._secret("passphrase", b"correct horse\n")
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text("[127.0.0.1]:2222 ssh-ed25519"
                                    " AAAAC3NzaC1lZDI1NTE5AAAAIA0pGvwzk6c0rPYbGIwC4ZIkBtgzDEyO"
                                    "9gJ4pSzxGxrY\n")
        self.watched = root / "reports"
        self.watched.mkdir()
        self.state_dir = root / "state"
        self.fifo = root / "fifo"
        os.mkfifo(self.fifo, 0o600)
        self.loop = root / "loop"
        self.loop.symlink_to(self.loop)
        self.shared = root / "shared"
        self.shared.write_text("x\n")
        self.shared.chmod(0o644)
        self.private_dir = root / "private"
        self.private_dir.mkdir(mode=0o700)
        self.config_path = root / "config.toml"

    def _secret(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def raw(self) -> dict[str, Any]:
        return {
            "daemon": {"state_dir": str(self.state_dir)},
            "targets": {
                "offsite": {
                    "host": "backup.example.com",
                    "user": "reports",
                    "identity_file": str(self.identity),
                    "known_hosts": str(self.known_hosts),
                    "remote_dir": "/srv/incoming/{hostname}/{watch}",
                },
            },
            "watch": [{"name": "reports", "path": str(self.watched), "targets": ["offsite"]}],
        }

    def write(self, raw: dict[str, Any]) -> Path:
        self.config_path.write_text(toml_document(raw), encoding="utf-8")
        return self.config_path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Base]:
    with pytest.MonkeyPatch.context() as env:
        for name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "SCPD_CONFIG",
                     "JOURNAL_STREAM"):
            env.delenv(name, raising=False)
        yield Base(tmp_path_factory.mktemp("fuzz"))


# -- strategies ------------------------------------------------------------------------------

DELETE = object()  # a mutation that removes the key

nasty_text = st.text(st.characters(codec="utf-8"), max_size=24)
control_text = st.text(st.characters(max_codepoint=0x9F), max_size=12)
big_ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(
    [0, -1, 1, 22, 65535, 65536, 2**63 - 1, -(2**63), 10**30]))
scalars = st.one_of(
    nasty_text, control_text, big_ints, st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.dates(), st.times(), st.datetimes(),
)
any_value = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(nasty_text, inner, max_size=3)),
    max_leaves=6,
)

_numbers = st.one_of(
    st.integers(0, 10**7).map(str),
    st.from_regex(r"[0-9]{1,25}(\.[0-9]{1,25})?", fullmatch=True),
    st.sampled_from(["9" * 400, "9" * 20, "0", "00", "0.0", "1e3", ".5", "5.", "1_000", "-1",
                     "+1", "0x10", "inf", "nan", "\uff11", "\u0663", " 1", "1 "]),
)
durations = st.one_of(
    st.lists(st.tuples(_numbers, st.sampled_from(
        ["ms", "s", "m", "h", "d", "us", "ns", "S", "M", "min", "sec", "y", "w", "", " s"]))
        .map("".join), min_size=1, max_size=3).map("".join),
    st.sampled_from(["never", "Never", " 5s ", "5s\0", "5s\n", "1h30m", "-5s", "0s", ""]),
)
rates = st.builds(
    lambda number, prefix, unit, per: f"{number}{prefix}{unit}{per}",
    _numbers,
    st.sampled_from(["", "K", "k", "M", "Mi", "G", "Gi", "Ti", "T", "Ki ", " M", "\0"]),
    st.sampled_from(["B", "bit", "b", "byte", "Bit", ""]),
    st.sampled_from(["/s", "/m", "/h", "", "/S", "ps"]),
)
_FORMAT_PIECES = [
    "{hostname}", "{watch}", "{hostname.__class__}", "{watch.__class__.__mro__}",
    "{watch[0]}", "{hostname[__doc__]}", "{hostname!r}", "{watch!s}", "{hostname!a}",
    "{hostname:>999999999}", "{hostname:>10}", "{watch:.3}", "{hostname:{watch}}",
    "{hostname:}", "{0}", "{}", "{{", "}}", "{", "}", "{ hostname}", "{HOSTNAME}",
    "{hostname!}", "{hostname:%Y}", "/srv", "/", "..", "\n", "\0", "a", " ",
]
templates = st.lists(st.one_of(st.sampled_from(_FORMAT_PIECES), nasty_text), max_size=5) \
    .map("".join)
hostish = st.one_of(
    st.sampled_from(["a\0b", "a\nb", "host\r", "\x1b[31mred", "ex ample.com", "-oProxy=x",
                     "", " ", "user@host", "[::1]", "h\u200bost", "h\x7f"]),
    nasty_text, control_text)
words = st.one_of(st.sampled_from(
    ["strict", "accept-new", "scp", "sftp", "keep", "delete", "move", "debug", "info",
     "warning", "error", "auto", "journal", "stderr", "STRICT", "scp ", "", "\0"]), nasty_text)
names = st.one_of(st.sampled_from(["reports", "offsite", "", "a\nb", "a.b", "x\0"]),
                  nasty_text)
listens = st.one_of(
    st.builds(lambda host, port: f"{host}:{port}", st.one_of(hostish, st.sampled_from(
        ["127.0.0.1", "[::1]", "::1", "[127.0.0.1]", "[fe80::1%\0]", "1.2.3.4.5", "0.0.0.0:"])),
        big_ints),
    hostish)


def paths(base: Base) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([
            str(base.identity), str(base.password), str(base.passphrase), str(base.known_hosts),
            str(base.watched), str(base.fifo), str(base.loop), str(base.shared),
            str(base.private_dir), str(base.root / "missing"), str(base.watched / "sub"),
            str(base.root / "a\0b"), "\0", "/", "", ".", "relative", "id_ed25519",
            "$CREDENTIALS_DIRECTORY/id_ed25519", "${CREDENTIALS_DIRECTORY}/password",
            "$CREDENTIALS_DIRECTORY", "~/.ssh/id_ed25519", "/dev/null",
            "/" + "x" * 300, "/x" * 2100, str(base.root / ("y" * 256)),
            str(base.identity) + "/sub", str(base.fifo) + "/x",
        ]),
        st.builds(lambda tail: str(base.root / tail), nasty_text),
        nasty_text,
    )


def _keys(base: Base) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    path = paths(base)
    flags = st.one_of(st.booleans(), scalars)
    return {
        "daemon": {"state_dir": path, "bandwidth_limit": rates, "log_level": words,
                   "log_target": words, "metrics_listen": listens},
        "target": {
            "host": hostish, "port": big_ints, "user": hostish, "identity_file": path,
            "password_file": path, "passphrase_file": path, "use_agent": flags,
            "known_hosts": path, "host_key_policy": words, "remote_dir": templates,
            "protocol": words, "bandwidth_limit": rates, "connections": big_ints,
            "preserve_times": flags, "preserve_mode": flags, "connect_timeout": durations,
            "io_timeout": durations, "retry_initial": durations, "retry_max": durations,
            "give_up_after": durations,
        },
        "watch": {
            "name": names, "path": path, "targets": st.lists(names, max_size=3),
            "recursive": flags, "include": st.lists(nasty_text, max_size=3),
            "exclude": st.lists(nasty_text, max_size=3), "default_excludes": flags,
            "settle": durations, "on_success": words, "archive_dir": path,
            "follow_symlinks": flags, "poll": flags, "poll_interval": durations,
            "rescan_interval": durations,
        },
    }


def _plausible(base: Base) -> dict[str, dict[str, st.SearchStrategy[Any]]]:
    """Values that are right, or wrong only near the edges (bounds, one odd character)."""
    number = st.one_of(st.integers(0, 10**13).map(str),
                       st.floats(0, 1e13).map(lambda f: f"{f:.3f}"))
    duration = st.builds("".join, st.lists(st.tuples(number, st.sampled_from(
        ["ms", "s", "m", "h", "d"])).map("".join), min_size=1, max_size=2))
    rate = st.builds(lambda n, p, u: f"{n}{p}{u}/s", number,
                     st.sampled_from(["", "K", "M", "G", "Ki", "Mi", "Gi"]),
                     st.sampled_from(["B", "bit"]))
    template = st.lists(st.sampled_from(["{hostname}", "{watch}", "/srv", "/", "in", "-",
                                         "{{", "}}", "{watch:}", "{hostname!s}"]),
                        min_size=1, max_size=5).map("".join)
    word = st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True)
    secret = st.sampled_from([str(base.identity), str(base.password), str(base.passphrase),
                              str(base.shared), str(base.fifo), "id_ed25519", "password",
                              "$CREDENTIALS_DIRECTORY/passphrase"])
    directory = st.sampled_from([str(base.watched), str(base.private_dir),
                                 str(base.root / "later"), str(base.watched / "sub"),
                                 str(base.root / "archive")])
    flag = st.booleans()
    return {
        "daemon": {"state_dir": directory, "bandwidth_limit": rate,
                   "log_level": st.sampled_from(config.LOG_LEVELS),
                   "log_target": st.sampled_from(["auto", "journal", "stderr"]),
                   "metrics_listen": st.builds(
                       lambda host, port: f"{host}:{port}",
                       st.sampled_from(["127.0.0.1", "[::1]", "::1", "localhost", "h_x", ""]),
                       st.integers(-5, 70_000))},
        "target": {
            "host": word, "port": st.integers(-5, 70_000), "user": word,
            "identity_file": secret, "password_file": secret, "passphrase_file": secret,
            "use_agent": flag, "known_hosts": st.sampled_from(
                [str(base.known_hosts), str(base.root / "new_known_hosts")]),
            "host_key_policy": st.sampled_from(["strict", "accept-new"]),
            "remote_dir": template, "protocol": st.sampled_from(["scp", "sftp"]),
            "bandwidth_limit": rate, "connections": st.integers(0, 40),
            "preserve_times": flag, "preserve_mode": flag, "connect_timeout": duration,
            "io_timeout": duration, "retry_initial": duration, "retry_max": duration,
            "give_up_after": st.one_of(duration, st.just("never")),
        },
        "watch": {
            "name": word, "path": directory, "targets": st.just(["offsite"]),
            "recursive": flag, "include": st.lists(st.sampled_from(["*.pdf", "*", "[a-"])),
            "exclude": st.lists(st.sampled_from(["*.bak", ".*", ""])), "default_excludes": flag,
            "settle": duration,
            "on_success": st.sampled_from(["keep", "delete", "move"]),
            "archive_dir": directory, "follow_symlinks": flag, "poll": flag,
            "poll_interval": duration, "rescan_interval": duration,
        },
    }


def key_mutation(base: Base, section: str, *, of_its_kind: bool = False
                 ) -> st.SearchStrategy[tuple[str, str, Any]]:
    """(section, key, value): a known key with a value of its kind, or of any kind, or
    deleted; or an unknown key. of_its_kind: only plausible values, which load more often."""
    keys = _keys(base)[section]
    if of_its_kind:
        plausible = _plausible(base)[section]
        return st.sampled_from(sorted(plausible)).flatmap(
            lambda key: st.tuples(st.just(section), st.just(key), plausible[key]))
    known = st.sampled_from(sorted(keys)).flatmap(lambda key: st.tuples(
        st.just(section), st.just(key),
        st.one_of(keys[key], keys[key], any_value, st.just(DELETE))))
    unknown = st.tuples(st.just(section), nasty_text, any_value)
    return st.one_of(known, known, known, unknown)


def shape_mutation() -> st.SearchStrategy[tuple[str, str, Any]]:
    """Whole sections replaced, a second target or watch, a renamed target, unknown tables."""
    return st.one_of(
        st.tuples(st.sampled_from(["daemon", "targets", "watch"]), st.just(""),
                  st.one_of(any_value, st.just(DELETE))),
        st.tuples(st.just("top"), nasty_text, any_value),
        st.tuples(st.just("rename"), names, st.just(None)),
        st.tuples(st.just("extra_watch"), st.just(""), st.dictionaries(
            st.sampled_from(["name", "path", "targets", "on_success", "archive_dir"]),
            any_value, max_size=5)),
    )


def mutations(base: Base) -> st.SearchStrategy[list[tuple[str, str, Any]]]:
    one = st.one_of(key_mutation(base, "daemon"), key_mutation(base, "target"),
                    key_mutation(base, "watch"), shape_mutation())
    # Half the examples change one or two keys to a value of their kind: those are the ones
    # that may load, and a Config that loads must be usable.
    plausible = st.one_of(*(key_mutation(base, section, of_its_kind=True)
                            for section in ("daemon", "target", "watch")))
    return st.one_of(st.lists(plausible, min_size=1, max_size=2),
                     st.lists(one, min_size=1, max_size=4))


def mutated(base: Base, changes: list[tuple[str, str, Any]]) -> dict[str, Any]:
    raw = base.raw()
    for where, key, value in changes:
        tables = {"daemon": raw.get("daemon"),
                  "target": next(iter(raw["targets"].values()), None)
                  if isinstance(raw.get("targets"), dict) and raw["targets"] else None,
                  "watch": raw["watch"][0] if isinstance(raw.get("watch"), list)
                  and raw["watch"] and isinstance(raw["watch"][0], dict) else None}
        if where in tables:
            table = tables[where]
            if not isinstance(table, dict):
                continue
            if value is DELETE:
                table.pop(key, None)
            else:
                table[key] = value
        elif key == "" and where in ("daemon", "targets", "watch"):
            if value is DELETE:
                raw.pop(where, None)
            else:
                raw[where] = value
        elif where == "top":
            raw[key] = value
        elif where == "rename" and isinstance(raw.get("targets"), dict) and raw["targets"]:
            old, target = next(iter(raw["targets"].items()))
            raw["targets"] = {key: target}
            for watch in raw["watch"] if isinstance(raw.get("watch"), list) else ():
                if isinstance(watch, dict) and watch.get("targets") == [old]:
                    watch["targets"] = [key]
        elif where == "extra_watch" and isinstance(raw.get("watch"), list):
            raw["watch"].append({**base.raw()["watch"][0], **value})
    return raw


@contextlib.contextmanager
def credentials_directory(directory: Path | None) -> Iterator[None]:
    saved = os.environ.pop("CREDENTIALS_DIRECTORY", None)
    if directory is not None:
        os.environ["CREDENTIALS_DIRECTORY"] = str(directory)
    try:
        yield
    finally:
        os.environ.pop("CREDENTIALS_DIRECTORY", None)
        if saved is not None:
            os.environ["CREDENTIALS_DIRECTORY"] = saved


# -- the properties --------------------------------------------------------------------------

_SECTIONS = ("daemon", "targets", "watch")


def _names_a_key(key_path: str, raw: dict[str, Any], config_path: Path) -> bool:
    if key_path == str(config_path):
        return True
    tops = set(_SECTIONS) | {config._key_part(k) for k in raw}
    return any(key_path == top or key_path.startswith((f"{top}.", f"{top}["))
               for top in tops)


def assert_loads_or_names_the_key(base: Base, raw: dict[str, Any]) -> None:
    path = base.write(raw)
    try:
        loaded = config.load(path)
    except ConfigErrors as exc:
        event("refused")
        assert exc.errors
        for error in exc.errors:
            assert isinstance(error, ConfigError)
            assert _names_a_key(error.key_path, raw, path), error.key_path
            assert str(error).startswith(f"{error.key_path}: "), str(error)
            assert str(error).isprintable(), repr(str(error))  # one line, no escapes
        return
    event("loaded")
    assert isinstance(loaded, config.Config)
    _assert_usable(loaded)


class _PlainOnly:
    """A placeholder's value that fails on anything but plain substitution."""

    def __format__(self, spec: str) -> str:
        assert spec == "", f"format spec {spec!r} passed validation"
        return "x"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"attribute access .{name} passed validation")

    def __getitem__(self, key: Any) -> Any:
        raise AssertionError(f"index access [{key!r}] passed validation")

    def __repr__(self) -> str:
        raise AssertionError("a !r or !a conversion passed validation")

    def __str__(self) -> str:
        raise AssertionError("a !s conversion passed validation")


def _assert_usable(loaded: config.Config) -> None:
    """What a Config promises the daemon: finite, bounded numbers; a remote_dir that fills."""
    rates = [loaded.rate_bytes_per_second]
    seconds: list[float | None] = []
    for target in loaded.targets.values():
        rates.append(target.rate_bytes_per_second)
        seconds += [target.connect_timeout_seconds, target.io_timeout_seconds,
                    target.retry.initial_seconds, target.retry.max_seconds,
                    target.retry.give_up_after_seconds]
        assert target.host.isprintable() and "\0" not in target.host
        assert target.user.isprintable() and "\0" not in target.user
        for watch in loaded.watches:
            remote = config.remote_dir_for(target, watch)
            assert len(remote) < 10_000
        target.remote_dir.format(hostname=_PlainOnly(), watch=_PlainOnly())
    for watch in loaded.watches:
        seconds += [watch.settle_seconds, watch.poll_interval_seconds,
                    watch.rescan_interval_seconds]
    for value in seconds:
        assert value is None or (math.isfinite(value)
                                 and 0 <= value <= config.MAX_DURATION_SECONDS), value
    for value in rates:
        assert value is None or (math.isfinite(value)
                                 and 0 < value <= config.MAX_RATE_BYTES_PER_SECOND), value


@FUZZ
@given(st.data())
def test_config_load_returns_a_config_or_names_the_key_for_any_key_value(
        base: Base, data: st.DataObject) -> None:
    changes = data.draw(mutations(base), label="changes")
    assert_loads_or_names_the_key(base, mutated(base, changes))


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_config_load_resolves_secret_paths_with_or_without_credentials_directory(
        base: Base, data: st.DataObject) -> None:
    directory = data.draw(st.sampled_from([None, base.root, base.root / "missing"]),
                          label="CREDENTIALS_DIRECTORY")
    one = st.one_of(key_mutation(base, "target"), key_mutation(base, "target", of_its_kind=True))
    changes = data.draw(st.lists(one, min_size=1, max_size=3), label="changes")
    with credentials_directory(directory):
        assert_loads_or_names_the_key(base, mutated(base, changes))


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_check_offline_exits_0_or_78_with_one_scpd_line_per_problem(
        base: Base, data: st.DataObject) -> None:
    changes = data.draw(mutations(base), label="changes")
    path = base.write(mutated(base, changes))
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["check", "--offline", "-c", str(path)])
    finally:
        root.handlers[:], root.level = saved

    event(f"exit {code}")
    assert code in (0, 78), err.getvalue()
    assert "Traceback" not in err.getvalue()
    for line in err.getvalue().splitlines():
        assert re.match(r"scpd: \S", line), err.getvalue()
    if code == 78:
        assert err.getvalue()


def test_fuzz_strategies_cover_every_key_the_loader_knows(
        base: Base, monkeypatch: pytest.MonkeyPatch) -> None:
    # A key added to config.py and not here would never be fuzzed.
    known: dict[str, set[str]] = {}
    original_table = config._Reader.table

    def recording_table(self: Any, raw: Any, key_path: str, allowed: set[str]) -> Any:
        section = {"daemon": "daemon", "targets.offsite": "target",
                   "watch.reports": "watch"}.get(key_path)
        if section:
            known[section] = set(allowed)
        return original_table(self, raw, key_path, allowed)

    monkeypatch.setattr(config._Reader, "table", recording_table)
    config.load(base.write(base.raw()))

    fuzzed = _keys(base)
    plausible = _plausible(base)
    assert set(known) == {"daemon", "target", "watch"}
    for section, keys in known.items():
        assert set(fuzzed[section]) == keys, section
        assert set(plausible[section]) == keys, section
