"""Transport: one Uploader interface, SCP (default) and SFTP behind it."""

from __future__ import annotations

from scpd.config import Target
from scpd.transport.base import Upload, Uploader
from scpd.transport.scp import ScpUploader
from scpd.transport.sftp import SftpUploader
from scpd.transport.ssh import Credentials, SshConnection, load_credentials
from scpd.transport.throttle import Throttle, TokenBucket

__all__ = ["Credentials", "Throttle", "TokenBucket", "Upload", "Uploader", "load_credentials",
           "open_uploader"]


def open_uploader(target: Target, credentials: Credentials, throttle: Throttle) -> Uploader:
    """An uploader with its own connection (opened lazily on the first upload)."""
    connection = SshConnection(target, credentials)
    if target.protocol == "sftp":
        return SftpUploader(connection, throttle)
    return ScpUploader(connection, throttle)
