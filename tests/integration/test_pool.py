"""The worker pool and the SCP agent against a real sshd, scpd run as a subprocess: one login
and one remote agent per connection however many files and directories; a batch cut by the
network mid-stream; bandwidth caps shared by parallel workers and by targets; a dead target
beside a live one; hostile file names in one batch; files that change or shrink while their
batch is sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Setup, make_file, sha256, temp_files, wait_until, write_config

from tools.faultproxy import FaultProxy
from tools.harness import target_block
from tools.sshd import ThrowawaySshd, free_port

SENT_LINE = re.compile(r"\bsent (.+?) to \S+?:")  # "sent REL to TARGET:/remote/REL (...)"
OLD_NS = 1_600_000_000_000_000_000  # an mtime well in the past: ready on sight at start-up


# -- helpers --------------------------------------------------------------------------------------


class SshdLog:
    """What the session sshd logs from now on (LogLevel VERBOSE: one `Accepted publickey`
    line per login, one `Starting session: command` line per exec channel)."""

    def __init__(self, sshd: ThrowawaySshd):
        self.path = sshd.log
        self.offset = self.path.stat().st_size

    def text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def logins(self) -> int:
        return self.text().count("Accepted publickey for ")

    def sessions(self) -> int:
        """Exec channels: the remote agents."""
        return self.text().count("Starting session: command for ")

    def sftp_sessions(self) -> int:
        return self.text().count("Starting session: subsystem 'sftp'")


def set_option(s: Setup, key: str, value: str) -> None:
    """Replace the first `key = ...` line of the config (the target's, in write_config's)."""
    text = s.config.read_text()
    new, n = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text, count=1)
    assert n == 1, f"no {key} in the config"
    s.config.write_text(new)


def sent_names(log: str) -> list[str]:
    return SENT_LINE.findall(log)


def final_files(remote_dir: Path) -> dict[str, Path]:
    """Every non-hidden file under remote_dir, by path relative to it."""
    return {p.relative_to(remote_dir).as_posix(): p for p in remote_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def status_json(s: Setup) -> dict:
    result = s.scpd("status", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["targets"]


def job_states(state_dir: Path, target: str) -> dict[str, tuple[int, str]]:
    """{relative path: (job id, state)} of one target, read from the queue itself."""
    try:
        with contextlib.closing(sqlite3.connect(state_dir / "queue.sqlite3", timeout=5)) as db:
            rows = db.execute("SELECT rel_path, id, state FROM jobs WHERE target = ?",
                              (target,)).fetchall()
    except sqlite3.OperationalError:  # not made yet
        return {}
    return {os.fsdecode(rel): (job_id, state) for rel, job_id, state in rows}


def batch_order(s: Setup, count: int, target: str = "local") -> list[str]:
    """Relative paths of the target's jobs in claim order (all due at once: by id)."""
    assert wait_until(lambda: len(job_states(s.state_dir, target)) == count, 10.0)
    states = job_states(s.state_dir, target)
    return sorted(states, key=lambda rel: states[rel][0])


def old_file(path: Path, size: int, index: int = 0, *, mode: int = 0o644) -> Path:
    """A random file with an old mtime (microsecond digits fixed in number), so that the
    start-up scan queues it on sight and every file of a directory goes in one batch."""
    make_file(path, size)
    path.chmod(mode)
    ns = OLD_NS + 123_456_000 + index * 1_000_001_000
    os.utime(path, ns=(ns, ns))
    return path


def temps_gone(remote_dir: Path, seconds: float) -> list[Path]:
    """The temporary files still there after waiting up to `seconds` for none."""
    wait_until(lambda: not temp_files(remote_dir), seconds)
    return temp_files(remote_dir)


