"""Command line: parses arguments, maps errors to sysexits codes, and is the only place that
prints to the user. Every error a person can cause ends in one line starting `scpd: `."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator

from scpd import __version__, config, logs
from scpd.errors import ConfigError, ConfigErrors, PermanentError, ScpdError

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 64, as sysexits wants for usage
        self.exit(EX_USAGE, f"scpd: {message} (see scpd --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scpd", description="Push every new or changed file in watched"
                     " directories to SSH hosts, durably.")
    parser.add_argument("--version", action="version", version=f"scpd {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true",
                          help="debug logging, and tracebacks for internal errors"
                               " (over the config's log_level)")
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="warnings and errors only (over the config's log_level)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", default=config.default_config_path(),
                         help="config file (default: $SCPD_CONFIG, then /etc/scpd/config.toml)")
        return sub

    run = command("run", "run the daemon in the foreground")
    run.add_argument("--once", action="store_true",
                     help="scan, deliver everything owed, then exit")
    run.add_argument("--timeout", type=_duration_arg, default=60.0,
                     help="with --once: give up retrying after this long (default 60s)")
    check = command("check", "validate the config and (without --offline) every target")
    check.add_argument("--offline", action="store_true", help="do not connect to targets")
    status = command("status", "what is owed to each target")
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    retry = command("retry", "put failed jobs back in the queue and resume paused targets")
    retry.add_argument("--target", help="only this target")
    retry.add_argument("paths", nargs="*", help="only these files (paths under a watch)")
    return parser


def _duration_arg(text: str) -> float:
    try:
        return config.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logs.setup(_flag_level(args) or "info")
    handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigErrors as exc:
        for error in exc.errors:
            _say(str(error))
        return EX_CONFIG
    except ConfigError as exc:
        _say(str(exc))
        return EX_CONFIG
    except UsageError as exc:
        _say(str(exc))
        return EX_USAGE
    except ScpdError as exc:
        _say(str(exc))
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        _say(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback,"
             " and please report it)")
        return EX_SOFTWARE


def _flag_level(args: argparse.Namespace) -> str | None:
    """The log level the command line asks for, if any: it wins over the config's."""
    return "debug" if args.verbose else "warning" if args.quiet else None


def _say(message: str) -> None:
    print(f"scpd: {message}", file=sys.stderr)


def _load(args: argparse.Namespace) -> config.Config:
    return config.load(args.config)


# -- commands -----------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from scpd.daemon import Daemon  # the daemon's imports are not needed by check or status

    cfg = _load(args)
    logs.setup(_flag_level(args) or cfg.log_level, cfg.log_target)
    daemon = _open_daemon(cfg, functools.partial(Daemon, log_level_override=_flag_level(args)))
    if args.once:
        return daemon.run_once(args.timeout)
    return daemon.run_forever()


def _open_daemon(cfg: config.Config, daemon_class):
    with _state_dir_errors(cfg):
        return daemon_class(cfg)


def _open_store(cfg: config.Config):
    from scpd.store import Store

    with _state_dir_errors(cfg):
        return Store.open(cfg.state_dir)


@contextlib.contextmanager
def _state_dir_errors(cfg: config.Config) -> Iterator[None]:
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("daemon.state_dir", f"cannot use {cfg.state_dir}: {reason}"
                          " (create it, or run as its owner)") from None


def _check(args: argparse.Namespace) -> int:
    from scpd.transport import load_credentials, probe

    cfg = _load(args)
    problems = []
    credentials = {}
    for name, target in cfg.targets.items():
        try:
            credentials[name] = load_credentials(target)
        except ConfigError as exc:
            problems.append(exc)
    if problems:
        raise ConfigErrors(problems)
    print(f"config {cfg.path}: ok ({len(cfg.watches)} watch(es), {len(cfg.targets)} target(s))")
    for watch in cfg.watches:
        if not watch.path.exists():
            print(f"watch {watch.name}: note: {watch.path} does not exist yet; scpd will watch it"
                  " once it appears")
    if args.offline:
        return 0
    unusable = 0
    for name, target in cfg.targets.items():
        remote_dirs = sorted({config.remote_dir_for(target, w) for w in cfg.watches
                              if name in w.targets})
        try:
            for step in probe(target, credentials[name], remote_dirs):
                print(f"target {name}: ok: {step}")
        except ScpdError as exc:
            unusable += 1
            hint = "" if isinstance(exc, PermanentError) else " (retry later?)"
            print(f"target {name}: FAILED: {exc}{hint}")
            _say(f"target {name} is unusable: {exc}")
    return EX_UNAVAILABLE if unusable else 0


def _status(args: argparse.Namespace) -> int:

    cfg = _load(args)
    store = _open_store(cfg)
    try:
        summaries = store.summaries(tuple(w.name for w in cfg.watches), now=time.time())
    finally:
        store.close()
    targets = {name: summaries.get(name, store.empty_summary()) for name in cfg.targets}
    if args.json:
        print(json.dumps({"targets": targets}, indent=2))
        return 0
    for name, s in targets.items():
        age = s["oldest_pending_age_s"]
        print(f"{name}: {s['pending']} pending, {s['sending']} sending, {s['failed']} failed, "
              f"{s['delivered']} delivered ({s['bytes_delivered']} bytes)"
              + (f", oldest pending {age:.0f}s" if age is not None else ""))
        if s["paused"]:
            print(f"  PAUSED since {s['last_error_at']}: {s['last_error']}"
                  f" (fix it, then: scpd retry --target {name})")
        elif s["last_error"]:
            print(f"  last error at {s['last_error_at']}: {s['last_error']}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.target and args.target not in cfg.targets:
        _say(f'unknown target "{args.target}" (defined: {", ".join(sorted(cfg.targets))})')
        return EX_USAGE
    rel_paths = [pair for p in args.paths for pair in _watch_relative(cfg, p)]
    store = _open_store(cfg)
    try:
        n = store.retry_failed(target=args.target, rel_paths=rel_paths)
        # A running daemon sees the pause gone within seconds and tries the target again.
        # Named files alone are about those files, not about whole targets.
        is_about_targets = bool(args.target) or not rel_paths
        resumed = store.resume_targets(args.target) if is_about_targets else {}
    finally:
        store.close()
    print(f"{n} failed job(s) queued again")
    for name, reason in sorted(resumed.items()):
        print(f"target {name} resumed (it was paused: {reason})")
    return 0


def _watch_relative(cfg: config.Config, path: str) -> list[tuple[str, str]]:
    """Every (watch name, relative path) naming a path given on the command line: a file
    under overlapping watches has a job in each."""
    from pathlib import Path

    absolute = Path(path).absolute()
    pairs = [(w.name, str(absolute.relative_to(w.path))) for w in cfg.watches
             if absolute.is_relative_to(w.path)]
    if not pairs:
        raise UsageError(f"{path} is not under any watched directory")
    return pairs


class UsageError(ScpdError):
    """A command line that cannot be acted on: exit 64."""


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run, "check": _check, "status": _status, "retry": _retry,
}

logging.getLogger("scpd").addHandler(logging.NullHandler())
