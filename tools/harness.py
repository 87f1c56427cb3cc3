"""What the integration tests and the fault bench share: an scpd config aimed at a throwaway
sshd, a bounded wait, and a tmpfs of the sshd's own (for a full remote disk)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tools.sshd import ThrowawaySshd


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    """Poll condition until it holds or timeout seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return condition()


def scpd_config_text(sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path, watch_dir: Path,
                     state_dir: Path, *, port: int | None = None, target_extra: str = "",
                     watch_extra: str = "") -> str:
    """One target `local` (the sshd, or `port` in front of it) and one watch `outbox`."""
    return f"""
[daemon]
state_dir = "{state_dir}"
{target_block("local", port or sshd.port, sshd.user, sshd.client_key, known_hosts, remote_dir,
              extra=target_extra)}
[[watch]]
name = "outbox"
path = "{watch_dir}"
targets = ["local"]
settle = "300ms"
{watch_extra}
"""


def target_block(name: str, port: int, user: str, identity_file: Path, known_hosts: Path,
                 remote_dir: Path, *, retry_max: str = "1s", extra: str = "") -> str:
    """A target on 127.0.0.1 with short timeouts and a fast backoff (200 ms doubling to
    retry_max): faults resolve in seconds."""
    return f"""
[targets.{name}]
host = "127.0.0.1"
port = {port}
user = "{user}"
identity_file = "{identity_file}"
known_hosts = "{known_hosts}"
remote_dir = "{remote_dir}"
connect_timeout = "3s"
io_timeout = "5s"
retry_initial = "200ms"
retry_max = "{retry_max}"
{extra}
"""


def private_mount_namespace_problem() -> str | None:
    """Why a private mount namespace cannot be made here (not root, no unshare, a chroot whose
    / is not a mount point), or None if it can."""
    if os.geteuid() != 0:
        return "needs root: a private mount namespace (unshare -m) needs CAP_SYS_ADMIN"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"no private mount namespace here: {probe.stderr.strip()}"
    return None


def private_tmpfs_launcher(mount_point: Path, size: str) -> list[str]:
    """A ThrowawaySshd launcher: sshd in a mount namespace of its own, with a tmpfs of `size`
    on mount_point that the machine never sees (it vanishes with the sshd)."""
    # -n: libmount would otherwise note the mount in the machine's /run/mount/utab.
    mount_then_exec = (f"mount -n -t tmpfs -o size={shlex.quote(size)} scpd-test"
                       f' {shlex.quote(str(mount_point))} && exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", mount_then_exec, "sh"]