def multi_target_setup(tmp_path: Path, blocks: list[str], targets: list[str],
                       daemon_extra: str = "") -> Setup:
    watch_dir, state_dir = tmp_path / "outbox", tmp_path / "state"
    watch_dir.mkdir()
    config = tmp_path / "scpd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state_dir}"\n{daemon_extra}\n' + "".join(blocks)
                      + f'\n[[watch]]\nname = "outbox"\npath = "{watch_dir}"\n'
                        f"targets = {json.dumps(targets)}\nsettle = \"300ms\"\n")
    return Setup(config=config, watch_dir=watch_dir, remote_dir=tmp_path / "remote",
                 state_dir=state_dir)


# -- 1. connections are reused: one login and one agent per connection -----------------------------


@pytest.mark.parametrize("connections", [1, 2])
def test_many_small_files_in_several_directories_cost_one_login_per_connection(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        connections: int):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra=f"connections = {connections}")
    names = [f"dir-{d}/f-{i:03d}.txt" for d in range(5) for i in range(40)]
    digests = {}
    for index, name in enumerate(names):
        path = old_file(s.watch_dir / name, 100 + 37 * index % 1900, index)
        digests[name] = sha256(path)
    log = SshdLog(sshd)

    result = s.scpd("run", "--once", "--timeout", "30s", timeout=60)

    assert result.returncode == 0, result.stderr
    landed = final_files(remote_dir)
    assert sorted(landed) == sorted(names)
    for name, path in landed.items():
        assert sha256(path) == digests[name], name
    assert temps_gone(remote_dir, 3.0) == []
    assert sorted(sent_names(result.stderr)) == sorted(names)
    logins = log.logins()
    if connections == 1:
        assert logins == 1, log.text()
    else:
        assert 1 <= logins <= connections, log.text()
    # One long-lived agent per connection, not one exec per batch or per directory (and at
    # most one SFTP channel per connection, where renames go over SFTP).
    assert log.sessions() == logins, log.text()
    assert log.sftp_sessions() <= logins, log.text()


# -- 2. a batch cut by the network -------------------------------------------------------------

CUT_FILES = 50
CUT_FILE_BYTES = 20_000  # 1 MB in all: one batch (pool: at most 100 files, 1 MiB)


def cut_names() -> list[str]:
    return [f"file-{i:02d}.bin" for i in range(CUT_FILES)]


def cut_setup(base: Path, tag: str, sshd: ThrowawaySshd, proxy: FaultProxy) -> Setup:
    """A config through `proxy` whose remote directory is base/<tag>/remote: tags of equal
    length make every run send the same number of bytes."""
    root = base / tag
    root.mkdir()
    remote = root / "remote"
    remote.mkdir()
    known_hosts = sshd.write_known_hosts(root / "known_hosts", port=proxy.port)
    s = write_config(root, sshd, known_hosts, remote, port=proxy.port,
                     target_extra="connections = 1")
    for index, name in enumerate(cut_names()):
        old_file(s.watch_dir / name, CUT_FILE_BYTES, index)
    return s


@pytest.fixture(scope="module")
def cut_base(tmp_path_factory: pytest.TempPathFactory, sshd: ThrowawaySshd
             ) -> tuple[Path, int]:
    """A base directory, and the client-to-server bytes of delivering the batch whole
    through a proxy: the handshake and the agent (a few KB), the files, the renames."""
    base = tmp_path_factory.mktemp("cut")
    with FaultProxy(sshd.port) as proxy:
        s = cut_setup(base, "m0", sshd, proxy)
        result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: len(final_files(s.remote_dir)) == CUT_FILES, 2.0)
        time.sleep(0.2)  # the count is final once scpd has exited; be sure the pumps are done
        return base, proxy.upstream_bytes


CUT_POINTS = {
    # Upstream byte counts; what follows the data (E, then the renames: over the agent or
    # SFTP, a few KB) varies with the implementation, and by a KB or so from run to run,
    # as paramiko splits a write whenever the channel window runs low.
    "30pct": lambda total: int(total * 0.3),
    "60pct": lambda total: int(total * 0.6),
    # about 25 KB before the end: in the last file or two, the rest whole at the remote
    # under their temporary names
    "end_of_data": lambda total: total - 25_000,
    # about 2 KB before the end: in the renames (or the E record just before them)
    "in_publish": lambda total: total - 2_000,
}


