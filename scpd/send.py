"""`scpd send`: a one-off push of named files to one target, now.

The same transport, caps (the target's bandwidth_limit and the daemon-wide one),
preserve_times and preserve_mode as the daemon, and the same landing: a hidden temporary
name, then a rename. The queue is not touched: a file in a watch is also sent by a running
daemon, by itself, as ever.

Where a file goes: below --remote-dir, else below the target's remote_dir, with {hostname}
and {watch} filled in as the daemon fills them. A file under a watch that sends to the target
keeps its path relative to that watch's root (the innermost such watch), as the daemon sends
it; any other file goes by its base name, and a file found below a directory named with -r
by that directory's name and its path below it (as scp -r). Paths are compared once links in
the directories leading to them are resolved; the file itself is never a link.

Directories are refused unless -r is given (as scp does); with -r every regular file below is
sent, without the watches' include/exclude filters (what an operator names is sent).
Symbolic links and special files met below are skipped, with a line each, as the daemon
skips them (never followed); a directory that cannot be listed fails.

Retries: a one-off command must not wait forever. A retryable error (network, timeout, full
remote disk, a file that changed while it was read) is tried at most _MAX_ATTEMPTS times in
all, after the target's backoff (retry_initial doubling, at most retry_max, with jitter), and
not once the waits would pass the target's io_timeout. A connection that cannot be made, or a
target that refuses us (host key, login, no scp), fails the files not tried yet at once.

Threads and signals: the files go out one by one from a thread of their own; the main
thread draws the progress line (from the uploader's `sending` file) and owns the signals.
A first Ctrl-C (or SIGTERM) cuts the transfer (the uploader is retired: its connection
closes, and the SCP session on the remote removes its temporary file when it reads the end
of its input); with SFTP, whose server keeps what was written, the temporary file is removed
over a new connection. A second Ctrl-C ends at once.

This module writes only to the streams cli.py hands it.
"""

from __future__ import annotations

import collections
import os
import posixpath
import queue
import signal
import stat
import string
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import paramiko

from scpd.config import Config, Target, Watch, remote_dir_for
from scpd.errors import (
    ConnectError,
    FileChangedError,
    PermanentError,
    RetryableError,
    ScpdError,
)
from scpd.fileversion import FileVersion
from scpd.logs import human_bytes, printable
from scpd.pool import backoff_seconds
from scpd.scanner import file_type_name
from scpd.transport import (
    Credentials,
    Throttle,
    TokenBucket,
    Uploader,
    load_credentials,
    open_uploader,
)
from scpd.transport.base import LocalFile
from scpd.transport.sftp import SftpUploader

EXIT_SENT = 0
EXIT_FAILED = 1

_MAX_ATTEMPTS = 3
_REDRAW_SECONDS = 0.1  # the progress line is drawn at most ten times a second
_RATE_WINDOW_SECONDS = 3.0  # the rate shown is that of the last few seconds
_MIN_RATE_SPAN_SECONDS = 0.3  # before that much of a file has gone, no rate (nor ETA) yet
_JOIN_SECONDS = 5.0  # for the transfer thread to end once cut
_FALLBACK_COLUMNS = 80  # a terminal that does not say its width (a fresh pty says 0)
_MIN_NAME_COLUMNS = 12


class SendUsageError(ScpdError):
    """A command line that send cannot act on (cli.py: one line, exit 64)."""


@dataclass(frozen=True)
class Item:
    """One file to send. shown: its name as the operator gave it (or as found below a
    directory given), made printable."""

    shown: str
    local_path: str
    remote_path: str
    base: str


@dataclass(frozen=True)
class Sent:
    version: FileVersion
    seconds: float  # of the attempt that landed it


@dataclass(frozen=True)
class Failed:
    error: ScpdError
    detail: str = ""  # "3 attempts", "not tried", ...


