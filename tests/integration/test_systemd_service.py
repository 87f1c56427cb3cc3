"""The shipped scpd.service, installed by `make install`, run by a real systemd.

test_systemd_units.py checks the unit files offline; this runs them. A throwaway systemd is
PID 1 of namespaces of its own (tools/nested_systemd.py), with overlays over /etc, /opt and
/usr/local/bin, so the real `make install` runs inside (user, virtualenv, symlink, units,
/etc/scpd) and nothing of it reaches the machine: the fixture checks that at the end. The
unit runs with all its hardening (User=scpd, ProtectSystem=strict, PrivateTmp, seccomp...);
a drop-in only shortens the watchdog and the restart delay. scpd pushes to a throwaway sshd
on the namespace's own loopback.

The tests share one running service and build on each other in file order: start, deliver,
journal, reload, watchdog restart, stop, uninstall. Each starts scpd itself if it is not
running, so that one can also be run alone (-k).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_until

from scpd.logs import MESSAGE_IDS
from tools.nested_systemd import TEST_TARGET, NestedSystemd, RefusedError, why_it_cannot_run
from tools.sshd import ThrowawaySshd

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")  # what `make install` makes the venv from
CONFIG = "/etc/scpd/config.toml"
WATCH_DIR = "/srv/outbox"  # not under /tmp: PrivateTmp=yes hides the real /tmp from scpd
SECOND_WATCH_DIR = "/srv/outbox2"
STAGING_DIR = "/srv/staging"  # files are made here, then renamed into a watch in one step
DELIVERY_SECONDS = 15.0
RELOAD_SECONDS = 10.0  # READY=1 again after SIGHUP; the pool's 5 s grace is the most it waits
# Measured 2.5-3.5 s (2 s watchdog, SIGABRT, 1 s RestartSec); the bound allows for
# TimeoutAbortSec (10 s, from TimeoutStopSec) should the abort not end scpd.
WATCHDOG_RESTART_SECONDS = 30.0

# What `make install` writes on a machine; none of it may be left on this one.
INSTALLED_PATHS = ["/opt/scpd", "/usr/local/bin/scpd", "/etc/scpd",
                   "/etc/systemd/system/scpd.service", "/etc/systemd/system/scpd@.service"]

TEST_UNITS = {
    TEST_TARGET: "[Unit]\nDescription=scpd tests\nDefaultDependencies=no\n"
                 "Wants=systemd-journald.service\n",
    # The shipped 30 s watchdog and 5 s restart delay would make the watchdog test wait most
    # of a minute; at 2 s a SIGSTOPped scpd is caught at once, and it is back 1 s after.
    # scpd pings every WATCHDOG_USEC/2, so 2 s still leaves it 1 s of slack per ping.
    "scpd.service.d/test.conf": "[Service]\nWatchdogSec=2s\nRestartSec=1s\n",
}

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@dataclass
class Service:
    """scpd.service installed and configured in a nested systemd, and its sshd."""

    nested: NestedSystemd
    sshd: ThrowawaySshd
    remote_dir: Path  # on this machine: sshd runs here, only in the namespace's network
    install_output: str
    on_this_machine: dict[str, bool]  # which of INSTALLED_PATHS and the user it had before

    def start(self) -> None:
        if self.nested.show("scpd", "ActiveState")["ActiveState"] != "active":
            self.nested.systemctl("start", "scpd")

    def state(self) -> dict[str, str]:
        return self.nested.show("scpd", "ActiveState", "SubState", "MainPID", "Result",
                                "NRestarts", "ExecMainStatus", "StatusText")

    def drop(self, watch_dir: str, name: str, data: bytes, mode: int, mtime_ns: int) -> None:
        """A file appears in watch_dir in one step (a rename), with its mode and mtime set."""
        staged = self.nested.path(STAGING_DIR) / name
        staged.write_bytes(data)
        os.chmod(staged, mode)
        os.utime(staged, ns=(mtime_ns, mtime_ns))
        staged.rename(self.nested.path(watch_dir) / name)

    def wait_for_delivery(self, name: str, data: bytes) -> Path:
        remote = self.remote_dir / name
        if not wait_until(lambda: remote.is_file() and remote.read_bytes() == data,
                          DELIVERY_SECONDS, poll=0.05):
            pytest.fail(f"{name} did not arrive at {remote} within {DELIVERY_SECONDS:g} s;"
                        f" scpd's journal:\n{self.journal_text()}")
        return remote

    def journal_text(self) -> str:
        return self.nested.run("journalctl", "--no-pager", "-u", "scpd", check=False).stdout


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    _skip_where_it_cannot_run()
    before = _installed_on_this_machine()
    private_tmp_before = _private_tmp_dirs()
    workdir = tmp_path_factory.mktemp("nested-systemd")
    nested = NestedSystemd(workdir / "systemd", TEST_UNITS, visible_dirs=(CHECKOUT,))
    sshd: ThrowawaySshd | None = None
    try:
        try:
            nested.start()
        except RefusedError as exc:
            pytest.skip(str(exc))
        install = _make(nested, "install")
        sshd = ThrowawaySshd(workdir / "sshd", launcher=nested.net_launcher).start()
        remote_dir = workdir / "remote"
        remote_dir.mkdir()
        _configure(nested, sshd, remote_dir)
        yield Service(nested, sshd, remote_dir, install.stdout + install.stderr, before)
    finally:
        if sshd is not None:
            sshd.stop()
        nested.stop()
    assert _installed_on_this_machine() == before, "the install inside reached this machine"
    # /tmp and /var/tmp are the namespace's own: none should appear. Removed all the same.
    left = sorted(set(_private_tmp_dirs()) - set(private_tmp_before))
    for directory in left:
        shutil.rmtree(directory, ignore_errors=True)
    assert not left, f"scpd.service's PrivateTmp directories reached this machine: {left}"


def _skip_where_it_cannot_run() -> None:
    if (problem := why_it_cannot_run()) is not None:
        pytest.skip(problem)
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is missing, and make install makes its virtualenv from it")
    venv_check = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"],
                                capture_output=True, check=False)
    if venv_check.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot make a virtualenv (Debian: python3-venv),"
                    " which make install needs")


def _installed_on_this_machine() -> dict[str, bool]:
    found = {path: os.path.lexists(path) for path in INSTALLED_PATHS}
    try:
        pwd.getpwnam("scpd")
        found["user scpd"] = True
    except KeyError:
        found["user scpd"] = False
    return found


def _private_tmp_dirs() -> list[str]:
    return glob.glob("/tmp/systemd-private-*-scpd.service-*") + glob.glob(
        "/var/tmp/systemd-private-*-scpd.service-*")


def _make(nested: NestedSystemd, target: str, *, check: bool = True
          ) -> subprocess.CompletedProcess[str]:
    # On this machine's network (pip may need the package index), in the namespace's files.
    return nested.run("make", "-s", "-C", str(CHECKOUT), target, pid_and_mount_only=True,
                      check=check, timeout=180)


def _configure(nested: NestedSystemd, sshd: ThrowawaySshd, remote_dir: Path) -> None:
    """What the operator does after make install: config, key and known_hosts readable by
    scpd only, and the watched directory."""
    for directory in (WATCH_DIR, SECOND_WATCH_DIR, STAGING_DIR):
        nested.path(directory).mkdir()
    shutil.copyfile(sshd.client_key, nested.path("/etc/scpd/id_ed25519"))
    sshd.write_known_hosts(nested.path("/etc/scpd/known_hosts"))
    nested.path(CONFIG).write_text(_config_text(sshd, remote_dir, [WATCH_DIR]))
    nested.run("sh", "-c", "cd /etc/scpd && chown scpd:scpd id_ed25519 && chmod 0600 id_ed25519"
               " && chown root:scpd config.toml known_hosts && chmod 0640 config.toml known_hosts")


def _config_text(sshd: ThrowawaySshd, remote_dir: Path, watch_dirs: list[str]) -> str:
    # No state_dir: the unit's StateDirectory= ($STATE_DIRECTORY) is the default.
    watches = "".join(f"""