@pytest.mark.parametrize("cut", list(CUT_POINTS))
def test_a_batch_cut_mid_stream_is_never_partial_and_lands_whole_exactly_once(
        cut_base: tuple[Path, int], sshd: ThrowawaySshd, cut: str):
    base, total = cut_base
    tag = {"30pct": "p1", "60pct": "p2", "end_of_data": "p3", "in_publish": "p4"}[cut]
    with FaultProxy(sshd.port) as proxy:
        s = cut_setup(base, tag, sshd, proxy)
        proxy.cut_after_bytes = CUT_POINTS[cut](total)
        assert 10_000 < proxy.cut_after_bytes < total
        # Retries far off: what the cut leaves can be looked at before a retry repairs it.
        set_option(s, "retry_initial", '"30s"')
        set_option(s, "retry_max", '"30s"')
        digests = {name: sha256(s.watch_dir / name) for name in cut_names()}
        seen_partial: list[str] = []

        def look_while_cut() -> bool:
            for name, path in final_files(s.remote_dir).items():
                with contextlib.suppress(FileNotFoundError):
                    if sha256(path) != digests[name]:
                        seen_partial.append(name)
            return False

        run = s.start_daemon("--once", "--timeout", "1s")
        try:
            wait_until(lambda: look_while_cut() or run.process.poll() is not None, 20.0)
            first_code = run.process.wait(20)
        finally:
            run.stop()
        first_log = run.log()
        look_while_cut()
        assert proxy.has_cut, "the proxy never cut: the test proved nothing"
        assert first_code == 75, first_log  # still owed, not failed
        assert seen_partial == [], f"partial content under a final name: {seen_partial}"

        # While cut: every file is whole under its final name, or still owed (a rename the
        # cut session did but whose answer never came back leaves a file both).
        landed = final_files(s.remote_dir)
        states = job_states(s.state_dir, "local")
        assert sorted(states) == sorted(digests)
        for name, (_, state) in states.items():
            assert state in ("delivered", "pending"), (name, state)
            if state == "delivered":
                assert name in landed, name
            if name in landed:
                assert sha256(landed[name]) == digests[name], name
        status = status_json(s)["local"]
        assert status["pending"] == sum(st == "pending" for _, st in states.values())
        assert status["pending"] + status["delivered"] == CUT_FILES
        assert status["failed"] == status["sending"] == 0

        # Again, through the proxy that no longer cuts.
        second = s.scpd("run", "--once", "--timeout", "20s", timeout=40)

    assert second.returncode == 0, second.stderr
    landed = final_files(s.remote_dir)
    assert sorted(landed) == sorted(digests)
    for name, path in landed.items():
        assert sha256(path) == digests[name], name
    assert temps_gone(s.remote_dir, 3.0) == [], "temporary files left after delivery"
    sent = sent_names(first_log) + sent_names(second.stderr)
    assert sorted(sent) == sorted(digests), "a file reported sent twice, or never"
    assert status_json(s)["local"]["delivered"] == CUT_FILES
    assert "Traceback" not in first_log + second.stderr