def send_files(cfg: Config, target_name: str, files: list[str], *, remote_dir: str | None,
               is_recursive: bool, is_quiet: bool, out: TextIO, err: TextIO) -> int:
    """Send `files` to the target now. 0: all sent; 1: some not; 128 + N: stopped by signal
    N. Raises SendUsageError for a command line it cannot act on (before sending anything),
    ConfigError for the target's credentials."""
    target = cfg.targets.get(target_name)
    if target is None:
        defined = ", ".join(printable(name) for name in sorted(cfg.targets))
        raise SendUsageError(f'unknown target "{printable(target_name)}" (defined: {defined})')
    if remote_dir is not None and (not remote_dir or "\n" in remote_dir or "\0" in remote_dir):
        raise SendUsageError("--remote-dir must be a path, without a newline or NUL")
    credentials = load_credentials(target)
    plan = _Plan(cfg, target, remote_dir)
    for name in files:
        plan.add(name, is_recursive=is_recursive)
    display = _Display(out, err, is_quiet=is_quiet)
    for line in plan.lines:
        display.say(line)
    if not plan.items:
        return EXIT_FAILED if plan.failures else EXIT_SENT
    buckets = [TokenBucket(rate) for rate in (target.rate_bytes_per_second,
                                              cfg.rate_bytes_per_second) if rate]
    uploader = open_uploader(target, credentials, Throttle(buckets))
    try:
        failed = _run(_Transfer(uploader, target, plan.items), display, target, credentials)
    finally:
        uploader.close()
    if isinstance(failed, _Stopped):
        return 128 + failed.signum
    return EXIT_FAILED if failed or plan.failures else EXIT_SENT


# -- where each file goes -------------------------------------------------------------------