[[watch]]
name = "{Path(path).name}"
path = "{path}"
targets = ["local"]
settle = "300ms"
""" for path in watch_dirs)
    return f"""
[targets.local]
host = "127.0.0.1"
port = {sshd.port}
user = "{sshd.user}"
identity_file = "/etc/scpd/id_ed25519"
known_hosts = "/etc/scpd/known_hosts"
remote_dir = "{remote_dir}"
connect_timeout = "3s"
io_timeout = "5s"
retry_initial = "200ms"
retry_max = "1s"
{watches}"""


def _owner(nested: NestedSystemd, inside: str) -> tuple[str, str, int]:
    """(user, group, permission bits) of a path in the namespace, by its own user names."""
    result = nested.run("stat", "-c", "%U %G %a", inside)
    user, group, mode = result.stdout.split()
    return user, group, int(mode, 8)


# -- install ----------------------------------------------------------------------------------


def test_make_install_puts_scpd_in_place_inside_the_namespace_only(service: Service) -> None:
    nested = service.nested
    assert "systemctl enable --now scpd" in service.install_output, service.install_output
    assert "scpd check" in service.install_output, service.install_output
    link = nested.path("/usr/local/bin/scpd")
    assert os.readlink(link) == "/opt/scpd/bin/scpd"
    venv_python = nested.run("readlink", "-f", "/opt/scpd/bin/python").stdout.strip()
    assert venv_python == str(SYSTEM_PYTHON.resolve())  # not a pyenv shim scpd cannot run
    # Installed, not linked to this checkout: it runs from the venv's site-packages.
    where = nested.run("/opt/scpd/bin/python", "-c", "import scpd; print(scpd.__file__)")
    assert where.stdout.startswith("/opt/scpd/lib/"), where.stdout
    for unit in ("scpd.service", "scpd@.service"):
        installed = nested.path(f"/etc/systemd/system/{unit}")
        assert installed.read_bytes() == (CHECKOUT / "systemd" / unit).read_bytes()
        assert _owner(nested, f"/etc/systemd/system/{unit}") == ("root", "root", 0o644)
    assert _owner(nested, "/etc/scpd") == ("root", "scpd", 0o750)
    assert nested.path("/etc/scpd/config.example.toml").read_bytes() == (
        CHECKOUT / "config.example.toml").read_bytes()
    passwd = nested.path("/etc/passwd").read_text()
    assert "\nscpd:x:" in passwd and ":/var/lib/scpd:/usr/sbin/nologin\n" in passwd, passwd
    # The machine itself is as it was (the fixture checks again at the end).
    assert _installed_on_this_machine() == service.on_this_machine


def test_make_install_again_works_and_leaves_the_config_alone(service: Service) -> None:
    config = service.nested.path(CONFIG)
    before = config.read_bytes()

    again = _make(service.nested, "install")

    assert config.read_bytes() == before
    assert _owner(service.nested, CONFIG) == ("root", "scpd", 0o640)
    assert f"{CONFIG} already exists and was left as it was" in again.stdout, again.stdout


def test_scpd_check_passes_as_the_service_user(service: Service) -> None:
    # Step 2 of what make install prints; in every namespace, so that sshd is reachable.
    result = service.nested.run("runuser", "-u", "scpd", "--", "/usr/local/bin/scpd",
                                "check", "-c", CONFIG, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "target local: ok" in result.stdout, result.stdout


# -- the running service ----------------------------------------------------------------------


def test_systemctl_start_returns_once_scpd_is_ready_and_shows_its_status(
        service: Service) -> None:
    # Type=notify: start returns only after READY=1, or fails after TimeoutStartSec.
    result = service.nested.systemctl("start", "scpd", check=False)

    state = service.state()
    assert result.returncode == 0, f"{result.stderr}\n{service.journal_text()}"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert "queued" in state["StatusText"], state


def test_a_file_in_the_watched_dir_arrives_with_its_bytes_mode_and_mtime(
        service: Service) -> None:
    service.start()
    data = b"id,total\n1,42\n" * 1000
    mtime_ns = 1_700_000_000_123_456_000  # whole microseconds: what SCP carries

    service.drop(WATCH_DIR, "report.csv", data, 0o604, mtime_ns)

    remote = service.wait_for_delivery("report.csv", data)
    assert remote.stat().st_mode & 0o7777 == 0o604
    assert remote.stat().st_mtime_ns == mtime_ns


def test_the_delivery_is_in_the_journal_with_its_fields_and_message_id(
        service: Service) -> None:
    service.start()
    data = b"journal me\n"
    service.drop(WATCH_DIR, "journaled.txt", data, 0o644, time.time_ns() // 1000 * 1000)
    service.wait_for_delivery("journaled.txt", data)
    path = f"{WATCH_DIR}/journaled.txt"

    def sent_entries() -> list[dict]:
        return service.nested.journal("SYSLOG_IDENTIFIER=scpd", "SCPD_EVENT=sent",
                                      f"SCPD_PATH={path}")

    assert wait_until(lambda: len(sent_entries()) == 1, 5.0, poll=0.1), (
        f"{sent_entries()}\n{service.journal_text()}")
    entry = sent_entries()[0]
    assert entry["_SYSTEMD_UNIT"] == "scpd.service"
    assert entry["PRIORITY"] == "6"
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["sent"] == "3b5858a5fe5f416c8958130dc8c7ec7c"
    assert entry["SCPD_TARGET"] == "local"
    assert entry["SCPD_BYTES"] == str(len(data))
    assert entry["SCPD_REMOTE_PATH"] == f"{service.remote_dir}/journaled.txt"


def test_a_file_the_service_user_cannot_read_is_failed_loudly_not_skipped(
        service: Service) -> None:
    # README, "Running as a dedicated user": scpd runs as scpd, not root. A file it may not
    # read is an error in the journal, not a silent skip.
    service.start()
    service.drop(WATCH_DIR, "root-only.txt", b"secret\n", 0o600, time.time_ns())

    def failed_entries() -> list[dict]:
        return [entry for entry in service.nested.journal(
            "SYSLOG_IDENTIFIER=scpd", "SCPD_EVENT=failed")
            if entry.get("SCPD_PATH") == f"{WATCH_DIR}/root-only.txt"]

    assert wait_until(lambda: bool(failed_entries()), DELIVERY_SECONDS, poll=0.1), \
        service.journal_text()
    entry = failed_entries()[0]
    assert entry["PRIORITY"] == "3"
    assert "Permission denied" in entry["SCPD_ERROR"], entry
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["failed"]
    assert not (service.remote_dir / "root-only.txt").exists()


def test_reload_adds_a_watch_without_restarting_scpd(service: Service) -> None:
    service.start()
    pid_before = service.state()["MainPID"]
    service.nested.path(CONFIG).write_text(
        _config_text(service.sshd, service.remote_dir, [WATCH_DIR, SECOND_WATCH_DIR]))

    result = service.nested.systemctl("reload", "scpd", check=False)

    assert result.returncode == 0, f"{result.stderr}\n{service.journal_text()}"
    # `systemctl reload` returns once SIGHUP is sent: the unit is "reloading" until scpd,
    # with the new config in place, says READY=1 again.
    assert wait_until(lambda: service.state()["ActiveState"] == "active", RELOAD_SECONDS), \
        f"{service.state()}\n{service.journal_text()}"
    assert service.state()["MainPID"] == pid_before, service.state()
    data = b"from the new watch\n"
    service.drop(SECOND_WATCH_DIR, "second.txt", data, 0o644, time.time_ns() // 1000 * 1000)
    service.wait_for_delivery("second.txt", data)


def test_the_watchdog_restarts_a_hung_scpd_which_then_delivers_again(
        service: Service) -> None:
    service.start()
    before = service.state()
    seen_results = set()

    def restarted() -> bool:
        state = service.state()
        seen_results.add(state["Result"])
        return (int(state["NRestarts"]) > int(before["NRestarts"])
                and state["ActiveState"] == "active"
                and state["MainPID"] not in ("0", before["MainPID"]))

    # Frozen, scpd stops pinging: systemd must notice, kill it and start it again.
    service.nested.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", "scpd")

    is_restarted = wait_until(restarted, WATCHDOG_RESTART_SECONDS, poll=0.1)
    assert is_restarted, (f"not restarted within {WATCHDOG_RESTART_SECONDS:g} s: before"
                          f" {before}, now {service.state()}\n{service.journal_text()}")
    # systemd says why it killed scpd (e.g. "scpd.service: Watchdog timeout (limit 2s)!").
    journal = service.journal_text()
    assert "scpd.service: Watchdog timeout" in journal, (seen_results, journal)
    data = b"after the restart\n"
    service.drop(WATCH_DIR, "after-restart.txt", data, 0o644, time.time_ns() // 1000 * 1000)
    service.wait_for_delivery("after-restart.txt", data)


def test_the_key_can_stay_root_only_and_reach_scpd_by_load_credential(
        service: Service) -> None:
    # What the unit's comments offer: the key root-owned 0600, handed over by systemd.
    nested = service.nested
    drop_in = nested.path("/run/systemd/system/scpd.service.d/credential.conf")
    config = nested.path(CONFIG)
    shipped_config = config.read_text()
    try:
        drop_in.write_text("[Service]\nLoadCredential=ssh-key:/etc/scpd/id_ed25519\n")
        config.write_text(shipped_config.replace(
            'identity_file = "/etc/scpd/id_ed25519"',
            'identity_file = "$CREDENTIALS_DIRECTORY/ssh-key"'))
        nested.run("chown", "root:root", "/etc/scpd/id_ed25519")
        nested.systemctl("daemon-reload")

        result = nested.systemctl("restart", "scpd", check=False)

        assert result.returncode == 0, f"{result.stderr}\n{service.journal_text()}"
        data = b"sent with the credential\n"
        service.drop(WATCH_DIR, "credential.txt", data, 0o644, time.time_ns() // 1000 * 1000)
        service.wait_for_delivery("credential.txt", data)
    finally:
        drop_in.unlink(missing_ok=True)
        config.write_text(shipped_config)
        nested.run("chown", "scpd:scpd", "/etc/scpd/id_ed25519")
        nested.systemctl("daemon-reload")
        nested.systemctl("restart", "scpd", check=False)


def test_make_uninstall_refuses_while_scpd_runs(service: Service) -> None:
    service.start()

    result = _make(service.nested, "uninstall", check=False)

    assert result.returncode != 0
    assert "still running: scpd.service" in result.stderr, result.stderr
    assert service.nested.path("/opt/scpd/bin/scpd").exists()
    assert service.state()["ActiveState"] == "active"


def test_systemctl_stop_ends_scpd_with_exit_status_0(service: Service) -> None:
    service.start()

    result = service.nested.systemctl("stop", "scpd", check=False)

    state = service.state()
    assert result.returncode == 0, result.stderr
    assert state["ActiveState"] == "inactive", state
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), (
        f"{state}\n{service.journal_text()}")


def test_make_uninstall_removes_what_install_put_there_and_keeps_the_config(
        service: Service) -> None:
    nested = service.nested
    nested.systemctl("stop", "scpd")
    config_before = nested.path(CONFIG).read_bytes()

    result = _make(nested, "uninstall")

    for path in ("/opt/scpd", "/usr/local/bin/scpd", "/etc/systemd/system/scpd.service",
                 "/etc/systemd/system/scpd@.service", "/etc/scpd/config.example.toml"):
        assert not os.path.lexists(nested.path(path)), f"{path} is still there"
    assert nested.path(CONFIG).read_bytes() == config_before
    assert nested.path("/etc/passwd").read_text().count("\nscpd:x:") == 1
    assert nested.show("scpd", "LoadState")["LoadState"] == "not-found"  # daemon-reload ran
    for kept in (CONFIG, "/var/lib/scpd", "the user and group scpd"):
        assert f"kept {kept}" in result.stdout, result.stdout