def test_a_cut_batch_leaves_no_temporary_file_even_when_its_sources_are_then_deleted(
        tmp_path: Path, sshd: ThrowawaySshd, remote_dir: Path):
    # 250 KB into 20 x 20 KB: mid-data whatever the packets (about a dozen files reached
    # the remote, the last of them in part).
    with FaultProxy(sshd.port, cut_after_bytes=250_000) as proxy:
        known_hosts = sshd.write_known_hosts(tmp_path / "known_hosts_proxy", port=proxy.port)
        s = write_config(tmp_path, sshd, known_hosts, remote_dir, port=proxy.port,
                         target_extra="connections = 1")
        set_option(s, "retry_initial", '"30s"')
        set_option(s, "retry_max", '"30s"')
        files = [old_file(s.watch_dir / f"gone-{i:02d}.bin", 20_000, i) for i in range(20)]

        first = s.scpd("run", "--once", "--timeout", "1s", timeout=30)
        assert proxy.has_cut
        assert first.returncode == 75, first.stderr
        # The cut session ends on the remote; it removes its batch's temporary files.
        left_after_cut = temps_gone(remote_dir, 1.5)
        for path in files:  # the files are withdrawn: nothing is owed any more
            path.unlink()
        second = s.scpd("run", "--once", "--timeout", "5s", timeout=30)

    assert second.returncode == 0, second.stderr
    assert final_files(remote_dir) == {}
    assert second.stderr.count("dropped gone-") == len(files), second.stderr
    left_for_good = temps_gone(remote_dir, 1.5)
    # The scp sink dies with the connection (SIGPIPE); the agent still removes the temps.
    assert not left_after_cut and not left_for_good, (
        f"{len(left_after_cut)} .scpd-part file(s) at the remote 1.5 s after the cut run"
        f" ended; {len(left_for_good)} still there after the next run dropped every job,"
        f" e.g. {[p.name for p in left_after_cut + left_for_good][:2]}")


# -- 3. bandwidth caps are shared by parallel workers ---------------------------------------------

CAP = 2_000_000  # "2MB/s": KB and MB are powers of 1000 (config.parse_rate)


class TransferWindow:
    """Polls remote directories while `scpd run --once` goes on: how long from the start of
    the process until every expected final file was there, and how many temporary files
    existed at once (more than one: the transfers overlapped)."""

    def __init__(self, expected: list[Path]):
        self.expected = expected
        self.started_at = time.monotonic()
        self.all_landed_at: float | None = None
        self.most_temps_at_once = 0

    def look(self, roots: list[Path]) -> bool:
        temps = sum(len(temp_files(root)) for root in roots if root.exists())
        self.most_temps_at_once = max(self.most_temps_at_once, temps)
        if self.all_landed_at is None and all(p.exists() for p in self.expected):
            self.all_landed_at = time.monotonic()
        return self.all_landed_at is not None

    @property
    def seconds(self) -> float:
        assert self.all_landed_at is not None, "not everything landed"
        return self.all_landed_at - self.started_at


def run_once_timed(s: Setup, window: TransferWindow, roots: list[Path]) -> str:
    window.started_at = time.monotonic()  # before any byte can be sent: a strict bound
    run = s.start_daemon("--once", "--timeout", "30s")
    try:
        assert wait_until(lambda: window.look(roots) or run.process.poll() is not None, 30.0,
                          poll=0.01)
        window.look(roots)
        code = run.process.wait(20)
    finally:
        run.stop()
    assert code == 0, run.log()
    return run.log()


def assert_paced_by_the_cap(window: TransferWindow, total: int, suspect: str) -> None:
    """Parallel transfers of `total` bytes took as long as one shared cap of CAP demands.
    A cap lets at most a quarter second's worth through at once (the contract; the bucket
    holds less); the rest is paced. The upper bound is generous: this is not a speed test."""
    assert window.most_temps_at_once >= 2, "the transfers never overlapped: nothing shared"
    at_least = (total - CAP / 4) / CAP
    assert window.seconds >= at_least, (
        f"{total} bytes in {window.seconds:.2f}s: more than the cap of {CAP} B/s allows"
        f" ({suspect}?)")
    assert window.seconds <= 1.5 * total / CAP + 2.5, f"{window.seconds:.2f}s: far too slow"


def test_a_target_cap_holds_for_all_its_connections_together(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    # Three directories: three batches, one per worker, sent in parallel.
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='connections = 3\nbandwidth_limit = "2MB/s"')
    size, names = 2_000_000, [f"d{i}/big.bin" for i in range(3)]
    digests = {name: sha256(old_file(s.watch_dir / name, size, i)) for i, name in
               enumerate(names)}
    total = size * len(names)
    window = TransferWindow([remote_dir / name for name in names])
    log = SshdLog(sshd)

    run_once_timed(s, window, [remote_dir])

    for name in names:
        assert sha256(remote_dir / name) == digests[name]
    assert log.logins() == 3, log.text()
    assert_paced_by_the_cap(window, total, "a cap per connection")  # would take a third