class _Plan:
    """The files of the command line, each with its remote path; the lines to say about
    those that cannot go (failures) or were skipped below a directory (notes)."""

    def __init__(self, cfg: Config, target: Target, remote_dir: str | None):
        self.target = target
        self.remote_dir = remote_dir
        # The daemon sends a file of a watch to that watch's targets only.
        self.watches = [(w, os.path.realpath(w.path)) for w in cfg.watches
                        if target.name in w.targets]
        self.items: list[Item] = []
        self.lines: list[str] = []
        self.failures = 0
        self._local_by_remote: dict[str, tuple[str, str]] = {}  # -> (local path, shown)
        self._any_watch = cfg.watches[0]  # a config has at least one

    def fail(self, line: str) -> None:
        self.lines.append(line)
        self.failures += 1

    def add(self, name: str, *, is_recursive: bool) -> None:
        shown = printable(name)
        try:
            st = os.lstat(name)
        except OSError as exc:
            self.fail(f"{shown}: {exc.strerror}; not sent")
            return
        if stat.S_ISDIR(st.st_mode):
            if not is_recursive:
                self.fail(f"{shown} is a directory; not sent (use -r to send the files below"
                          " it)")
                return
            real = os.path.realpath(name)
            self._add_tree(real, name, os.path.basename(real))
        elif stat.S_ISREG(st.st_mode):
            # The directories leading to it resolved (a ".." after a link too, as the kernel
            # does), the file itself as it is: never a link.
            parent, base_name = os.path.split(name)
            local = os.path.join(os.path.realpath(parent or "."), base_name)
            self._add_file(local, shown, base_name)
        else:
            hint = "name the file it leads to" if stat.S_ISLNK(st.st_mode) else \
                "only regular files are sent"
            self.fail(f"{shown} is {file_type_name(st.st_mode)}; not sent ({hint})")

    def _add_tree(self, root: str, shown_root: str, rel_root: str) -> None:
        """Every regular file below root, depth first, in name order."""
        stack = [(root, shown_root, rel_root)]
        while stack:
            directory, shown_dir, rel_dir = stack.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as exc:
                self.fail(f"cannot list {printable(shown_dir)}: {exc.strerror}; the files below"
                          " it are not sent")
                continue
            below = []
            for entry in entries:
                shown = printable(os.path.join(shown_dir, entry.name))
                rel = posixpath.join(rel_dir, entry.name)
                try:
                    mode = entry.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue  # gone since it was listed
                if stat.S_ISDIR(mode):
                    below.append((entry.path, os.path.join(shown_dir, entry.name), rel))
                elif stat.S_ISREG(mode):
                    self._add_file(entry.path, shown, rel)
                else:
                    self.lines.append(f"skipped {shown}: {file_type_name(mode)} (only"
                                      " regular files are sent; links are not followed)")
            stack.extend(reversed(below))

    def _add_file(self, local: str, shown: str, rel_elsewhere: str) -> None:
        try:  # said now, not after a login; the transport opens it again, just as carefully
            os.close(os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            self.fail(f"cannot read {shown}: {exc.strerror}; not sent")
            return
        placed = self._in_watch(local)
        if placed is not None:
            watch, rel = placed
            base = self.remote_dir or remote_dir_for(self.target, watch)
        else:
            rel = rel_elsewhere
            base = self.remote_dir or self._remote_dir_without_watch(shown)
        remote = posixpath.join(base, rel)
        earlier = self._local_by_remote.get(remote)
        if earlier is not None:
            if earlier[0] != local:
                self.fail(f"{shown}: {earlier[1]} goes to {self.target.name}:{printable(remote)}"
                          " already; not sent")
            return  # the same file named twice goes once
        self._local_by_remote[remote] = (local, shown)
        self.items.append(Item(shown, local, remote, base))

    def _in_watch(self, local: str) -> tuple[Watch, str] | None:
        """The innermost watch sending to the target that holds local, and its path there."""
        holding = [(w, root) for w, root in self.watches if Path(local).is_relative_to(root)]
        if not holding:
            return None
        watch, root = max(holding, key=lambda pair: len(pair[1]))
        return watch, Path(local).relative_to(root).as_posix()

    def _remote_dir_without_watch(self, shown: str) -> str:
        target = self.target
        if "watch" in _placeholders(target.remote_dir):
            raise SendUsageError(
                f"{shown} is not in a watch that sends to {target.name}, and"
                f" targets.{target.name}.remote_dir ({printable(target.remote_dir)}) uses"
                " {watch}: say where it goes with --remote-dir DIR")
        return remote_dir_for(target, self._any_watch)  # without {watch}: any fills it alike


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# -- the transfer ---------------------------------------------------------------------------


class _Transfer(threading.Thread):
    """Sends the items one by one, in order; each outcome goes to `outcomes` when known."""

    def __init__(self, uploader: Uploader, target: Target, items: list[Item]):
        super().__init__(name="scpd-send", daemon=True)
        self.uploader = uploader
        self.target = target
        self.items = items
        self.outcomes: queue.Queue[tuple[Item, Sent | Failed]] = queue.Queue()
        self.current: Item | None = None  # the item being sent (read by the main thread)
        self.temp: str | None = None  # the remote temporary path of its latest attempt
        self.crash: Exception | None = None  # a bug, raised again by the main thread
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Cut the transfer: no more attempts, and the connection closes under it."""
        self._stopping.set()
        self.uploader.retire()

    def run(self) -> None:
        try:
            refusal = self._connect()
            for item in self.items:
                if self._stopping.is_set():
                    break
                self.current, self.temp = item, None
                outcome = refusal or self._send(item)
                self.outcomes.put((item, outcome))
                self.current = None  # no progress line for a file whose outcome is told
                if refusal is None and isinstance(outcome, Failed) and \
                        _refuses_every_file(outcome.error):
                    refusal = Failed(outcome.error, "not tried")
        except Exception as exc:  # noqa: BLE001 -- handed to the main thread, which raises it
            self.crash = exc

    def _connect(self) -> Failed | None:
        """Log in before the first file, so that its time is its transfer's. A failure that
        every file would meet (unreachable, refused) fails them all without a try each."""
        outcome = self._with_retries(self.uploader.prepare, noun="attempts to connect")
        if isinstance(outcome, Failed) and _refuses_every_file(outcome.error):
            return outcome
        return None  # another failure: the first file tries again, and says why

    def _send(self, item: Item) -> Sent | Failed:
        stale: list[str] = []  # where an earlier attempt wrote: the next one removes it

        def attempt() -> Sent:
            started = time.monotonic()
            version = self.uploader.upload(
                item.local_path, item.remote_path, stale_temp_path=stale[-1] if stale else None,
                note_temp=self._note_temp, base=item.base)
            return Sent(version, time.monotonic() - started)

        def note_failure() -> None:
            if self.temp is not None:
                stale.append(self.temp)

        return self._with_retries(attempt, note_failure)

    def _note_temp(self, temp: str) -> None:
        self.temp = temp

    def _with_retries(self, action: Callable[[], Sent | None],
                      after_failure: Callable[[], None] = lambda: None, *,
                      noun: str = "attempts") -> Sent | Failed | None:
        """action's result, or how it failed: retryable errors are tried again after the
        target's backoff, at most _MAX_ATTEMPTS times and within its io_timeout."""
        first_failure_at = None
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                return action()
            except ScpdError as error:
                after_failure()
                now = time.monotonic()
                first_failure_at = first_failure_at or now
                delay = backoff_seconds(self.target.retry, attempt - 1)
                if not isinstance(error, RetryableError | FileChangedError) or \
                        attempt == _MAX_ATTEMPTS or \
                        now + delay - first_failure_at > self.target.io_timeout_seconds or \
                        self._stopping.wait(delay):
                    return Failed(error, f"{attempt} {noun}" if attempt > 1 else "")
        raise AssertionError("unreachable: the last attempt returns")


def _refuses_every_file(error: ScpdError) -> bool:
    return isinstance(error, ConnectError) or (
        isinstance(error, PermanentError) and error.is_target_level)


@dataclass
class _Stopped:
    signum: int


class _SignalFlags:
    """Signal handlers only note the signal; the main loop acts on it."""

    def __init__(self) -> None:
        self.signums: list[int] = []

    def note(self, signum: int, frame: object) -> None:
        self.signums.append(signum)


def _run(transfer: _Transfer, display: _Display, target: Target, credentials: Credentials
         ) -> int | _Stopped:
    """Follow the transfer to its end, or to a signal's: the number of files that failed."""
    flags = _SignalFlags()
    previous = {signum: signal.signal(signum, flags.note)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    told, failed = 0, 0
    try:
        transfer.start()
        while not flags.signums:
            try:
                item, outcome = transfer.outcomes.get(timeout=_REDRAW_SECONDS)
            except queue.Empty:
                if not transfer.is_alive() and transfer.outcomes.empty():
                    break
                display.progress(transfer.current, transfer.uploader.sending)
                continue
            told += 1
            failed += display.outcome(item, outcome, target.name)
    finally:
        # As they were: a second Ctrl-C ends the clean-up below at once.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        display.clear()
    if flags.signums:
        return _stop(transfer, display, target, credentials, flags.signums[0], told)
    if transfer.crash is not None:
        raise transfer.crash
    return failed


def _stop(transfer: _Transfer, display: _Display, target: Target, credentials: Credentials,
          signum: int, told: int) -> _Stopped:
    """Cut the transfer and say what was not sent."""
    cut = transfer.current
    transfer.stop()
    transfer.join(_JOIN_SECONDS)
    has_cut_landed = False
    while not transfer.outcomes.empty():
        item, outcome = transfer.outcomes.get()
        if item is cut and isinstance(outcome, Failed):
            continue  # failed by the cut itself: said below
        told += 1
        has_cut_landed = has_cut_landed or item is cut
        display.outcome(item, outcome, target.name)
    temp = transfer.temp
    if cut is not None and not has_cut_landed and temp is not None and target.protocol == "sftp":
        # An SFTP server keeps what was written; an SCP session removes its own temporary
        # files when its input ends.
        _remove_remote(target, credentials, temp)
    unsent = len(transfer.items) - told
    if cut is not None and not has_cut_landed:
        more = f" ({unsent - 1} more file(s) not sent)" if unsent > 1 else ""
        what = f"{cut.shown} not sent{more}"
    else:
        what = f"{unsent} file(s) not sent"
    display.say(f"interrupted by {signal.Signals(signum).name}: {what}")
    return _Stopped(signum)


def _remove_remote(target: Target, credentials: Credentials, path: str) -> None:
    """Best effort, over a connection of its own: the cut one is gone."""
    uploader = open_uploader(target, credentials, Throttle([]))
    try:
        if isinstance(uploader, SftpUploader):
            uploader.client().remove(os.fsencode(path))
    except (ScpdError, OSError, EOFError, paramiko.SSHException):
        pass  # already gone, or the target unreachable: nothing more to do
    finally:
        uploader.close()


# -- what the operator sees -----------------------------------------------------------------


class _Display:
    """Errors and notes as `scpd: ` lines on err; a line per file sent on out (none with -q);
    on a terminal (err is one), a progress line on err, redrawn in place with a carriage
    return and spaces only: no escape sequences, so that no terminal is driven by them."""

    def __init__(self, out: TextIO, err: TextIO, *, is_quiet: bool):
        self.out, self.err, self.is_quiet = out, err, is_quiet
        self.is_terminal = not is_quiet and _is_terminal(err)
        self._drawn_columns = 0  # of the progress line on the screen now (0: none)
        self._drawn_text = ""
        self._item: Item | None = None
        self._local: LocalFile | None = None  # the uploader's file seen last for _item
        self._bytes = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def say(self, line: str) -> None:
        self.clear()
        # printable: a remote's message repeats the file name, control characters and all.
        self.err.write(f"scpd: {printable(line)}\n")
        self.err.flush()

    def outcome(self, item: Item, outcome: Sent | Failed, target_name: str) -> int:
        """Say what became of a file; 1 if it failed, else 0."""
        if isinstance(outcome, Failed):
            self.say(f"{item.shown} not sent to {target_name}: {outcome.error}"
                     + (f" ({outcome.detail})" if outcome.detail else ""))
            return 1
        if not self.is_quiet:
            self.clear()
            size, seconds = outcome.version.size, outcome.seconds
            self.out.write(f"sent {item.shown} to {target_name}:{printable(item.remote_path)}"
                           f" ({human_bytes(size)} in {human_seconds(seconds)},"
                           f" {human_bytes(size / max(seconds, 1e-6))}/s)\n")
            self.out.flush()
        return 0

    def progress(self, item: Item | None, local: LocalFile | None) -> None:
        """Redraw the progress line of item; local: the uploader's `sending` file now."""
        if not self.is_terminal or item is None:
            return
        now = time.monotonic()
        if item is not self._item:
            self._item, self._local, self._bytes = item, None, 0
            self._samples.clear()
        if local is not None and local.path == item.local_path:
            if local is not self._local:  # a new attempt starts from its first byte
                self._local, self._bytes = local, 0
                self._samples.clear()
            self._bytes = max(self._bytes, local.bytes_read)
            size = local.version.size
        elif self._local is not None:  # its bytes are out: landing (rename, times)
            size = self._local.version.size
        else:
            size = None  # not open yet: connecting, or making directories
        self._samples.append((now, self._bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW_SECONDS:
            self._samples.popleft()
        self._draw(progress_line(item.shown, self._bytes, size, self._rate(), self._columns()))

    def _rate(self) -> float | None:
        (first_at, first), (last_at, last) = self._samples[0], self._samples[-1]
        if last_at - first_at < _MIN_RATE_SPAN_SECONDS:
            return None
        return (last - first) / (last_at - first_at)

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.err.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return columns if columns > 0 else _FALLBACK_COLUMNS

    def _draw(self, text: str) -> None:
        if text == self._drawn_text:
            return
        columns = display_columns(text)
        self.err.write("\r" + text + " " * max(0, self._drawn_columns - columns))
        self.err.flush()
        self._drawn_text, self._drawn_columns = text, columns

    def clear(self) -> None:
        if self._drawn_columns:
            self.err.write("\r" + " " * self._drawn_columns + "\r")
            self.err.flush()
            self._drawn_columns, self._drawn_text = 0, ""


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_line(name: str, done: int, size: int | None, rate: float | None,
                  columns: int) -> str:
    """"report.pdf  1.2 MiB / 4.0 MiB  30%  512.0 KiB/s  ETA 0:05", fit to columns - 1 (a
    line that fills the last column wraps on some terminals, and \\r then redraws only the
    wrapped part): on a narrow one the name is shortened, then the sizes, the rate and the
    ETA left out. name must be printable."""
    if size is None:
        tails = ["  starting", ""]
    else:
        percent = f"{100 * done // size if size else 100}%"
        speed = f"{human_bytes(rate)}/s" if rate is not None else "--/s"
        eta = f"ETA {human_clock((size - done) / rate)}" if rate else "ETA --:--"
        sizes = f"{human_bytes(done)} / {human_bytes(size)}"
        tails = [f"  {sizes}  {percent}  {speed}  {eta}", f"  {percent}  {speed}  {eta}",
                 f"  {percent}  {eta}", f"  {percent}"]
    for tail in tails:
        room = columns - 1 - display_columns(tail)
        if room >= _MIN_NAME_COLUMNS or tail is tails[-1]:
            return shortened(shortened(name, max(room, 4)) + tail, max(columns - 1, 1))
    raise AssertionError("unreachable: the last tail returns")


# -- text -----------------------------------------------------------------------------------


def display_columns(text: str) -> int:
    """Terminal columns of printable text: wide (East Asian) characters take two, combining
    marks none."""
    return sum(0 if unicodedata.combining(ch) else
               2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def shortened(text: str, columns: int) -> str:
    """text in at most `columns` columns, its middle left out ("long...name.pdf")."""
    if display_columns(text) <= columns:
        return text
    head, tail = [], []
    room = columns - 3
    for ch in text:  # the start, up to half the room
        if display_columns("".join(head) + ch) > room // 2:
            break
        head.append(ch)
    room -= display_columns("".join(head))
    for ch in reversed(text):
        if display_columns("".join(tail) + ch) > room:
            break
        tail.append(ch)
    return "".join(head) + "..." + "".join(reversed(tail))


def human_seconds(seconds: float) -> str:
    """"0.04s", "2.1s", "1m05s", "2h03m"."""
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def human_clock(seconds: float) -> str:
    """An ETA: "0:05", "12:40", "3:02:10"."""
    seconds = int(seconds + 0.5)
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d}"
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
