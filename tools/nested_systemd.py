"""A throwaway systemd, PID 1 of its own namespaces, for running the shipped unit for real.

Standard library only. Recipe: shared/research/libraries.md section 6.3; it boots to
"running" in 0.2-0.5 s here. systemd runs in new pid, mount, net, uts, cgroup and ipc
namespaces. Before it starts, everything an install writes is made private to them:

    /etc /opt /usr/local/bin     overlayfs over the machine's own directories (python, the
                                 users, /etc/pip.conf stay visible); the changes go to a tmpfs
    /run /var/lib /var/log /srv  tmpfs
    /tmp /var/tmp                tmpfs, so PrivateTmp= directories never reach the machine
    /dev/shm                     tmpfs, so RemoveIPC= cannot reach the machine's
    /sys/fs/cgroup               cgroup2, rooted at a cgroup made for it on the machine
    /dev/console                 a pseudo-terminal whose output goes to `console_log`

so that whatever is installed, configured or logged inside is gone when it is killed. The
network namespace has only its own loopback: a server the units must reach runs in it too
(`net_launcher`). systemd logs to its own journald once that runs, to the console before.

    with NestedSystemd(workdir, units={TEST_TARGET: "[Unit]\nWants=..."}) as nested:
        nested.run("make", "-C", checkout, "install", pid_and_mount_only=True)
        nested.systemctl("start", "scpd")
        nested.journal("SYSLOG_IDENTIFIER=scpd")
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

SYSTEMD = Path("/lib/systemd/systemd")
BOOT_TIMEOUT_SECONDS = 15.0
KILL_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 60.0
TEST_TARGET = "scpd-test.target"

# Exit codes of the boot script that mean "this machine cannot do it": a skip, not a failure.
EXIT_OVERLAY_REFUSED = 91
EXIT_CGROUP2_REFUSED = 92
REFUSALS = {EXIT_OVERLAY_REFUSED: "overlayfs", EXIT_CGROUP2_REFUSED: "cgroup2"}

# Runs as `bash -c SCRIPT bash UNITS_DIR CONSOLE_PTY VISIBLE_DIR...` as PID 1 of the new
# namespaces, then becomes systemd. -n on every mount: libmount would otherwise note it in the
# machine's /run/mount/utab. A pseudo-terminal of the test's goes over /dev/console (as
# systemd-nspawn does): systemd as PID 1 writes to /dev/console, which would be the machine's.
_BOOT_SCRIPT = r"""
set -euo pipefail
units=$1 console=$2
shift 2
# Held open across the mounts below, which may hide them (a checkout under /tmp), then put
# back at their own paths.
visible=("$@") held=()
for dir in "${visible[@]}"; do exec {fd}<"$dir"; held+=("$fd"); done
mount -n --bind "$console" /dev/console
mount -n -t tmpfs -o mode=0755 scpd-test-scratch /mnt
for dir in /etc /opt /usr/local/bin; do
    layer=/mnt/overlay${dir//\//-}
    mkdir -p "$layer/upper" "$layer/work"
    mount -n -t overlay -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" \
        scpd-test-overlay "$dir" || exit 91
done
for dir in /run /var/lib /var/log /srv; do
    mount -n -t tmpfs -o mode=0755 scpd-test "$dir"
done
# The ipc namespace is new, but /dev/shm is a file system: without this, RemoveIPC= would
# clear the machine's /dev/shm of files owned by whoever has the service user's uid here.
mount -n -t tmpfs -o mode=1777 scpd-test-shm /dev/shm
mkdir -p /run/systemd/system
cp -r "$units"/. /run/systemd/system/
# Last: the units came from the machine's /tmp.
for dir in /tmp /var/tmp; do
    mount -n -t tmpfs -o mode=1777 scpd-test "$dir"
done
mount -n -t tmpfs -o mode=0755 scpd-test-cgroup /sys/fs/cgroup
mount -n -t cgroup2 cgroup2 /sys/fs/cgroup || exit 92
for i in "${!visible[@]}"; do
    mkdir -p "${visible[$i]}"
    # --no-canonicalize: mount would turn the descriptor into its name, now the tmpfs there.
    mount -n --no-canonicalize --bind "/proc/self/fd/${held[$i]}" "${visible[$i]}"
    exec {held[$i]}<&-
done
# systemd makes its credentials directories (LoadCredential=) in a child mount namespace
# and counts on / being shared to see them; a new peer group, so never the machine's.
mount -n --make-rshared /
exec env container=scpd-test "$SYSTEMD" --system --unit="$TARGET" --log-target=journal
"""


class RefusedError(RuntimeError):
    """The machine refused something the namespace needs (overlayfs, cgroup2): not a bug."""


class NestedSystemd:
    """One systemd in namespaces of its own, and the ways in: run, systemctl, journal."""

    def __init__(self, workdir: Path, units: dict[str, str],
                 visible_dirs: tuple[Path, ...] = ()) -> None:
        """units: file name -> text, put in /run/systemd/system before systemd starts (drop-ins
        as "NAME.service.d/FILE.conf"). One of them must be TEST_TARGET, what it boots to.
        visible_dirs: the machine's directories that stay visible inside at their own paths,
        wherever they lie (the checkout `make install` runs from may be under /tmp)."""
        if TEST_TARGET not in units:
            raise ValueError(f"units must hold {TEST_TARGET}, the unit systemd boots to")
        self.workdir = Path(workdir).absolute()
        self.units = units
        self.visible_dirs = [Path(d).absolute() for d in visible_dirs]
        self.console_log = self.workdir / "console.log"
        self.cgroup: Path | None = None
        self.pid: int | None = None  # systemd's pid as the machine sees it
        self._unshare: subprocess.Popen[bytes] | None = None
        self._console: _Console | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> NestedSystemd:
        units_dir = self.workdir / "units"
        for name, text in self.units.items():
            (units_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (units_dir / name).write_text(text)
        self.cgroup = _cgroup2_root() / f"scpd-nested-{os.getpid()}-{time.monotonic_ns()}"
        self.cgroup.mkdir()
        # sh joins the new cgroup, then becomes unshare: systemd's cgroup namespace is rooted
        # there, and everything it starts stays below it.
        join_then_exec = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        command = ["sh", "-c", join_then_exec, str(self.cgroup),
                   "unshare", "--pid", "--fork", "--mount", "--uts", "--net", "--cgroup", "--ipc",
                   "--propagation", "private", "--mount-proc",
                   "bash", "-c", _BOOT_SCRIPT, "bash", str(units_dir)]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "SYSTEMD": str(SYSTEMD), "TARGET": TEST_TARGET}
        self._console = _Console(self.console_log)
        command += [self._console.terminal, *map(str, self.visible_dirs)]
        with self.console_log.open("ab") as log:
            # A session of its own: a stray Ctrl-C to the test run does not reach it.
            self._unshare = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log, env=env, start_new_session=True)
        try:
            self._wait_until_running()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill systemd and so everything in its namespaces; remove its cgroups. Idempotent."""
        unshare, self._unshare = self._unshare, None
        if self.pid is not None:
            _kill(self.pid)  # PID 1 of the namespace: the kernel ends every process in it
        if unshare is not None:
            _kill(unshare.pid)
            unshare.wait(KILL_TIMEOUT_SECONDS)
        self.pid = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if self.cgroup is not None:
            _remove_cgroup_tree(self.cgroup)
            self.cgroup = None

    def __enter__(self) -> NestedSystemd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the ways in -------------------------------------------------------------------------

    def run(self, *argv: str, pid_and_mount_only: bool = False, check: bool = True,
            timeout: float = COMMAND_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
        """A command inside every namespace; with pid_and_mount_only, on the machine's network
        (pip needs the package index), but still seeing the namespace's files and systemd.
        The pid namespace is needed either way: systemd drops a client it cannot see."""
        namespaces = ["-m", "-p"] if pid_and_mount_only else ["-a"]
        result = subprocess.run(["nsenter", "-t", str(self._pid()), *namespaces, "--", *argv],
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode} inside the"
                                 f" namespace:\n{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict]:
        """Entries matching journalctl matches such as SYSLOG_IDENTIFIER=scpd, oldest first."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def path(self, inside: str | Path) -> Path:
        """A path inside the namespace, as the machine reaches it."""
        return Path(f"/proc/{self._pid()}/root") / Path(inside).relative_to("/")

    @property
    def net_launcher(self) -> list[str]:
        """A command prefix (ThrowawaySshd's launcher) that runs a program on the machine but
        in the namespace's network, where the units' 127.0.0.1 is."""
        return ["nsenter", "-t", str(self._pid()), "-n"]

    # -- internals ---------------------------------------------------------------------------

    def _pid(self) -> int:
        if self.pid is None:
            raise RuntimeError("the nested systemd is not running")
        return self.pid

    def _wait_until_running(self) -> None:
        assert self._unshare is not None
        deadline = time.monotonic() + BOOT_TIMEOUT_SECONDS
        state = "not started"
        while time.monotonic() < deadline:
            if (code := self._unshare.poll()) is not None:
                console = self.console_log.read_text(errors="replace")
                if code in REFUSALS:
                    raise RefusedError(f"{REFUSALS[code]} mount refused here: {console.strip()}")
                raise RuntimeError(f"the nested systemd exited ({code}) while booting:\n{console}")
            if self.pid is None:
                self.pid = _child_running(self._unshare.pid, SYSTEMD)
            elif (state := self._system_state()) in ("running", "degraded"):
                return
            time.sleep(0.05)
        console = self.console_log.read_text(errors="replace")
        raise RuntimeError(f"the nested systemd did not boot in {BOOT_TIMEOUT_SECONDS:g} s"
                           f" (state: {state}); its console:\n{console}")

    def _system_state(self) -> str:
        result = self.systemctl("is-system-running", check=False)
        return result.stdout.strip() or result.stderr.strip()


class _Console:
    """A pseudo-terminal for the nested systemd's /dev/console, copied to a file by a thread
    (a terminal nobody reads fills up, and then systemd blocks writing to it)."""

    def __init__(self, log: Path) -> None:
        self._master, self._slave = os.openpty()
        self.terminal = os.ttyname(self._slave)
        self._log = log
        self._is_closing = False
        self._thread = threading.Thread(target=self._copy, name="nested-systemd-console",
                                        daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with self._log.open("ab", buffering=0) as log:
            while not self._is_closing:
                if select.select([self._master], [], [], 0.1)[0]:
                    try:
                        # A terminal ends lines with "\r\n" (systemd resets its modes).
                        log.write(os.read(self._master, 65536).replace(b"\r", b""))
                    except OSError:
                        time.sleep(0.1)  # EIO: no one has the terminal open just now

    def close(self) -> None:
        self._is_closing = True
        self._thread.join(5)
        os.close(self._master)
        os.close(self._slave)


def why_it_cannot_run() -> str | None:
    """Why a nested systemd cannot run here, or None if it can (as far as can be told
    without trying: overlayfs and cgroup2 mounts are refused only when tried)."""
    if os.geteuid() != 0:
        return "needs root: a nested systemd needs new pid, mount and cgroup namespaces"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is missing (Debian: apt-get install systemd)"
    try:
        _cgroup2_root()
    except RefusedError as exc:
        return str(exc)
    return None


def _cgroup2_root() -> Path:
    """This process's own cgroup in the cgroup2 hierarchy (/sys/fs/cgroup on a pure v2
    machine, /sys/fs/cgroup/unified on a hybrid one)."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    points = [fields[1] for fields in mounts if fields[2] == "cgroup2"]
    if not points:
        raise RefusedError("no cgroup2 hierarchy is mounted here")
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::")), "/")
    return Path(points[0]) / own.lstrip("/")


def _child_running(parent: int, executable: Path) -> int | None:
    """The pid of parent's child that has exec'd `executable`, once it has."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            if os.readlink(f"/proc/{child}/exe") == str(executable.resolve()):
                return int(child)
        except OSError:
            continue
    return None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_cgroup_tree(root: Path) -> None:
    """rmdir every cgroup below root, deepest first, once their processes are gone."""
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while root.exists():
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True) + [root]:
            try:
                directory.rmdir()
            except OSError:
                pass  # processes still exiting, or a child not yet removed
        if not root.exists():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cgroup {root} could not be removed: its processes live on")
        time.sleep(0.05)