def test_a_daemon_cap_holds_for_all_targets_together(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path):
    remotes = {name: tmp_path / "remote" / name for name in ("a", "b")}
    blocks = [target_block(name, sshd.port, sshd.user, sshd.client_key, known_hosts, remote,
                           extra="connections = 2")
              for name, remote in remotes.items()]
    s = multi_target_setup(tmp_path, blocks, list(remotes), 'bandwidth_limit = "2MB/s"')
    size, names = 2_000_000, ["d0/big.bin", "d1/big.bin"]
    digests = {name: sha256(old_file(s.watch_dir / name, size, i)) for i, name in
               enumerate(names)}
    total = size * len(names) * len(remotes)
    expected = [remote / name for remote in remotes.values() for name in names]
    window = TransferWindow(expected)
    log = SshdLog(sshd)

    run_once_timed(s, window, list(remotes.values()))

    for remote in remotes.values():
        for name in names:
            assert sha256(remote / name) == digests[name]
    assert log.logins() >= 2, log.text()
    assert_paced_by_the_cap(window, total, "a cap per target")  # would take half


# -- 4. a dead target beside a live one -----------------------------------------------------------


def test_a_dead_target_backs_off_while_the_live_one_delivers(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path):
    remotes = {"live": tmp_path / "remote" / "live", "dead": tmp_path / "remote" / "dead"}
    blocks = [target_block("live", sshd.port, sshd.user, sshd.client_key, known_hosts,
                           remotes["live"]),
              target_block("dead", free_port(), sshd.user, sshd.client_key, known_hosts,
                           remotes["dead"])]
    s = multi_target_setup(tmp_path, blocks, ["live", "dead"])
    names = [f"d{d}/f-{i:02d}.txt" for d in range(2) for i in range(10)]

    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", 10.0), daemon.log()
        written_at = time.monotonic()
        digests = {name: sha256(make_file(s.watch_dir / name, 5_000)) for name in names}

        def all_live() -> bool:
            return all((remotes["live"] / name).is_file() for name in names)

        assert wait_until(all_live, 5.0), f"{final_files(remotes['live'])}\n{daemon.log()}"
        landed_after = time.monotonic() - written_at
        # Watch the dead target retry for three seconds from the first file.
        time.sleep(max(0.0, written_at + 3.0 - time.monotonic()))
        retries = [line for line in daemon.log().splitlines()
                   if " to dead: " in line and "retrying in" in line]
        status = status_json(s)
        assert daemon.process.poll() is None, daemon.log()
    finally:
        returncode = daemon.stop()
    assert returncode == 0, daemon.log()
    for name in names:
        assert sha256(remotes["live"] / name) == digests[name], name
    assert landed_after < 3.0, f"the live target took {landed_after:.1f}s"
    assert not remotes["dead"].exists() or final_files(remotes["dead"]) == {}
    # Backoff 200 ms doubling to 1 s: about six rounds in three seconds, each at most one
    # line per worker (2). A hot loop against the dead port would make hundreds.
    assert 2 <= len(retries) <= 20, "\n".join(retries)
    assert all("cannot connect" in line for line in retries), "\n".join(retries)
    assert status["live"]["delivered"] == len(names), status
    assert status["live"]["pending"] == 0, status
    assert status["dead"]["pending"] + status["dead"]["sending"] == len(names), status
    assert status["dead"]["delivered"] == status["dead"]["failed"] == 0, status
    assert status["dead"]["paused"] is False, status
    assert status["dead"]["last_error"], status
    after = status_json(s)  # a clean stop leaves the dead target's files owed, none sending
    assert after["dead"]["pending"] == len(names), after
    assert "Traceback" not in daemon.log()


