"""make bench: scpd's transfers side by side with OpenSSH scp (and rsync), through one sshd.

One throwaway OpenSSH sshd on 127.0.0.1 (tools/sshd.py) receives everything: all traffic is
loopback, and the "remote" is a directory of this machine, on the same disk as the sources.
Warm page cache: every source is written just before it is sent and nothing is dropped (dirty
pages are flushed with sync() between runs, so that one run's writeback does not slow the
next). Four sections, in this order (--only picks some):

  bulk     one file of 1 GiB (an 8 MiB os.urandom block, repeated). scpd: `scpd run --once` on
           a watch that holds only that file (mtime set back a minute: ready on sight), fresh
           queue each run, timed from start to exit (exit 0 required, remote size checked;
           sha256 too with --verify). Against `scp` (OpenSSH's default cipher), `scp -c
           aes128-gcm@openssh.com` and `rsync -a -e ssh`. Each tool --repeat times, interleaved;
           the best run (shortest wall time) of each is reported. MB/s is 10^6 bytes per
           second. CPU (user+sys) and peak RSS come from os.wait4 on the tool's process, so
           they include the children it waited for (scp's and rsync's ssh); sshd's side is not
           counted for anyone.
  small    5,000 files of 4 KiB in 10 subdirectories of 500 (the subdirectories exist, and are
           watched, before the clock starts). A running `scpd run` (ready, start-up scan done);
           this process writes the files (open/write/close) and the clock runs from the first
           write until every file is under its final name at the remote (polled every 50 ms).
           Then the same tree with one `scp -r`, one `rsync -a -e ssh`, and one `scp` process
           per file (the first 100 files, extrapolated), each timed as a whole process.
  latency  a running daemon (settle "2s": the quiet period only applies to files never
           closed). One warm-up file (it also opens the connection; reported apart), then 200
           files of 4 KiB at a steady 20 files/s on a fixed schedule. Latency is from just after
           close() to the moment the final name appears at the remote: scpd publishes by
           rename, seen by inotify (watchdog's InotifyObserver; the time is taken in its
           handler, so watchdog's dispatch delay is counted against scpd).
  caps     the target's bandwidth_limit at 1, 10 and 50 MB/s (MB = 10^6 bytes, as scpd parses
           it), one file of 25 s at the cap sent by `run --once`. The remote temporary file
           (.NAME.*.scpd-part) is stat'ed every 20 ms, and its creation (0 bytes) is taken
           from inotify. From those samples: the rate over every 10 s window (sliding, from
           the first byte to the end of the file; no partial window), lowest and highest as %
           of the cap; and the worst burst, the most bytes beyond the cap between any two
           samples, in seconds of the cap. The remote file lags what scpd sent by the socket
           and SSH buffers; it is what a reader of the remote sees.

Peak RSS of the daemon is VmHWM from /proc/PID/status just before SIGTERM (RSS in MiB).

Prints a Markdown table (scpd, OpenSSH scp, ratio, rsync, the issue's target with PASS/FAIL)
and the machine, and writes the same as JSON (bench/results.json, or --json PATH). Exit 1 if
a section could not be measured; a missed target is reported, not an error. --quick: smaller
sizes (256 MiB, 500 files, only the 10 MB/s cap for 15 s), a minute or two in all; the full
run takes two to three minutes. --keep DIR keeps the logs, configs and queues.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watchdog.events import FileSystemEvent, FileSystemEventHandler  # noqa: E402
from watchdog.observers.inotify import InotifyObserver  # noqa: E402

from tools.harness import scpd_config_text, wait_until  # noqa: E402
from tools.sshd import ThrowawaySshd  # noqa: E402

MB = 10**6
MiB = 2**20
GiB = 2**30
SECTIONS = ("bulk", "small", "latency", "caps")
# A journald that is not there would swallow the log this bench reads.
ENV = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
HAVE_RSYNC = shutil.which("rsync") is not None
POLL_SECONDS = 0.05          # the small-file section's look at the remote
SAMPLE_SECONDS = 0.02        # the caps section's stat of the growing temporary file
WINDOW_SECONDS = 10.0
PER_FILE_SCP_SAMPLE = 100
READY_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30
SCAN_DONE = re.compile(r"scan of watch outbox: ")
PROBLEM_LINE = re.compile(r"^\d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL) |^Traceback")

# The targets.
TARGET_VS_SCP = 1.1          # bulk MB/s, x OpenSSH scp with its default cipher
TARGET_VS_SCP_GCM = 0.9      # bulk MB/s, x scp -c aes128-gcm@openssh.com
TARGET_CPU_PER_GIB = 2.2     # client CPU seconds per GiB
TARGET_VS_SCP_R = 2.5        # small files/s, x one scp -r
TARGET_VS_RSYNC = 1.1        # small files/s, x rsync -a
TARGET_P50_MS = 20
TARGET_P99_MS = 100
TARGET_CAP_PERCENT = 5       # every 10 s window within this of the cap
TARGET_BURST_SECONDS = 0.25  # of the cap
TARGET_RSS_MB = 60

LIVE: set[subprocess.Popen[bytes]] = set()  # children still to be ended on the way out


class BenchError(RuntimeError):
    """A section could not be measured: a tool failed, or a wait ran out."""


# -- processes ------------------------------------------------------------------------------------


def scpd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "scpd", *args]


def _dies_with_us(command: list[str]) -> list[str]:
    """If this bench is killed outright, the kernel ends the child too (setpriv execs, so the
    pid, CPU time and RSS are the command's own)."""
    if shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "KILL", "--", *command]
    return command


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(_dies_with_us(command), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    LIVE.add(proc)
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def end_children() -> None:
    """Kill whatever child is still running (after an error or an interrupt)."""
    for proc in list(LIVE):
        _kill(proc)
        if proc.returncode is None:
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
    LIVE.clear()


@dataclass
class Measured:
    wall_s: float
    cpu_s: float          # user + sys, with the children it waited for
    peak_rss_mb: float    # ru_maxrss: the largest of the process and those children
    exit_code: int


class Child:
    """A command reaped by os.wait4 on a thread (so that every wait has a timeout): its wall
    time from just before the fork, its CPU and its peak RSS."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command, self.log_path = command, log_path
        self.started = time.monotonic()
        self.proc = _spawn(command, log_path)
        self._reaped: tuple[float, int, Any] | None = None
        self._waiter = threading.Thread(target=self._reap, daemon=True)
        self._waiter.start()

    def _reap(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self._reaped = (time.monotonic(), status, usage)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        LIVE.discard(self.proc)

    @property
    def is_running(self) -> bool:
        return self._waiter.is_alive()

    def finish(self, timeout: float) -> Measured:
        self._waiter.join(timeout)
        if self._reaped is None:
            _kill(self.proc)
            self._waiter.join(STOP_TIMEOUT_SECONDS)
            raise BenchError(f"{shlex.join(self.command)} still running after {timeout:.0f}s"
                             f" (killed); {log_tail(self.log_path)}")
        ended, status, usage = self._reaped
        return Measured(wall_s=ended - self.started, cpu_s=usage.ru_utime + usage.ru_stime,
                        peak_rss_mb=usage.ru_maxrss / 1024,
                        exit_code=os.waitstatus_to_exitcode(status))


def run_measured(command: list[str], log_path: Path, timeout: float) -> Measured:
    """Run to the end (exit 0 required) and measure."""
    measured = Child(command, log_path).finish(timeout)
    if measured.exit_code != 0:
        raise BenchError(f"{shlex.join(command)} exited {measured.exit_code};"
                         f" {log_tail(log_path)}")
    return measured


def log_tail(log_path: Path, lines: int = 5) -> str:
    text = log_path.read_text(errors="replace").strip() if log_path.exists() else ""
    return "its log: " + (" | ".join(text.splitlines()[-lines:]) or "(empty)")


def log_problems(log_path: Path) -> list[str]:
    """scpd's WARNING and ERROR lines (and tracebacks) in a log."""
    if not log_path.exists():
        return []
    text = log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if PROBLEM_LINE.search(line)]


