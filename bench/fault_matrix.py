"""make fault-matrix: scpd under faults (DESIGN.md section 4), one table row per fault.

Every scenario runs scpd as a subprocess against a throwaway sshd on 127.0.0.1 in a temporary
directory, polls the remote directory every 20 ms, and counts what the delivery promise
forbids: files lost, anything partial under a final name, and sends beyond one per version
that had to be sent. Exit 1 if anything was lost or partial, or a scenario broke.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.faultproxy import FaultProxy  # noqa: E402
from tools.harness import (  # noqa: E402
    private_mount_namespace_problem,
    private_tmpfs_launcher,
    scpd_config_text,
    wait_until,
)
from tools.sshd import ThrowawaySshd  # noqa: E402

MiB = 1024 * 1024
POLL_SECONDS = 0.02
PROTOCOLS = ("scp", "sftp")
SENT_LINE = re.compile(r"\bsent (\S+) to \S+:")  # "sent NAME to TARGET:PATH (...)"
# A journald that is not there would swallow the log this bench parses.
ENV = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()




def count_lines(log: str, needle: str) -> int:
    return sum(needle in line for line in log.splitlines())


@dataclass
class Row:
    fault: str
    protocol: str
    files: int = 0
    lost: int = 0
    partial: int = 0
    duplicates: int = 0
    notes: str = ""
    skipped: bool = False

    @property
    def is_bad(self) -> bool:
        return not self.skipped and (self.lost > 0 or self.partial > 0 or "ERROR" in self.notes)


class Daemon:
    """`scpd run` as a child; its stderr appended to the scenario's log file."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scpd", "run", "-c", str(config), *args],
                stdout=subprocess.DEVNULL, stderr=out, env=ENV)

    @property
    def has_exited(self) -> bool:
        return self.process.poll() is not None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        """Its exit code; None if it had to be killed after timeout seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


@dataclass
class World:
    """One scenario's sshd, config, watched directory and remote directory, and every
    version ever written to each source file (sha256, oldest first)."""

    base: Path
    sshd: ThrowawaySshd
    config: Path
    watch_dir: Path
    remote: Path  # as the sshd sees it
    log: Path
    proxy: FaultProxy | None = None
    is_namespaced: bool = False
    versions: dict[str, list[str]] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def view(self) -> Path:
        """The remote directory as this process sees it: through /proc/PID/root when sshd
        has its own mount namespace (cheap enough to poll, unlike nsenter)."""
        if self.is_namespaced:
            return Path(f"/proc/{self.sshd.pid}/root") / self.remote.relative_to("/")
        return self.remote

    def write(self, name: str, data: bytes, *, is_in_place: bool = False) -> None:
        # Recorded before the write: the poller may see the new version land at any moment.
        self.versions.setdefault(name, []).append(sha256(data))
        path = self.watch_dir / name
        if is_in_place:  # same inode, same size: only the mtime tells the versions apart
            with path.open("r+b") as f:
                f.write(data)
        else:
            path.write_bytes(data)

    def start_daemon(self, *args: str) -> Daemon:
        daemon = Daemon(self.config, self.log, *args)
        self.daemons.append(daemon)
        return daemon

    def run_once(self, timeout: str = "60s") -> int | None:
        return self.start_daemon("--once", "--timeout", timeout).wait(120)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def remote_digest(self, name: str) -> str | None:
        try:
            return sha256((self.view / name).read_bytes())
        except OSError:
            return None

    def temps(self) -> list[str]:
        try:
            return [e.name for e in os.scandir(self.view) if e.name.endswith(".scpd-part")]
        except OSError:
            return []

    def temp_sizes(self) -> dict[str, int]:
        """{name: size} of the temporary files now; one renamed meanwhile is left out."""
        sizes = {}
        for name in self.temps():
            try:
                sizes[name] = (self.view / name).stat().st_size
            except OSError:
                pass
        return sizes

    def landed(self) -> int:
        return sum(self.remote_digest(name) == v[-1] for name, v in self.versions.items())


@contextmanager
def world(protocol: str, target_extra: str = "", *, proxy: dict | None = None,
          tmpfs_size: str | None = None) -> Iterator[World]:
    """proxy: FaultProxy arguments, the target then reached through it; tmpfs_size: the
    remote directory on a tmpfs of that size in sshd's own mount namespace."""
    with tempfile.TemporaryDirectory(prefix="scpd-fault-matrix-") as tmp:
        base = Path(tmp)
        launcher, remote = None, base / "remote"
        if tmpfs_size:
            small = base / "small"
            small.mkdir()
            remote = small / "in"
            launcher = private_tmpfs_launcher(small, tmpfs_size)
        else:
            remote.mkdir()
        sshd = ThrowawaySshd(base / "sshd", launcher=launcher)
        sshd.start()
        fault_proxy, daemons = None, []
        try:
            if proxy is not None:
                fault_proxy = FaultProxy(sshd.port, **proxy)
            port = fault_proxy.port if fault_proxy is not None else sshd.port
            known_hosts = sshd.write_known_hosts(base / "known_hosts", port=port)
            w = World(base=base, sshd=sshd, config=base / "scpd.toml",
                      watch_dir=base / "outbox", remote=remote, log=base / "scpd.log",
                      proxy=fault_proxy, is_namespaced=bool(tmpfs_size), daemons=daemons)
            w.watch_dir.mkdir()
            w.config.write_text(scpd_config_text(
                sshd, known_hosts, remote, w.watch_dir, base / "state", port=port,
                target_extra=f'protocol = "{protocol}"\n{target_extra}'))
            yield w
        finally:
            for daemon in daemons:
                daemon.stop(signal.SIGKILL)
            if fault_proxy is not None:
                fault_proxy.close()
            sshd.stop()