# -- 5. hostile names, all in one batch -----------------------------------------------------------

HOSTILE_NAMES = [
    "with space.txt",
    " leading space",
    "trailing space ",
    "-rf",
    "--",
    "-",
    "-\nrf",
    "$(touch x)",
    "`touch x`",
    "$(touch x",
    "${IFS}x$HOME",
    "it's",
    "say \"hi\"",
    "'\"'\"'",
    "back\\slash",
    "\\",
    "\\0101\\n\\c",
    "%s%n%b%%",
    "new\nline",
    "ends in newline\n",
    "tab\there",
    "carriage\rreturn",
    "ünïcødé 文字 🚀",
    "*",
    "?",
    "[a-z]*?",
    "semi;colon&amp|pipe>gt<lt",
    "!bang #hash {a,b} ~tilde",
    "a" * 196 + ".txt",  # 200 bytes: its temporary name still fits
    "é" * 127 + "z",  # 255 bytes: its temporary name takes a digest
    os.fsdecode(b"latin1-caf\xe9"),  # not UTF-8: names are bytes
]


def make_hostile_files(watch_dir: Path) -> dict[str, Path]:
    """A file for each of HOSTILE_NAMES, of its own size, mode and old mtime."""
    modes = [0o600, 0o640, 0o644, 0o755, 0o700, 0o400]
    return {name: old_file(watch_dir / name, 100 + index * 97, index, mode=modes[index % 6])
            for index, name in enumerate(HOSTILE_NAMES)}


def assert_landed_exactly(files: dict[str, Path], remote_dir: Path, *,
                          mtime_unit_ns: int) -> None:
    """Every file under exactly its own name (bytes of it), with its content, mode and mtime
    (to the protocol's resolution), and nothing else there."""
    assert sorted(os.listdir(os.fsencode(remote_dir))) == sorted(
        os.fsencode(name) for name in files)
    for name, local in files.items():
        remote = remote_dir / name
        assert sha256(remote) == sha256(local), repr(name)
        assert remote.stat().st_mode & 0o7777 == local.stat().st_mode & 0o7777, repr(name)
        assert remote.stat().st_mtime_ns // mtime_unit_ns == \
            local.stat().st_mtime_ns // mtime_unit_ns, repr(name)


