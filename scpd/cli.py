"""Command line: parses arguments, maps errors to sysexits codes, and is the only place that
prints to the user. Every error a person can cause ends in one line starting `scpd: `."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator

from scpd import __version__, config, logs
from scpd.errors import ConfigError, ConfigErrors, ScpdError

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
    send = command("send", "push files to one target now, with its transport and settings;"
                   " a progress line on a terminal")
    send.epilog = ("A one-off push: the queue is not touched, and a running daemon still sends"
                   " a file in a watch by itself. A file under a watch that sends to the target"
                   " keeps its path below that watch; any other goes by its name. Retryable"
                   " errors are tried 3 times at most, within the target's io_timeout. Exit 0:"
                   " all sent; 1: some not.")
    send.add_argument("--target", required=True, help="the target's name in the config")
    send.add_argument("--remote-dir", metavar="DIR",
                      help="put the files below DIR (default: the target's remote_dir)")
    send.add_argument("-r", "--recursive", action="store_true",
                      help="send the regular files below a directory named (links and special"
                           " files are skipped)")
    send.add_argument("files", nargs="+", metavar="FILE", help="the files to send")
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
    except BrokenPipeError:  # `scpd status | head`: the reader has what it wanted
        # Nothing more can be written there, and Python would complain at exit otherwise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
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


def _open_store(cfg: config.Config, *, is_read_only: bool = False, should_create: bool = True):
    """The queue in the state_dir. is_read_only (status): nothing is created, migrated or
    written, and a running daemon is not held up. should_create=False (retry): the queue is
    not made where there is none. Either way: None if there is no queue yet."""
    from scpd.store import Store

    with _state_dir_errors(cfg):
        if not is_read_only:
            return Store.open(cfg.state_dir) if should_create else \
                Store.open_if_exists(cfg.state_dir)
        try:
            return Store.open_read_only(cfg.state_dir)
        except PermissionError:
            raise ConfigError("daemon.state_dir", f"cannot read the queue in {cfg.state_dir}:"
                              " permission denied (run as the daemon's user, or with sudo)"
                              ) from None


@contextlib.contextmanager
def _state_dir_errors(cfg: config.Config) -> Iterator[None]:
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("daemon.state_dir", f"cannot use {cfg.state_dir}: {reason}"
                          " (create it, or run as its owner)") from None


def _check(args: argparse.Namespace) -> int:
    from scpd import check  # paramiko and the transports: not needed by the other commands
    from scpd.transport import load_credentials

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
        print(check.header(name, target), flush=True)
        started, steps = time.monotonic(), []
        for step in check.check_target(target, credentials[name], remote_dirs):
            steps.append(step)
            print("\n".join(check.step_lines(step)), flush=True)
        print(check.verdict(name, steps, time.monotonic() - started), flush=True)
        if failed := [step for step in steps if step.is_failed]:
            unusable += 1
            _say(f"target {name} is unusable: {check.summary(failed[0])}")
    return EX_UNAVAILABLE if unusable else 0


def _status(args: argparse.Namespace) -> int:
    from scpd.store import Store

    cfg = _load(args)
    store = _open_store(cfg, is_read_only=True)
    now, summaries = time.time(), {}
    if store is not None:
        try:
            with _state_dir_errors(cfg):
                summaries = store.summaries(tuple(w.name for w in cfg.watches), now=now)
        finally:
            store.close()
    targets = {name: summaries.get(name) or Store.empty_summary() for name in cfg.targets}
    if args.json:
        print(json.dumps({"targets": targets}, indent=2))
        return 0
    print("\n".join(_status_lines(targets, now)))
    if store is None:
        # Not an error: nothing was ever owed. (A monitor reads zeros from --json.)
        print(f"no queue yet in {cfg.state_dir}: scpd has not run with this state_dir")
    return 0


def _status_lines(targets: dict[str, dict], now: float) -> list[str]:
    """A table, one row per target, then a line per target in trouble."""
    rows = [("TARGET", "PENDING", "SENDING", "FAILED", "DELIVERED", "BYTES", "OLDEST",
             "LAST SENT")]
    notes = []
    for name, s in targets.items():
        name = logs.printable(name)
        oldest, last_sent = s["oldest_pending_age_s"], s["last_delivered_at"]
        rows.append((name, str(s["pending"]), str(s["sending"]),
                     str(s["failed"]), str(s["delivered"]), logs.human_bytes(s["bytes_delivered"]),
                     "-" if oldest is None else _human_age(oldest),
                     "-" if last_sent is None else f"{_ago(last_sent, now)} ago"))
        error = logs.printable(s["last_error"] or "")
        if s["paused"]:
            notes.append(f"{name}: PAUSED since {s['last_error_at']}: {error}"
                         f" (fix it, then: scpd retry --target {name})")
        elif s["last_error"]:
            hint = f" (fix it, then: scpd retry --target {name})" if s["failed"] else ""
            notes.append(f"{name}: last error {_ago(s['last_error_at'], now)} ago"
                         f" ({s['last_error_at']}): {error}{hint}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i in (0, len(row) - 1) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    return lines + notes


def _ago(iso_time: str, now: float) -> str:
    return _human_age(now - datetime.datetime.fromisoformat(iso_time).timestamp())


def _human_age(seconds: float) -> str:
    """3m12s; 5h03m; 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _retry(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.target and args.target not in cfg.targets:
        _say(f'unknown target "{args.target}" (defined: {", ".join(sorted(cfg.targets))})')
        return EX_USAGE
    rel_paths = [pair for p in args.paths for pair in _watch_relative(cfg, p)]
    # No queue, nothing failed: none is made (as root, it would lock the daemon's user out).
    store = _open_store(cfg, should_create=False)
    n, resumed = 0, {}
    if store is not None:
        try:
            with _state_dir_errors(cfg):
                n = store.retry_failed(target=args.target, rel_paths=rel_paths)
                # A running daemon notices within a second (the queue changed under it) and
                # sends them, trying a resumed target again. Named files alone are about those
                # files, not about whole targets.
                is_about_targets = bool(args.target) or not rel_paths
                resumed = store.resume_targets(args.target) if is_about_targets else {}
        finally:
            store.close()
    print(f"{n} failed job(s) queued again")
    for name, reason in sorted(resumed.items()):
        print(f"target {name} resumed (it was paused: {reason})")
    return 0


def _send(args: argparse.Namespace) -> int:
    from scpd import send  # the transports are not needed by check --offline or status

    cfg = _load(args)
    # An operator's command: its own lines on the terminal, the transport's warnings with them.
    logs.setup(_flag_level(args) or "warning", "stderr")
    try:
        return send.send_files(cfg, args.target, args.files, remote_dir=args.remote_dir,
                               is_recursive=args.recursive, is_quiet=args.quiet,
                               out=sys.stdout, err=sys.stderr)
    except send.SendUsageError as exc:
        raise UsageError(str(exc)) from None


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
    "run": _run, "check": _check, "status": _status, "retry": _retry, "send": _send,
}

logging.getLogger("scpd").addHandler(logging.NullHandler())
