"""Transport: one Uploader interface, SCP (default) and SFTP behind it."""

from __future__ import annotations

import shlex

import paramiko

from scpd.config import Target
from scpd.errors import classify_remote_message, classify_sftp
from scpd.transport.base import Upload, Uploader
from scpd.transport.scp import ScpUploader
from scpd.transport.sftp import SftpUploader
from scpd.transport.ssh import Credentials, SshConnection, load_credentials, run_remote
from scpd.transport.throttle import Throttle, TokenBucket

__all__ = ["Credentials", "Throttle", "TokenBucket", "Upload", "Uploader", "load_credentials",
           "open_uploader", "probe"]


def open_uploader(target: Target, credentials: Credentials, throttle: Throttle) -> Uploader:
    """An uploader with its own connection (opened lazily on the first upload)."""
    connection = SshConnection(target, credentials)
    if target.protocol == "sftp":
        return SftpUploader(connection, throttle)
    return ScpUploader(connection, throttle)


def probe(target: Target, credentials: Credentials, remote_dirs: list[str]) -> list[str]:
    """Connect and prove the target usable: host key, auth, each remote dir created and
    writable, scp (or sftp) available. Returns what was checked; raises the scpd errors."""
    connection = SshConnection(target, credentials)
    try:
        transport = connection.transport()
        checked = [f"host key and login as {target.user}@{target.host}:{target.port}"]
        if target.protocol == "sftp":
            uploader = SftpUploader(connection, Throttle([]))
            sftp = uploader.client()
            for directory in remote_dirs:
                probe_path = f"{directory.rstrip('/')}/.scpd-check"
                try:
                    uploader.makedirs(sftp, directory)
                    with sftp.open(probe_path, "wb") as f:
                        f.write(b"")
                    sftp.remove(probe_path)
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    raise classify_sftp(exc, directory) from None
                checked.append(f"{directory} writable over sftp")
            return checked
        for directory in remote_dirs:
            status, output = run_remote(transport, target, probe_script(directory))
            if status != 0:
                raise classify_remote_message(output or f"check exited {status}")
            checked.append(f"{directory} writable, scp present")
        return checked
    finally:
        connection.close()


def probe_script(directory: str) -> str:
    q = shlex.quote(directory)
    return (f"mkdir -p -- {q} && test -w {q} || {{ printf '%s: Permission denied\\n' {q} >&2;"
            " exit 1; }; command -v scp >/dev/null || { echo 'scp: command not found' >&2;"
            " exit 127; }")
