"""A target that refuses scpd for a reason no retry fixes (a changed host key, a key the
server does not accept) pauses, says so once, is probed rarely, and never holds up a healthy
target of the same watch. Each bad target is reached through a proxy that counts the
connections scpd makes to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import Setup, wait_until

from tools.faultproxy import FaultProxy
from tools.harness import target_block
from tools.sshd import ThrowawaySshd

FILES = 6
PROBE = "2s"  # retry_max of the bad targets: how often a paused target is tried again
WATCH_SECONDS = 5.0


def new_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
                   check=True)
    return path




def test_bad_host_key_and_bad_login_pause_their_targets_while_the_good_one_delivers(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path):
    watch_dir, state_dir = tmp_path / "outbox", tmp_path / "state"
    remotes = {name: tmp_path / "remote" / name for name in ("good", "badkey", "badauth")}
    for directory in (watch_dir, *remotes.values()):
        directory.mkdir(parents=True)
    with FaultProxy(sshd.port) as to_badkey, FaultProxy(sshd.port) as to_badauth:
        # badkey: the server's key is not the one known_hosts holds (a man in the middle?).
        wrong_key = new_key(tmp_path / "impostor")
        badkey_hosts = tmp_path / "known_hosts_badkey"
        badkey_hosts.write_text(f"[127.0.0.1]:{to_badkey.port} "
                                f"{(wrong_key.with_suffix('.pub')).read_text().strip()}\n")
        # badauth: the right server, but a key it does not accept.
        badauth_hosts = tmp_path / "known_hosts_badauth"
        sshd.write_known_hosts(badauth_hosts, port=to_badauth.port)
        stranger = new_key(tmp_path / "stranger")
        config = tmp_path / "scpd.toml"
        config.write_text(
            f'[daemon]\nstate_dir = "{state_dir}"\n'
            + target_block("good", sshd.port, sshd.user, sshd.client_key, known_hosts,
                           remotes["good"], retry_max=PROBE)
            + target_block("badkey", to_badkey.port, sshd.user, sshd.client_key, badkey_hosts,
                           remotes["badkey"], retry_max=PROBE)
            + target_block("badauth", to_badauth.port, sshd.user, stranger, badauth_hosts,
                           remotes["badauth"], retry_max=PROBE)
            + f'\n[[watch]]\nname = "outbox"\npath = "{watch_dir}"\n'
              'targets = ["good", "badkey", "badauth"]\nsettle = "300ms"\n')
        s = Setup(config=config, watch_dir=watch_dir, remote_dir=remotes["good"],
                  state_dir=state_dir)
        names = [f"report-{i}.csv" for i in range(FILES)]
        for name in names:
            (watch_dir / name).write_text(f"{name}\n" * 1000)

        daemon = s.start_daemon()
        try:
            assert wait_until(lambda: all((remotes["good"] / n).is_file() for n in names),
                              15.0), daemon.log()
            assert daemon.wait_for_log("target badkey paused: ", 5.0), daemon.log()
            assert daemon.wait_for_log("target badauth paused: ", 5.0), daemon.log()
            at_pause = {"badkey": to_badkey.connections, "badauth": to_badauth.connections}
            time.sleep(WATCH_SECONDS)
            log = daemon.log()
            status = json.loads(s.scpd("status", "--json").stdout)["targets"]
            probes = {"badkey": to_badkey.connections - at_pause["badkey"],
                      "badauth": to_badauth.connections - at_pause["badauth"]}
            landed_before_fix = {t: os.listdir(remotes[t]) for t in ("badkey", "badauth")}

            # The operator fixes both (known_hosts read at each connection; the key at
            # reload) and reloads: both targets catch up, nothing resent to the good one.
            sshd.write_known_hosts(badkey_hosts, port=to_badkey.port)
            config.write_text(config.read_text().replace(str(stranger), str(sshd.client_key)))
            daemon.process.send_signal(signal.SIGHUP)
            caught_up = wait_until(lambda: all((remotes[t] / n).is_file() for n in names
                                               for t in ("badkey", "badauth")), 15.0)
        finally:
            returncode = daemon.stop()

    assert "does not match known_hosts" in _line(log, "target badkey paused: ")
    assert "authentication failed" in _line(log, "target badauth paused: ")
    for target in ("badkey", "badauth"):
        # Said once, not once per file; the files wait (pending), none is marked failed.
        assert log.count(f"target {target} paused: ") == 1, log
        assert status[target]["paused"] is True, status
        # A probe in flight shows as sending; none of the files is failed.
        assert status[target]["pending"] + status[target]["sending"] == FILES, status
        assert status[target]["failed"] == 0, status
        assert landed_before_fix[target] == []
        # No hot loop: once paused, one probe per 2 s (2 or 3 in 5 s). Without the pause
        # every one of the six files would dial and fail at once.
        assert 1 <= probes[target] <= 4, (target, probes[target], log)
    assert status["good"]["paused"] is False and status["good"]["delivered"] == FILES
    assert " failed " not in log and "Traceback" not in log
    assert caught_up, daemon.log()
    assert daemon.log().count("sent report-0.csv to good:") == 1
    assert returncode == 0, daemon.log()
    assert not any(p.name.endswith(".scpd-part") for p in (tmp_path / "remote").rglob("*"))


def test_a_paused_target_resumes_at_once_when_an_operator_runs_retry(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    from conftest import write_config

    s = write_config(tmp_path, sshd, known_hosts, remote_dir,
                     target_extra='retry_max = "10m"')  # no probe within this test
    s.config.write_text(s.config.read_text().replace('retry_max = "1s"\n', ""))
    good_keys = known_hosts.read_text()
    known_hosts.write_text("")
    (s.watch_dir / "a.txt").write_text("a\n")

    daemon = s.start_daemon()
    try:
        assert daemon.wait_for_log("target local paused: ", 10.0), daemon.log()
        known_hosts.write_text(good_keys)
        retried = s.scpd("retry", "--target", "local")
        # Well before the next probe (10 min): the workers look at the pause every 5 s.
        landed = wait_until(lambda: (remote_dir / "a.txt").is_file(), 10.0)
    finally:
        returncode = daemon.stop()

    assert "target local resumed" in retried.stdout, retried.stdout
    assert landed, daemon.log()
    assert "resumed by an operator" in daemon.log()
    assert returncode == 0, daemon.log()
    assert os.stat(remote_dir / "a.txt").st_size == 2


def _line(log: str, needle: str) -> str:
    return next((line for line in log.splitlines() if needle in line), "")
