"""SFTP uploads, for accounts restricted to internal-sftp and servers without scp.

Temp name, data, mode and times, then posix-rename@openssh.com, which replaces atomically
(plain SFTPv3 rename refuses to overwrite).
"""

from __future__ import annotations

import os
import posixpath

import paramiko

from scpd.errors import (
    FileChangedError,
    RemotePathError,
    ScpdError,
    TransferInterrupted,
    classify,
)
from scpd.fileversion import FileVersion
from scpd.transport.base import LocalFile, Uploader, temp_name
from scpd.transport.ssh import SshConnection
from scpd.transport.throttle import Throttle

_CHUNK_BYTES = 32 * 1024  # one SFTP write request each; paramiko pipelines them


class SftpUploader(Uploader):
    def __init__(self, connection: SshConnection, throttle: Throttle):
        self.connection = connection
        self.throttle = throttle
        self.target = connection.target
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_transport: paramiko.Transport | None = None

    def close(self) -> None:
        self._sftp = None
        self.connection.close()

    def upload(self, local_path: str | os.PathLike[str], remote_path: str) -> FileVersion:
        with LocalFile(local_path) as local:
            sftp = self.client()
            # paramiko encodes str paths as strict UTF-8; bytes carry any file name.
            final = os.fsencode(remote_path)
            tmp = posixpath.join(posixpath.dirname(final),
                                 os.fsencode(temp_name(os.fsdecode(posixpath.basename(final)))))
            try:
                self.makedirs(sftp, posixpath.dirname(final))
                self._write(sftp, local, tmp)
                sftp.posix_rename(tmp, final)
                return local.version
            except ScpdError:
                self._remove_quietly(sftp, tmp)
                raise
            except OSError as exc:
                if isinstance(exc, ConnectionError | TimeoutError) or exc.errno is None:
                    # errno None is OpenSSH's generic SSH_FX_FAILURE, which is also how a
                    # full disk shows over SFTPv3: retry rather than give the file up.
                    self._remove_quietly(sftp, tmp)
                    raise TransferInterrupted(f"remote: {exc} while writing {os.fsdecode(tmp)}"
                                          ) from None
                self._remove_quietly(sftp, tmp)
                raise RemotePathError(f"remote: {exc.strerror or exc} ({remote_path})") from None
            except (EOFError, paramiko.SSHException) as exc:
                self.close()
                raise classify(exc) from None

    def client(self) -> paramiko.SFTPClient:
        transport = self.connection.transport()
        if self._sftp is None or self._sftp_transport is not transport:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(transport)
            except (EOFError, paramiko.SSHException, OSError) as exc:
                self.close()
                raise classify(exc) from None
            assert self._sftp is not None
            self._sftp.get_channel().settimeout(self.target.io_timeout_seconds)
            self._sftp_transport = transport
        return self._sftp

    def makedirs(self, sftp: paramiko.SFTPClient, directory: str | bytes) -> None:
        directory = os.fsencode(directory)
        try:
            sftp.stat(directory)
            return
        except FileNotFoundError:
            pass
        parent = posixpath.dirname(directory.rstrip(b"/"))
        if parent and parent != directory:
            self.makedirs(sftp, parent)
        try:
            sftp.mkdir(directory)
        except OSError as exc:
            try:
                sftp.stat(directory)  # created meanwhile by another worker is fine
            except OSError:
                raise exc from None

    def _write(self, sftp: paramiko.SFTPClient, local: LocalFile, tmp: bytes) -> None:
        chunk = self.throttle.chunk_bytes(_CHUNK_BYTES)
        with sftp.open(tmp, "wb") as remote:
            remote.set_pipelined(True)
            for data in local.read_chunks(chunk):
                self.throttle.take(len(data))
                remote.write(data)
            mode = (local.stat.st_mode & 0o7777) if self.target.preserve_mode else 0o644
            remote.chmod(mode)
        if self.target.preserve_times:
            sftp.utime(tmp, (local.stat.st_atime_ns / 1e9, local.stat.st_mtime_ns / 1e9))
        if local.has_changed():
            raise FileChangedError(f"{local.path} changed while it was sent")

    def _remove_quietly(self, sftp: paramiko.SFTPClient, path: bytes) -> None:
        try:
            sftp.remove(path)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # gone already, or the link is down: the next attempt overwrites it