class RemotePoller:
    """Polls the remote directory from its own thread and hashes every file that lands under
    a final name, so that a partial or mixed file is caught even if it lives for a moment."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.seen: dict[str, set[str]] = {}  # final name -> every digest found under it
        self.landings: Counter[str] = Counter()  # final name -> distinct inodes found under it
        self._keys: dict[str, tuple[int, int, int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remote-poller", daemon=True)

    def __enter__(self) -> RemotePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        try:
            entries = list(os.scandir(self.w.view))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat()
                # ctime too: an in-place rewrite that restores size and mtime still moves it.
                key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if self._keys.get(entry.name) == key:
                    continue
                digest = sha256(Path(entry.path).read_bytes())
            except OSError:
                continue  # replaced or gone between scandir and read: the next poll sees it
            if self._keys.get(entry.name, (None,))[0] != st.st_ino:
                self.landings[entry.name] += 1
            self._keys[entry.name] = key
            self.seen.setdefault(entry.name, set()).add(digest)

    def good_versions(self, name: str) -> int:
        return len(self.seen.get(name, set()) & set(self.w.versions.get(name, [])))

    def bad_sightings(self) -> int:
        """(name, digest) pairs under a final name that no version of the source ever had."""
        return sum(len(digests - set(self.w.versions.get(name, [])))
                   for name, digests in self.seen.items())


def make_row(fault: str, protocol: str, w: World, poller: RemotePoller, notes: list[str]) -> Row:
    # A cut SCP session removes its temporary file on the remote a moment after the cut.
    wait_until(lambda: not w.temps(), 3.0)
    poller.poll()
    log = w.log_text()
    leftovers = w.temps()
    sends = Counter(SENT_LINE.findall(log))
    # A version that landed whole was a send that had to happen, even if replaced later.
    duplicates = sum(max(0, sends[name] - max(1, poller.good_versions(name)))
                     for name in w.versions)
    relanded = sum(max(0, poller.landings[name] - max(1, poller.good_versions(name)))
                   for name in w.versions)
    if leftovers:
        notes.append(f"{len(leftovers)} .scpd-part left: {leftovers[:3]}")
    if bad := poller.bad_sightings():
        notes.append(f"{bad} foreign version(s) seen under a final name")
    if relanded:
        notes.append(f"{relanded} landed again unlogged")
    if "Traceback" in log:
        notes.append("ERROR: Traceback in the daemon log")
    return Row(fault, protocol, files=len(w.versions),
               lost=sum(w.remote_digest(name) != v[-1] for name, v in w.versions.items()),
               partial=poller.bad_sightings() + len(leftovers), duplicates=duplicates,
               notes="; ".join(notes))


# -- scenarios ----------------------------------------------------------------------------------


def kill_9_mid_stream(protocol: str) -> Row:
    # Four connections under a cap, so that transfers are in flight at every kill. SCP spends
    # ~100 ms per file in remote commands, its data only a few ms at 8 MiB/s: a lower cap
    # keeps its temporary files alive long enough for the kill to land inside one.
    cap = "2MiB/s" if protocol == "scp" else "8MiB/s"
    with world(protocol, f'connections = 4\nbandwidth_limit = "{cap}"') as w:
        rng = random.Random(1)
        for i in range(300):
            w.write(f"f{i:03d}.bin", rng.randbytes(rng.randint(20_000, 200_000)))
        kills = []
        with RemotePoller(w) as poller:
            for threshold in (60, 140, 220):
                daemon = w.start_daemon()
                wait_until(lambda t=threshold, d=daemon: len(poller.seen) >= t or d.has_exited,
                           30)
                wait_until(lambda: bool(w.temps()), 3)  # then the next moment data is moving
                in_flight = len(w.temps())
                daemon.stop(signal.SIGKILL)
                kills.append(f"{len(poller.seen)}/{in_flight}")
            returncode = w.run_once()
            return make_row("kill -9 mid-stream (x3)", protocol, w, poller, [
                f"cap {cap}; killed at landed/in-flight {', '.join(kills)}",
                f"then run --once exit {returncode}"])


def connection_cut(protocol: str, cut_after_bytes: int) -> Row:
    # The proxy cuts once, on the first connection only: the retry goes through untouched.
    with world(protocol, "connections = 1", proxy={"cut_after_bytes": cut_after_bytes}) as w:
        w.write("big.bin", random.randbytes(4 * MiB))
        with RemotePoller(w) as poller:
            returncode = w.run_once("30s")
        assert w.proxy is not None
        return make_row(f"cut after {cut_after_bytes / 1e6:g} MB (4 MiB file)", protocol,
                        w, poller, [
                            "cut" if w.proxy.has_cut else "ERROR: the proxy never cut",
                            f"{w.proxy.connections} connections",
                            f"{count_lines(w.log_text(), 'retrying in')} retries",
                            f"exit {returncode}"])


def sshd_down(protocol: str) -> Row:
    # A pass-through proxy in front of the down sshd counts every connection scpd tries.
    with world(protocol, proxy={}) as w:
        w.sshd.stop()
        with RemotePoller(w) as poller:
            daemon = w.start_daemon()
            went_down = time.monotonic()
            rng = random.Random(3)
            for i in range(100):
                w.write(f"f{i:03d}.bin", rng.randbytes(rng.randint(10_000, 50_000)))
                time.sleep(0.01)
            time.sleep(max(0.0, 4.0 - (time.monotonic() - went_down)))
            down_seconds = time.monotonic() - went_down
            assert w.proxy is not None
            attempts = w.proxy.connections
            retries = count_lines(w.log_text(), "retrying in")
            w.sshd.start()
            came_back = time.monotonic()
            is_done = wait_until(lambda: w.landed() == len(w.versions), 30)
            catch_up = time.monotonic() - came_back
            returncode = daemon.stop()
            return make_row("sshd down while 100 files arrive", protocol, w, poller, [
                f"down {down_seconds:.1f}s: {attempts} connections"
                f" ({attempts / down_seconds:.1f}/s), {retries} retry lines",
                f"all landed {catch_up:.1f}s after sshd came back" if is_done
                else "not all landed 30s after sshd came back",
                f"exit {returncode}"])


def remote_crash(protocol: str) -> Row:
    with world(protocol, 'connections = 2\nbandwidth_limit = "1MiB/s"') as w:
        w.write("big.bin", random.randbytes(3 * MiB))
        rng = random.Random(4)
        for i in range(20):
            w.write(f"small{i:02d}.bin", rng.randbytes(rng.randint(30_000, 120_000)))

        def big_is_mid_file() -> bool:
            return any(name.startswith(".big.bin") and size > 500_000
                       for name, size in w.temp_sizes().items())

        with RemotePoller(w) as poller:
            daemon = w.start_daemon()
            is_mid_file = wait_until(big_is_mid_file, 15)
            w.sshd.crash()
            left_by_crash = len(w.temps())
            saw_retry = wait_until(lambda: "retrying in" in w.log_text(), 10)
            w.sshd.start()
            wait_until(lambda: w.landed() == len(w.versions), 30)
            returncode = daemon.stop()
            return make_row("remote crash mid-file (3 MiB + 20 small)", protocol, w, poller, [
                "crashed mid big.bin" if is_mid_file else "ERROR: big.bin never mid-file",
                f"crash left {left_by_crash} .scpd-part",
                "retried" if saw_retry else "no retry line", f"exit {returncode}"])




def remote_disk_full(protocol: str) -> Row:
    fault = "remote disk full (1 MiB tmpfs, 1.5 MB + 5 small)"
    if reason := private_mount_namespace_problem():
        print(f"fault-matrix: skipping {fault} / {protocol}: {reason}", file=sys.stderr)
        return Row(fault, protocol, notes=f"skipped: {reason}", skipped=True)
    with world(protocol, "connections = 1", tmpfs_size="1m") as w:
        w.write("big.bin", random.randbytes(1_500_000))
        for i in range(5):
            w.write(f"small{i}.bin", random.randbytes(50_000))
        with RemotePoller(w) as poller:
            daemon = w.start_daemon()
            time.sleep(3)
            log = w.log_text()
            # SFTP v3 has no "disk full" status: OpenSSH's server answers a plain "Failure".
            errors = re.findall(r"big\.bin to local: (.*); retrying in", log)
            sent_before = "sent big.bin" in log
            remount = subprocess.run(
                ["nsenter", "-t", str(w.sshd.pid), "-m", "--", "mount", "-n", "-o",
                 "remount,size=8m", str(w.remote.parent)],
                capture_output=True, text=True, check=False)
            came_back = time.monotonic()
            wait_until(lambda: w.landed() == len(w.versions), 20)
            catch_up = time.monotonic() - came_back
            returncode = daemon.stop()
            return make_row(fault, protocol, w, poller, [
                f"big.bin retried {len(errors)}x while full"
                f" ({errors[0].replace(str(w.base), '…') if errors else 'no error logged'})",
                "ERROR: big.bin sent while full" if sent_before else "not sent while full",
                f"remount {'ok' if remount.returncode == 0 else 'failed: ' + remount.stderr}",
                f"all landed {catch_up:.1f}s after", f"exit {returncode}"])


def overwritten_mid_send(protocol: str) -> Row:
    names = [f"f{i}.bin" for i in range(10)]
    with world(protocol, 'connections = 2\nbandwidth_limit = "4MiB/s"') as w:
        for name in names:
            w.write(name, random.randbytes(2 * MiB))
        overwritten: dict[str, bool] = {}  # name -> whether it was caught mid-send

        def part_size(name: str) -> int:
            return max((size for t, size in w.temp_sizes().items()
                        if t.startswith(f".{name}.")), default=0)

        with RemotePoller(w) as poller:
            daemon = w.start_daemon()
            deadline = time.monotonic() + 40
            while len(overwritten) < len(names) and time.monotonic() < deadline:
                for name in names:
                    if name in overwritten:
                        continue
                    # A quarter of the file sent: well inside the upload, not at its edges.
                    is_mid_send = part_size(name) > MiB // 2 and name not in poller.seen
                    if is_mid_send or name in poller.seen:
                        w.write(name, random.randbytes(2 * MiB), is_in_place=True)
                        overwritten[name] = is_mid_send
                time.sleep(POLL_SECONDS)
            wait_until(lambda: w.landed() == len(w.versions), 30)
            returncode = daemon.stop()
            return make_row("overwritten mid-send (10 x 2 MiB, 4 MiB/s)", protocol, w, poller, [
                f"{sum(overwritten.values())}/{len(names)} overwritten mid-send",
                f"{count_lines(w.log_text(), 'changed while it was sent')} 'changed while sent'",
                f"exit {returncode}"])


SCENARIOS: list[partial[Row]] = [
    *(partial(kill_9_mid_stream, p) for p in PROTOCOLS),
    *(partial(connection_cut, p, n) for n in (200_000, 1_000_000, 3_000_000) for p in PROTOCOLS),
    *(partial(sshd_down, p) for p in PROTOCOLS),
    *(partial(remote_crash, p) for p in PROTOCOLS),
    *(partial(remote_disk_full, p) for p in PROTOCOLS),
    *(partial(overwritten_mid_send, p) for p in PROTOCOLS),
]


def table(rows: list[Row]) -> str:
    lines = ["| fault | protocol | files | lost | partial | duplicates | attempts/notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        counts = ["-"] * 4 if r.skipped else [r.files, r.lost, r.partial, r.duplicates]
        lines.append(f"| {r.fault} | {r.protocol} | {' | '.join(map(str, counts))} | {r.notes} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """argv: scenario function names to run (e.g. remote_crash); all when empty."""
    started = time.monotonic()
    rows = []
    for scenario in SCENARIOS:
        if argv and scenario.func.__name__ not in argv:
            continue
        t0 = time.monotonic()
        try:
            row = scenario()
        except Exception as exc:  # one broken scenario still leaves the others' rows
            row = Row(scenario.func.__name__, scenario.args[0],
                      notes=f"ERROR: {type(exc).__name__}: {exc}")
        rows.append(row)
        print(f"fault-matrix: {row.fault} / {row.protocol}: {time.monotonic() - t0:.1f}s",
              file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{len(rows)} runs in {time.monotonic() - started:.0f}s")
    return 1 if any(r.is_bad for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