class Daemon:
    """`scpd run` in the background, its stderr in a log file; stopped with SIGTERM."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.exit_code: int | None = None  # after stop(); None if it had to be killed
        self.proc = _spawn(scpd_command("run", "-c", str(config)), log_path)

    def wait_ready(self) -> None:
        """Until it says ready and its start-up scan is done."""
        def is_ready() -> bool:
            text = self.log_path.read_text(errors="replace")
            return ("scpd ready" in text and SCAN_DONE.search(text) is not None) \
                or self.proc.poll() is not None

        if not wait_until(is_ready, READY_TIMEOUT_SECONDS, poll=0.05):
            raise BenchError(f"scpd not ready after {READY_TIMEOUT_SECONDS}s;"
                             f" {log_tail(self.log_path)}")
        if self.proc.poll() is not None:
            raise BenchError(f"scpd exited {self.proc.returncode} while starting;"
                             f" {log_tail(self.log_path)}")

    def cpu_seconds(self) -> float:
        """user + sys so far (from /proc/PID/stat)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        utime, stime = stat[stat.rindex(")") + 2:].split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise BenchError("no VmHWM in /proc/PID/status")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.exit_code = self.proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_SECONDS)
        LIVE.discard(self.proc)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- the site: sshd, keys, commands -----------------------------------------------------------


@dataclass
class Site:
    """The throwaway sshd and what reaches it: keys, known_hosts, the remote directory."""

    work: Path
    sshd: ThrowawaySshd
    known_hosts: Path

    @property
    def remote(self) -> Path:
        return self.work / "remote"

    @property
    def login(self) -> str:
        return f"{self.sshd.user}@127.0.0.1"

    def ssh_options(self) -> list[str]:
        # -F /dev/null: no ~/.ssh/config or /etc/ssh/ssh_config changes what is measured.
        return ["-F", "/dev/null", "-i", str(self.sshd.client_key),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes"]

    def scp(self, sources: Iterable[Path], remote_dir: Path, *flags: str) -> list[str]:
        return ["scp", "-q", *flags, "-P", str(self.sshd.port), *self.ssh_options(),
                *map(str, sources), f"{self.login}:{remote_dir}/"]

    def rsync(self, source: str, remote_dir: Path) -> list[str]:
        ssh = shlex.join(["ssh", "-p", str(self.sshd.port), *self.ssh_options()])
        return ["rsync", "-a", "-e", ssh, source, f"{self.login}:{remote_dir}/"]

    def scpd_config(self, name: str, watch_dir: Path, remote_dir: Path, *,
                    target_extra: str = "", settle: str | None = None) -> Path:
        """A config with a fresh queue (state_dir) of its own."""
        state_dir = self.work / "state" / name
        shutil.rmtree(state_dir, ignore_errors=True)
        text = scpd_config_text(self.sshd, self.known_hosts, remote_dir, watch_dir, state_dir,
                                target_extra=target_extra)
        if settle is not None:
            default = 'settle = "300ms"'
            assert default in text, "tools.harness.scpd_config_text changed its settle"
            text = text.replace(default, f'settle = "{settle}"')
        path = self.work / f"{name}.toml"
        path.write_text(text)
        return path

    def log(self, name: str) -> Path:
        (self.work / "logs").mkdir(exist_ok=True)
        return self.work / "logs" / f"{name}.log"


# -- files --------------------------------------------------------------------------------------


def write_random_file(path: Path, size: int) -> None:
    """size bytes of an 8 MiB os.urandom block, repeated; mtime a minute ago (settled)."""
    block = memoryview(os.urandom(8 * MiB))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[:size - offset])
    past = time.time() - 60
    os.utime(path, (past, past))
    os.sync()  # written back now, not during the first timed run


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_copy(path: Path, size: int, digest: str | None) -> None:
    if not path.is_file():
        there = sorted(os.listdir(path.parent)) if path.parent.is_dir() else "no directory"
        raise BenchError(f"{path} is not at the remote (there: {there})")
    if path.stat().st_size != size:
        raise BenchError(f"{path} has {path.stat().st_size} bytes, not {size}")
    if digest is not None and sha256_file(path) != digest:
        raise BenchError(f"{path}: sha256 differs from the source")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest rank."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