class ShellMarker:
    """Proof that no name ran as shell: no `x` from $(touch x) or `touch x` appears, here or
    in the remote login's working directory (its home: the test sshd logs in this user)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.home_x = Path.home() / "x"
        self.before = self._home_x_state()

    def _home_x_state(self) -> tuple[int, int] | None:
        if not self.home_x.exists():
            return None
        st = self.home_x.stat()
        return st.st_ino, st.st_mtime_ns

    def check(self) -> None:
        assert list(self.tmp_path.rglob("x")) == []
        assert self._home_x_state() == self.before, f"{self.home_x} was created or touched"


@pytest.fixture(params=["sftp", "mv"], ids=["renames_over_sftp", "renames_by_mv"])
def scp_server(request, sshd: ThrowawaySshd, tmp_path: Path):
    """The session sshd (the uploader renames over SFTP), or one without the SFTP
    subsystem (the agent renames with mv: every path through the shell)."""
    if request.param == "sftp":
        yield sshd
        return
    server = ThrowawaySshd(tmp_path / "sshd-no-sftp", has_sftp=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_hostile_names_in_one_batch_land_under_exactly_their_own_names(
        tmp_path: Path, scp_server: ThrowawaySshd, remote_dir: Path):
    known_hosts = scp_server.write_known_hosts(tmp_path / "known_hosts")
    s = write_config(tmp_path, scp_server, known_hosts, remote_dir,
                     target_extra="connections = 1")
    files = make_hostile_files(s.watch_dir)
    ran_nothing = ShellMarker(tmp_path)
    log = SshdLog(scp_server)

    result = s.scpd("run", "--once", "--timeout", "20s", timeout=40)

    assert result.returncode == 0, result.stderr
    assert log.logins() == 1 and log.sessions() == 1, log.text()
    assert_landed_exactly(files, remote_dir, mtime_unit_ns=1000)  # SCP carries microseconds
    ran_nothing.check()
    assert temps_gone(remote_dir, 3.0) == []
    assert "retrying" not in result.stderr and "failed" not in result.stderr, result.stderr
    if not scp_server.has_sftp:  # the agent's mv did the renames: every path through sh
        assert "renamed into place by mv" in result.stderr, result.stderr


# -- 6 and 7. a file that changes or shrinks while its batch is sent ------------------------------

BATCH_FILES = 4
BATCH_FILE_BYTES = 240_000  # 960 KB: one batch (at most 1 MiB). At 400 KB/s: 0.6 s a file


def overwrite_in_place(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(os.urandom(path.stat().st_size))


def truncate_to_a_quarter(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 4)  # what was read of it may be more than is left


def truncate_to_zero(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(0)


@pytest.mark.parametrize(("change", "victim_at", "says"), [
    (overwrite_in_place, "in_flight", "changed while it was sent"),
    (overwrite_in_place, "later_in_batch", "changed since it was queued"),
    (truncate_to_a_quarter, "in_flight", "shrank while it was sent"),
    (truncate_to_zero, "later_in_batch", "changed since it was queued"),
], ids=["changed-in_flight", "changed-later_in_batch", "shrunk-in_flight",
        "shrunk_to_zero-later_in_batch"])
def test_a_file_changed_while_its_batch_is_sent_never_lands_mixed(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path,
        change, victim_at: str, says: str):
    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='connections = 1\nbandwidth_limit = "400KB/s"')
    names = [f"part-{i}.bin" for i in range(BATCH_FILES)]
    digests = {name: sha256(old_file(s.watch_dir / name, BATCH_FILE_BYTES, i, mode=0o640))
               for i, name in enumerate(names)}
    seen: dict[str, set[str]] = {name: set() for name in names}  # digests under final names

    def look() -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                seen[name].add(sha256(remote_dir / name))

    daemon = s.start_daemon()
    try:
        order = batch_order(s, BATCH_FILES)
        # in flight: the third file, changed as soon as its temporary file appears (it is
        # read in small chunks over the next 0.6 s, paced by the cap). Later: the last one,
        # changed when the first starts (the batch opens a file only when its turn comes:
        # the change is seen then, before any of it is sent).
        victim = order[2] if victim_at == "in_flight" else order[-1]
        watched = victim if victim_at == "in_flight" else order[0]

        def has_started() -> bool:
            look()
            return any(remote_dir.glob(f".{watched}.*.scpd-part"))

        assert wait_until(has_started, 10.0, poll=0.005), daemon.log()
        assert not seen[victim], "the victim landed before the test could change it"
        change(s.watch_dir / victim)
        new_digest = sha256(s.watch_dir / victim)
        assert new_digest != digests[victim]

        def new_version_landed() -> bool:
            look()
            return new_digest in seen[victim] and all(seen[n] for n in names)

        assert wait_until(new_version_landed, 15.0), daemon.log()
        look()
    finally:
        returncode = daemon.stop()
    log = daemon.log()
    assert returncode == 0, log
    assert f"{victim} {says}" in log, (
        f"the change was not noticed (was the file in the batch being sent?)\n{log}")
    assert seen[victim] == {new_digest}, "a version other than the final one was published"
    for name in names:
        if name != victim:
            assert seen[name] == {digests[name]}, name
    local, remote = s.watch_dir / victim, remote_dir / victim
    assert remote.stat().st_mtime_ns // 1000 == local.stat().st_mtime_ns // 1000
    assert remote.stat().st_mode & 0o7777 == 0o640
    # Each file sent once: the victim only in its new version.
    assert sorted(sent_names(log)) == sorted(names), log
    assert temps_gone(remote_dir, 3.0) == []
    assert "Traceback" not in log