# -- 1. one large file ---------------------------------------------------------------------------


def bulk_tools() -> tuple[str, ...]:
    return ("scpd", "scp", "scp-gcm", "rsync") if HAVE_RSYNC else ("scpd", "scp", "scp-gcm")


def bench_bulk(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    size = args.bulk_mib * MiB
    source = site.work / "bulk" / "big.bin"
    write_random_file(source, size)
    digest = sha256_file(source) if args.verify else None
    runs: dict[str, list[Measured]] = {tool: [] for tool in bulk_tools()}
    for repeat in range(args.repeat):
        for tool, history in runs.items():
            history.append(send_bulk_once(site, tool, source, digest, f"{tool}-{repeat}"))
            progress(f"bulk {tool} run {repeat + 1}/{args.repeat}:"
                     f" {size / history[-1].wall_s / MB:.0f} MB/s,"
                     f" CPU {history[-1].cpu_s:.2f} s")
    source.unlink()
    best = {tool: min(ms, key=lambda m: m.wall_s) for tool, ms in runs.items()}
    scpd_logs = [site.log(f"bulk-scpd-{r}") for r in range(args.repeat)]
    return {
        "bytes": size, "repeat": args.repeat, "pick": "best (shortest wall time)",
        "verified_sha256": args.verify,
        "runs": {tool: [asdict(m) for m in ms] for tool, ms in runs.items()},
        "best": {tool: asdict(m) | {"mb_per_s": size / m.wall_s / MB}
                 for tool, m in best.items()},
        "scpd_log_problems": [line for log in scpd_logs for line in log_problems(log)],
    }


def bulk_timeout(size: int) -> float:
    return 120 + size / (5 * MB)


def send_bulk_once(site: Site, tool: str, source: Path, digest: str | None,
                   tag: str) -> Measured:
    size = source.stat().st_size
    remote_dir = site.remote / f"bulk-{tool}"
    remote_dir.mkdir(parents=True)
    try:
        command = bulk_command(site, tool, source, remote_dir, tag)
        measured = run_measured(command, site.log(f"bulk-{tag}"), bulk_timeout(size))
        try:
            check_copy(remote_dir / source.name, size, digest)
        except BenchError as exc:
            tail = log_tail(site.log(f"bulk-{tag}"))
            raise BenchError(f"{tool} exited 0 but {exc}; {tail}") from None
    finally:
        remove_tree(remote_dir)
    return measured


def bulk_command(site: Site, tool: str, source: Path, remote_dir: Path, tag: str) -> list[str]:
    if tool == "scpd":
        config = site.scpd_config(f"bulk-{tag}", source.parent, remote_dir)
        timeout = f"{bulk_timeout(source.stat().st_size):.0f}s"
        return scpd_command("run", "--once", "--timeout", timeout, "-c", str(config))
    if tool == "scp":
        return site.scp([source], remote_dir)
    if tool == "scp-gcm":
        return site.scp([source], remote_dir, "-c", "aes128-gcm@openssh.com")
    return site.rsync(str(source), remote_dir)


# -- 2. many small files -------------------------------------------------------------------------


def small_file_names(count: int, directories: int = 10) -> list[str]:
    """f00000.dat ... in d00..d09, in contiguous blocks (names unique across directories)."""
    return [f"d{i * directories // count:02d}/f{i:05d}.dat" for i in range(count)]


def write_small_files(root: Path, names: Iterable[str], size: int) -> None:
    data = bytearray(os.urandom(size))
    for index, name in enumerate(names):
        data[:8] = index.to_bytes(8, "big")  # no two files alike
        with open(root / name, "wb") as f:
            f.write(data)


class RemoteTally:
    """How many of the expected files are under their final names at the remote. A directory
    once complete is not listed again (listing 5,000 files every 50 ms would cost a core)."""

    def __init__(self, root: Path, names: Iterable[str]) -> None:
        self.root = root
        self.expected: dict[str, set[str]] = {}
        for name in names:
            directory, _, base = name.rpartition("/")
            self.expected.setdefault(directory, set()).add(base)
        self.found = dict.fromkeys(self.expected, 0)
        self.total = sum(len(names) for names in self.expected.values())

    def count(self) -> int:
        for directory, wanted in self.expected.items():
            if self.found[directory] < len(wanted):
                try:
                    present = set(os.listdir(self.root / directory))
                except FileNotFoundError:
                    continue
                self.found[directory] = len(wanted & present)
        return sum(self.found.values())

    def is_complete(self) -> bool:
        return self.count() == self.total


def small_timeout(count: int) -> float:
    return 60 + 0.1 * count


def bench_small(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    names = small_file_names(args.small_count)
    tree = site.work / "small"
    result: dict[str, Any] = {"files": len(names), "file_bytes": args.small_size,
                              "directories": len({n.split("/")[0] for n in names})}
    result["scpd"] = small_via_daemon(site, tree, names, args.small_size)
    progress(f"small scpd: {result['scpd']['files_per_s']:.0f} files/s")
    result["scp -r"] = small_via_scp_r(site, tree, names)
    progress(f"small scp -r: {result['scp -r']['files_per_s']:.0f} files/s")
    if HAVE_RSYNC:
        result["rsync"] = small_via_rsync(site, tree, names)
        progress(f"small rsync: {result['rsync']['files_per_s']:.0f} files/s")
    result["scp per file"] = small_via_scp_per_file(site, tree, names)
    progress(f"small scp per file: {result['scp per file']['files_per_s']:.1f} files/s")
    remove_tree(tree)
    return result


def small_via_daemon(site: Site, tree: Path, names: list[str], size: int) -> dict[str, Any]:
    remote_dir = site.remote / "small-scpd"
    for name in names:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
    config = site.scpd_config("small", tree, remote_dir)
    log_path = site.log("small-daemon")
    tally = RemoteTally(remote_dir, names)
    with Daemon(config, log_path) as daemon:
        daemon.wait_ready()
        cpu_before, started = daemon.cpu_seconds(), time.monotonic()
        write_small_files(tree, names, size)
        written_s = time.monotonic() - started
        wait_until(tally.is_complete, small_timeout(len(names)), poll=POLL_SECONDS)
        elapsed, cpu = time.monotonic() - started, daemon.cpu_seconds() - cpu_before
        peak = daemon.peak_rss_mb()
    if daemon.exit_code != 0:
        raise BenchError(f"scpd exited {daemon.exit_code} on SIGTERM; {log_tail(log_path)}")
    landed = tally.count()
    wrong_size = sum(1 for name in names
                     if (remote_dir / name).exists() and (remote_dir / name).stat().st_size != size)
    remove_tree(remote_dir)
    return {"landed": landed, "complete": landed == len(names), "elapsed_s": elapsed,
            "written_s": written_s, "files_per_s": landed / elapsed, "wrong_size": wrong_size,
            "cpu_s": cpu, "peak_rss_mb": peak, "log_problems": log_problems(log_path)}


def small_via_scp_r(site: Site, tree: Path, names: list[str]) -> dict[str, Any]:
    remote_dir = site.remote / "small-scp-r"
    remote_dir.mkdir(parents=True)
    command = site.scp([tree], remote_dir, "-r")
    return _small_by_one_command(site, command, "small-scp-r", remote_dir / tree.name, names)


def small_via_rsync(site: Site, tree: Path, names: list[str]) -> dict[str, Any]:
    remote_dir = site.remote / "small-rsync"
    remote_dir.mkdir(parents=True)
    command = site.rsync(f"{tree}/", remote_dir)
    return _small_by_one_command(site, command, "small-rsync", remote_dir, names)


def _small_by_one_command(site: Site, command: list[str], tag: str, landed_root: Path,
                          names: list[str]) -> dict[str, Any]:
    measured = run_measured(command, site.log(tag), small_timeout(len(names)))
    landed = RemoteTally(landed_root, names).count()
    remove_tree(site.remote / tag)
    if landed != len(names):
        raise BenchError(f"{tag}: {landed} of {len(names)} files at the remote")
    return asdict(measured) | {"files_per_s": len(names) / measured.wall_s}


def small_via_scp_per_file(site: Site, tree: Path, names: list[str]) -> dict[str, Any]:
    """One scp process per file, on the first files only; extrapolated to all."""
    sample = names[:PER_FILE_SCP_SAMPLE]
    remote_dir = site.remote / "small-scp-each"
    remote_dir.mkdir(parents=True)
    log_path = site.log("small-scp-each")
    wall = cpu = 0.0
    for name in sample:
        measured = run_measured(site.scp([tree / name], remote_dir), log_path, 60)
        wall, cpu = wall + measured.wall_s, cpu + measured.cpu_s
    landed = len(os.listdir(remote_dir))
    remove_tree(remote_dir)
    if landed != len(sample):
        raise BenchError(f"scp per file: {landed} of {len(sample)} files at the remote")
    rate = len(sample) / wall
    return {"timed_files": len(sample), "wall_s": wall, "cpu_s": cpu, "files_per_s": rate,
            "extrapolated_s": len(names) / rate}


# -- 3. latency from close to landed -------------------------------------------------------------


@contextlib.contextmanager
def inotify_on(directory: Path, handler: FileSystemEventHandler) -> Iterator[None]:
    """watchdog's InotifyObserver on one directory (not its subdirectories) meanwhile."""
    observer = InotifyObserver()
    observer.schedule(handler, str(directory), recursive=False)
    observer.start()
    try:
        yield
    finally:
        observer.stop()
        observer.join(STOP_TIMEOUT_SECONDS)


class LandingRecorder(FileSystemEventHandler):
    """When each final name appears at the remote: the moved-to of scpd's rename, or the close
    of a file written in place. (A creation is not a landing: it comes before the data.)"""

    def __init__(self) -> None:
        self.landed: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._note(os.fsdecode(event.dest_path))

    def on_closed(self, event: FileSystemEvent) -> None:
        self._note(os.fsdecode(event.src_path))

    def _note(self, path: str) -> None:
        now = time.monotonic()
        name = os.path.basename(path)
        if not name.startswith("."):
            with self._lock:
                self.landed.setdefault(name, now)

    def count(self, names: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for name in names if name in self.landed)


def bench_latency(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    watch_dir, remote_dir = site.work / "latency", site.remote / "latency"
    watch_dir.mkdir()
    remote_dir.mkdir(parents=True)
    config = site.scpd_config("latency", watch_dir, remote_dir, settle="2s")
    log_path = site.log("latency-daemon")
    names = [f"l{i:04d}.dat" for i in range(args.latency_count)]
    recorder = LandingRecorder()
    with inotify_on(remote_dir, recorder), Daemon(config, log_path) as daemon:
        daemon.wait_ready()
        warm_up_ms = land_one(watch_dir, "warmup.dat", recorder)
        closed, worst_lag = write_on_schedule(watch_dir, names, args.latency_rate)
        wait_until(lambda: recorder.count(names) == len(names), 30, poll=POLL_SECONDS)
        progress(f"latency: {recorder.count(names)}/{len(names)} landed")
        peak = daemon.peak_rss_mb()
    if daemon.exit_code != 0:
        raise BenchError(f"scpd exited {daemon.exit_code} on SIGTERM; {log_tail(log_path)}")
    in_order = [(recorder.landed[n] - closed[n]) * 1000 if n in recorder.landed else None
                for n in names]
    remove_tree(remote_dir)
    return latency_summary(sorted(x for x in in_order if x is not None), len(names),
                           args.latency_rate) | {
        "latencies_ms_in_write_order": in_order,
        "warm_up_ms": warm_up_ms, "schedule_worst_lag_ms": worst_lag * 1000,
        "peak_rss_mb": peak, "log_problems": log_problems(log_path)}


def land_one(watch_dir: Path, name: str, recorder: LandingRecorder) -> float | None:
    """Write one file and wait (30 s at most) for it to land; its latency in ms."""
    with open(watch_dir / name, "wb") as f:
        f.write(os.urandom(4096))
    closed = time.monotonic()
    if not wait_until(lambda: recorder.count([name]) == 1, 30, poll=0.01):
        return None
    return (recorder.landed[name] - closed) * 1000


def write_on_schedule(watch_dir: Path, names: list[str],
                      rate: float) -> tuple[dict[str, float], float]:
    """Write 4 KiB files at `rate` per second on a fixed schedule: the time each was closed,
    and how late the latest write was."""
    data = bytearray(os.urandom(4096))
    closed: dict[str, float] = {}
    start, worst_lag = time.monotonic() + 0.05, 0.0
    for index, name in enumerate(names):
        due = start + index / rate
        if (delay := due - time.monotonic()) > 0:
            time.sleep(delay)
        worst_lag = max(worst_lag, time.monotonic() - due)
        data[:8] = index.to_bytes(8, "big")
        with open(watch_dir / name, "wb") as f:
            f.write(data)
        closed[name] = time.monotonic()
    return closed, worst_lag


def latency_summary(latencies: list[float], sent: int, rate: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"files": sent, "rate_per_s": rate, "landed": len(latencies)}
    if latencies:
        summary |= {"p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
                    "max_ms": latencies[-1], "min_ms": latencies[0]}
    return summary


# -- 4. bandwidth caps ---------------------------------------------------------------------------


def bench_caps(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    per_cap = {}
    for cap in args.caps:
        c = per_cap[f"{cap:g}"] = bench_cap(site, cap, args.cap_seconds)
        progress(f"cap {cap:g} MB/s: 10 s windows {num(c['window_min_percent'], 1)}"
                 f" .. {num(c['window_max_percent'], 1)} %, burst {c['burst_s']:.3f} s")
    return {"per_cap": per_cap}


def bench_cap(site: Site, cap_mb: float, seconds: float) -> dict[str, Any]:
    rate, tag = cap_mb * MB, f"cap-{cap_mb:g}"
    size = int(rate * seconds)
    source = site.work / tag / "capped.bin"
    write_random_file(source, size)
    remote_dir = site.remote / tag
    remote_dir.mkdir(parents=True)
    config = site.scpd_config(tag, source.parent, remote_dir,
                              target_extra=f'bandwidth_limit = "{cap_mb:g}MB/s"')
    try:
        samples, temps, measured = send_sampled(config, remote_dir, source.name,
                                                site.log(tag), 2 * seconds + 60)
        if measured.exit_code != 0:
            raise BenchError(f"scpd run --once exited {measured.exit_code}")
        check_copy(remote_dir / source.name, size, None)
    except BenchError as exc:
        raise BenchError(f"{tag}: {exc}; {log_tail(site.log(tag))}") from None
    finally:
        remove_tree(remote_dir)
        remove_tree(source.parent)
    return analyse_cap(samples, rate, size) | {
        "cap_mb_per_s": cap_mb, "bytes": size, "wall_s": measured.wall_s,
        "cpu_s": measured.cpu_s, "peak_rss_mb": measured.peak_rss_mb,
        "temporary_files_seen": temps, "log_problems": log_problems(site.log(tag))}


def send_sampled(config: Path, remote_dir: Path, name: str, log_path: Path,
                 timeout: float) -> tuple[list[tuple[float, int]], list[str], Measured]:
    """`scpd run --once` while the remote temporary file's size is sampled."""
    creation = TempCreationRecorder(name)
    with inotify_on(remote_dir, creation):
        child = Child(scpd_command("run", "--once", "--timeout", f"{timeout:.0f}s", "-c",
                                   str(config)), log_path)
        samples, temps = sample_temp_growth(remote_dir, name, lambda: child.is_running,
                                            timeout)
        measured = child.finish(STOP_TIMEOUT_SECONDS)
    if creation.created_at is not None and (not samples or creation.created_at < samples[0][0]):
        samples.insert(0, (creation.created_at, 0))  # empty when created: a sample of 0 bytes
    return samples, temps, measured


class TempCreationRecorder(FileSystemEventHandler):
    """When the temporary file of `name` is created at the remote: scp's sink creates it
    before the first byte, so it is a sample of 0 bytes that polling alone may miss."""

    def __init__(self, name: str) -> None:
        self.prefix = f".{name}."
        self.created_at: float | None = None

    def on_created(self, event: FileSystemEvent) -> None:
        now = time.monotonic()
        base = os.path.basename(os.fsdecode(event.src_path))
        if self.created_at is None and base.startswith(self.prefix) \
                and base.endswith(".scpd-part"):
            self.created_at = now


def sample_temp_growth(remote_dir: Path, name: str, is_running: Callable[[], bool],
                       timeout: float) -> tuple[list[tuple[float, int]], list[str]]:
    """(time, size) of the remote .NAME.*.scpd-part every SAMPLE_SECONDS, until it is renamed
    and the sender has exited; and the temporary names seen (more than one: a retry)."""
    samples: list[tuple[float, int]] = []
    temps: list[str] = []
    temp: Path | None = None
    deadline = next_at = time.monotonic()
    deadline += timeout
    while time.monotonic() < deadline:
        if temp is None and (temp := find_temp(remote_dir, name)) is not None:
            temps.append(temp.name)
        if temp is not None:
            now = time.monotonic()
            try:
                samples.append((now, temp.stat().st_size))
            except FileNotFoundError:
                temp = None
        if temp is None and not is_running():
            break
        next_at += SAMPLE_SECONDS
        time.sleep(max(0.0, next_at - time.monotonic()))
    return samples, temps


def find_temp(remote_dir: Path, name: str) -> Path | None:
    prefix = f".{name}."
    try:
        with os.scandir(remote_dir) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name.endswith(".scpd-part"):
                    return Path(entry.path)
    except FileNotFoundError:
        pass
    return None


def analyse_cap(samples: list[tuple[float, int]], rate: float, size: int) -> dict[str, Any]:
    first = next((i for i, (_, b) in enumerate(samples) if b > 0), None)
    if first is None:
        raise BenchError("no byte of the capped file was seen at the remote")
    end = next((i for i, (_, b) in enumerate(samples) if b >= size), len(samples) - 1)
    # Bursts count from the last sample before the first byte, when there is one.
    points = samples[max(first - 1, 0):end + 1]
    windows = window_rates(samples[first:end + 1], WINDOW_SECONDS)
    gaps = [b[0] - a[0] for a, b in pairwise(points)] or [0.0]
    (t0, b0), (t1, b1) = points[0], points[-1]
    burst_bytes, burst_from, burst_to = worst_burst(points, rate)
    return {
        "samples": len(points), "sample_interval_ms_median": statistics.median(gaps) * 1000,
        "sample_interval_ms_max": max(gaps) * 1000, "windows": len(windows),
        "window_min_percent": min(windows) / rate * 100 if windows else None,
        "window_max_percent": max(windows) / rate * 100 if windows else None,
        "mean_percent": (b1 - b0) / (t1 - t0) / rate * 100 if t1 > t0 else None,
        "burst_s": burst_bytes / rate, "burst_bytes": burst_bytes,
        "burst_between_s": (burst_from - t0, burst_to - t0),  # from the first sample
        "reached_full_size": samples[end][1] >= size,
        # Bytes already there at the first sample: a burst before it is not measured.
        "bytes_at_first_sample": points[0][1],
    }


def window_rates(points: list[tuple[float, int]], window: float) -> list[float]:
    """Bytes per second over every window of `window` seconds that starts at a sample and
    ends at the first sample at least that much later (none past the last sample)."""
    times = [t for t, _ in points]
    rates = []
    for i, (t, b) in enumerate(points):
        j = bisect.bisect_left(times, t + window, lo=i)
        if j == len(points):
            break
        rates.append((points[j][1] - b) / (points[j][0] - t))
    return rates


def worst_burst(points: list[tuple[float, int]],
                rate: float) -> tuple[float, float, float]:
    """max over sample pairs i < j of (bytes_j - bytes_i) - rate * (t_j - t_i), and t_i, t_j."""
    worst, lowest = (0.0, points[0][0], points[0][0]), (math.inf, points[0][0])
    for t, b in points:
        level = b - rate * t
        if level - lowest[0] > worst[0]:
            worst = (level - lowest[0], lowest[1], t)
        if level < lowest[0]:
            lowest = (level, t)
    return worst


# -- the table -----------------------------------------------------------------------------------

DASH = "—"


def num(value: float | None, digits: int = 0, unit: str = "") -> str:
    return DASH if value is None else f"{value:.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def row(measure: str, scpd: str, scp: str = DASH, ratio_text: str = DASH, rsync: str = DASH,
        target: str = DASH) -> dict[str, str]:
    return {"measure": measure, "scpd": scpd, "OpenSSH scp": scp, "ratio": ratio_text,
            "rsync": rsync, "target": target}


def size_label(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"


def bulk_rows(bulk: dict[str, Any]) -> list[dict[str, str]]:
    best, label = bulk["best"], size_label(bulk["bytes"])
    scpd, scp, gcm, rs = best["scpd"], best["scp"], best["scp-gcm"], best.get("rsync")
    pick = f"best of {bulk['repeat']}"
    vs_scp, vs_gcm = ratio(scpd["mb_per_s"], scp["mb_per_s"]), ratio(scpd["mb_per_s"],
                                                                     gcm["mb_per_s"])
    vs_rsync = ratio(scpd["mb_per_s"], rs and rs["mb_per_s"])
    per_gib = scpd["cpu_s"] / (bulk["bytes"] / GiB)
    rsync_rate = DASH if rs is None else f"{rs['mb_per_s']:.0f} (scpd {times(vs_rsync)})"
    return [
        row(f"{label} file, MB/s ({pick}, wall time)", num(scpd["mb_per_s"]),
            f"{scp['mb_per_s']:.0f} (default cipher)", times(vs_scp), rsync_rate,
            f"≥ {TARGET_VS_SCP}× scp: {verdict(at_least(vs_scp, TARGET_VS_SCP))}"),
        row(f"{label} file, MB/s vs scp -c aes128-gcm", num(scpd["mb_per_s"]),
            f"{gcm['mb_per_s']:.0f} (aes128-gcm)", times(vs_gcm), DASH,
            f"≥ {TARGET_VS_SCP_GCM}× scp-gcm: {verdict(at_least(vs_gcm, TARGET_VS_SCP_GCM))}"),
        row(f"{label} file, client CPU user+sys ({pick})",
            f"{scpd['cpu_s']:.2f} s ({per_gib:.2f} s/GiB)",
            f"{scp['cpu_s']:.2f} s (gcm {gcm['cpu_s']:.2f} s)",
            times(ratio(scpd["cpu_s"], scp["cpu_s"])), num(rs and rs["cpu_s"], 2, " s"),
            f"≤ {TARGET_CPU_PER_GIB} s/GiB: {verdict(at_most(per_gib, TARGET_CPU_PER_GIB))}"),
        row(f"{label} file, client peak RSS (run --once)", num(scpd["peak_rss_mb"], 0, " MB"),
            num(scp["peak_rss_mb"], 0, " MB"), times(ratio(scpd["peak_rss_mb"],
                                                           scp["peak_rss_mb"])),
            num(rs and rs["peak_rss_mb"], 0, " MB"),
            f"≤ {TARGET_RSS_MB} MB: {verdict(at_most(scpd['peak_rss_mb'], TARGET_RSS_MB))}"),
    ]


def small_rows(small: dict[str, Any]) -> list[dict[str, str]]:
    scpd, scp_r, rs, each = (small["scpd"], small["scp -r"], small.get("rsync"),
                             small["scp per file"])
    label = f"{small['files']} × {small['file_bytes'] / 1024:g} KiB in {small['directories']} dirs"
    rate = scpd["files_per_s"]
    shown = num(rate) if scpd["complete"] else (
        f"{rate:.0f} (only {scpd['landed']}/{small['files']} in {scpd['elapsed_s']:.0f} s)")
    if scpd["wrong_size"]:
        shown += f" ({scpd['wrong_size']} of the wrong size!)"
    vs_scp_r, vs_rsync = ratio(rate, scp_r["files_per_s"]), ratio(rate, rs and rs["files_per_s"])
    rsync_rate = DASH if rs is None else f"{rs['files_per_s']:.0f} (scpd {times(vs_rsync)})"
    targets = (f"≥ {TARGET_VS_SCP_R}× scp -r: {verdict(at_least(vs_scp_r, TARGET_VS_SCP_R))};"
               f" ≥ {TARGET_VS_RSYNC}× rsync: {verdict(at_least(vs_rsync, TARGET_VS_RSYNC))}")
    return [
        row(f"{label}, files/s (scpd: daemon, first write to all landed)", shown,
            f"{scp_r['files_per_s']:.0f} (one scp -r)", times(vs_scp_r), rsync_rate, targets),
        row(f"{label}, files/s vs one scp per file (first {each['timed_files']},"
            f" extrapolated: {each['extrapolated_s']:.0f} s)", num(rate),
            f"{each['files_per_s']:.1f} (scp per file)", times(ratio(rate, each["files_per_s"]))),
        row(f"{label}, client CPU user+sys (scpd: the daemon's, first write to all landed)",
            num(scpd["cpu_s"], 2, " s"), f"{scp_r['cpu_s']:.2f} s (one scp -r)",
            times(ratio(scpd["cpu_s"], scp_r["cpu_s"])), num(rs and rs["cpu_s"], 2, " s")),
        row(f"{label}, daemon peak RSS (VmHWM)", num(scpd["peak_rss_mb"], 0, " MB"),
            target=f"≤ {TARGET_RSS_MB} MB:"
                   f" {verdict(at_most(scpd['peak_rss_mb'], TARGET_RSS_MB))}"),
    ]


def latency_rows(lat: dict[str, Any]) -> list[dict[str, str]]:
    label = f"latency close → landed, {lat['files']} × 4 KiB at {lat['rate_per_s']:g}/s"
    return [
        row(f"{label}: p50", num(lat.get("p50_ms"), 1, " ms"),
            target=f"≤ {TARGET_P50_MS} ms: {verdict(at_most(lat.get('p50_ms'), TARGET_P50_MS))}"),
        row(f"{label}: p99", num(lat.get("p99_ms"), 1, " ms"),
            target=f"≤ {TARGET_P99_MS} ms: {verdict(at_most(lat.get('p99_ms'), TARGET_P99_MS))}"),
        row(f"{label}: max", num(lat.get("max_ms"), 1, " ms")),
        row(f"{label}: landed", f"{lat['landed']}/{lat['files']}",
            target=f"all: {verdict(lat['landed'] == lat['files'])}"),
        row("latency of the warm-up file (opens the connection)", num(lat["warm_up_ms"], 1, " ms")),
        row("latency daemon peak RSS (VmHWM)", num(lat["peak_rss_mb"], 0, " MB"),
            target=f"≤ {TARGET_RSS_MB} MB: {verdict(at_most(lat['peak_rss_mb'], TARGET_RSS_MB))}"),
    ]


def cap_rows(caps: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for cap, c in caps["per_cap"].items():
        label = f"cap {cap} MB/s ({c['bytes'] / MB:.0f} MB, run --once)"
        low, high = c["window_min_percent"], c["window_max_percent"]
        within = None if low is None else (abs(low - 100) <= TARGET_CAP_PERCENT
                                           and abs(high - 100) <= TARGET_CAP_PERCENT)
        rows.append(row(f"{label}: 10 s windows, min .. max % of cap ({c['windows']} windows)",
                        f"{num(low, 1)} .. {num(high, 1)} %",
                        target=f"within ±{TARGET_CAP_PERCENT}%: {verdict(within)}"))
        start, end = c["burst_between_s"]
        rows.append(row(f"{label}: worst burst, s of cap",
                        f"{c['burst_s']:.4f} s ({c['burst_bytes'] / MB:.3f} MB, from"
                        f" {start:.2f} s to {end:.2f} s after the first sample)",
                        target=f"≤ {TARGET_BURST_SECONDS} s:"
                               f" {verdict(at_most(c['burst_s'], TARGET_BURST_SECONDS))}"))
    return rows


ROW_BUILDERS = {"bulk": bulk_rows, "small": small_rows, "latency": latency_rows,
                "caps": cap_rows}


def table_rows(sections: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, result in sections.items():
        if "error" in result:
            rows.append(row(f"{name}: NOT MEASURED", result["error"][:200]))
        else:
            rows.extend(ROW_BUILDERS[name](result))
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h].replace("|", "/") for h in header) + " |" for r in rows]
    return "\n".join(lines)


def notes(sections: dict[str, Any]) -> list[str]:
    found = ["warm page cache; loopback only; the remote is a directory on the same disk",
             "OpenSSH scp 9.0 and later speaks the SFTP protocol by default (no -O given)",
             "scpd's wall and CPU times include starting the interpreter and its imports"]
    if "small" in sections and "error" not in sections["small"]:
        found.append(f"small: files landed seen by polling every {POLL_SECONDS * 1000:.0f} ms;"
                     " scp per file: the sum of the timed processes' wall times")
    if "latency" in sections and "error" not in sections["latency"]:
        found.append("latency: landing seen by inotify on the remote directory; the writes"
                     f" ran at most {sections['latency']['schedule_worst_lag_ms']:.1f} ms"
                     " behind their schedule")
    found.extend(cap_notes(sections.get("caps", {}).get("per_cap", {})))
    found.extend(f"scpd log: {line}" for line in all_log_problems(sections)[:10])
    return found


def cap_notes(per_cap: dict[str, Any]) -> list[str]:
    found = []
    for cap, c in per_cap.items():
        first = ("the first is the temporary file's creation (inotify)"
                 if c["bytes_at_first_sample"] == 0 else
                 f"{c['bytes_at_first_sample']} bytes already there at the first (a burst"
                 " before it is not seen)")
        found.append(
            f"cap {cap} MB/s: {c['samples']} samples of the remote temporary file's size,"
            f" interval median {c['sample_interval_ms_median']:.1f} ms, max"
            f" {c['sample_interval_ms_max']:.1f} ms; {first}; mean rate"
            f" {num(c['mean_percent'], 1)} % of cap; temporary files:"
            f" {len(c['temporary_files_seen'])}")
    if per_cap:
        found.append("caps: a burst seen at the remote also holds what was in flight at its"
                     " first sample (SSH channel window, 2 MiB by paramiko's default, and"
                     " socket buffers), on top of the token bucket's own burst (an eighth"
                     " of a second of the cap)")
    return found


def all_log_problems(sections: dict[str, Any]) -> list[str]:
    lines: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("log_problems", "scpd_log_problems"):
                    lines.extend(item)
                else:
                    walk(item)

    walk(sections)
    return lines


# -- the machine ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "paramiko": importlib.metadata.version("paramiko"),
        "openssh": _first_line(["ssh", "-V"]),
        "rsync": _first_line(["rsync", "--version"]) if HAVE_RSYNC else "not installed",
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    return " ".join(((done.stdout or done.stderr).strip().splitlines() or ["?"])[0].split())


def machine_line(m: dict[str, Any]) -> str:
    return (f"machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']},"
            f" paramiko {m['paramiko']}, {m['openssh']}, {m['rsync']}")


# -- main ----------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Site, argparse.Namespace], dict[str, Any]]] = {
    "bulk": bench_bulk, "small": bench_small, "latency": bench_latency, "caps": bench_caps}


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_sections(site: Site, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in args.only:
        started = time.monotonic()
        progress(f"{name} ...")
        try:
            results[name] = RUNNERS[name](site, args)
        except BenchError as exc:
            progress(f"{name}: NOT MEASURED: {exc}")
            results[name] = {"error": str(exc)}
        results[name]["section_s"] = time.monotonic() - started
        progress(f"{name} done in {results[name]['section_s']:.0f} s")
    return results


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scpd-bench-run-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        with ThrowawaySshd(work / "sshd") as sshd:
            try:
                site = Site(work, sshd, sshd.write_known_hosts(work / "known_hosts"))
                site.remote.mkdir()
                return run_sections(site, args)
            finally:
                end_children()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (256 MiB, 500 files, one 10 MB/s cap for 15 s)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"sections to run, comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each bulk transfer")
    parser.add_argument("--verify", action="store_true", help="sha256 of every bulk copy")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (new or empty) and keep it: logs, configs, queues")
    parser.add_argument("--bulk-mib", type=int, help="bulk file size (default 1024, quick 256)")
    parser.add_argument("--small-count", type=int, help="small files (default 5000, quick 500)")
    parser.add_argument("--small-size", type=int, default=4096)
    parser.add_argument("--latency-count", type=int, default=200)
    parser.add_argument("--latency-rate", type=float, default=20.0, help="files per second")
    parser.add_argument("--caps", help="MB/s, comma-separated (default 1,10,50; quick 10)")
    parser.add_argument("--cap-seconds", type=float, help="file size in seconds of its cap"
                        " (default 25, quick 15)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(args.only) - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    quick = args.quick
    args.bulk_mib = args.bulk_mib or (256 if quick else 1024)
    args.small_count = args.small_count or (500 if quick else 5000)
    args.caps = [float(c) for c in (args.caps or ("10" if quick else "1,10,50")).split(",")]
    args.cap_seconds = args.cap_seconds or (15.0 if quick else 25.0)
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: daemons, sshd and the temp dir are cleaned up


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()
    machine = machine_info()
    try:
        sections = run_all(args)
    except KeyboardInterrupt:
        progress("interrupted; children ended, work directory removed")
        return 130
    rows = table_rows(sections)
    found_notes = notes(sections)
    print(machine_line(machine))
    print()
    print(markdown(rows))
    print()
    for line in found_notes:
        print(f"- {line}")
    elapsed = time.monotonic() - started
    print(f"\ntotal {elapsed:.0f} s; JSON: {args.json}")
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"machine": machine, "options": options,
                                     "sections": sections, "table": rows,
                                     "notes": found_notes, "elapsed_s": elapsed}, indent=2) + "\n")
    return 1 if any("error" in s for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
