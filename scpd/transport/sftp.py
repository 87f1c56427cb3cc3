"""SFTP uploads, for accounts restricted to internal-sftp and servers without scp.

A temporary name of this attempt's own, created exclusively (O_EXCL, which also refuses a
symbolic link there), data, mode and times set through the open handle, then
posix-rename@openssh.com, which replaces atomically (plain SFTPv3 rename refuses to
overwrite).
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections.abc import Callable, Sequence

import paramiko
from paramiko.sftp import CMD_EXTENDED

from scpd.errors import (
    FileChangedError,
    RemotePathError,
    ScpdError,
    TransferInterrupted,
    classify,
    classify_sftp,
)
from scpd.fileversion import FileVersion
from scpd.transport.base import (
    LocalFile,
    ResultCallback,
    TempCallback,
    Upload,
    Uploader,
    check_remote_path,
    directories_below,
    symlink_refusal,
    temp_name,
)
from scpd.transport.ssh import SshConnection
from scpd.transport.throttle import Throttle

# SFTPv3 carries times as unsigned 32-bit seconds: 1970 to February 2106.
_LATEST_SFTP_SECONDS = 2**32 - 1
_CHUNK_BYTES = 32 * 1024  # one SFTP write request each; paramiko pipelines them


class SftpUploader(Uploader):
    def __init__(self, connection: SshConnection, throttle: Throttle):
        self.connection = connection
        self.throttle = throttle
        self.target = connection.target
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_transport: paramiko.Transport | None = None
        self._checked_dirs: set[str] = set()  # remote_dir and real directories below it

    def close(self) -> None:
        self._sftp = None
        self.connection.close()

    def retire(self) -> None:
        self._sftp = None
        self.connection.retire()

    def upload_batch(self, uploads: Sequence[Upload], on_results: ResultCallback,
                     note_temps: TempCallback | None = None) -> None:
        """As the base does, with each directory checked once per batch (at most a MiB of
        files), as the SCP agent checks it: a stat and a lstat per file made 9 requests of a
        small file one level down instead of 7 (measured: 10-20 % more files/s cached)."""
        self._checked_dirs.clear()
        try:
            super().upload_batch(uploads, on_results, note_temps)
        finally:
            self._checked_dirs.clear()

    def _upload_one(self, item: Upload, note_temp: Callable[[str], None] | None
                    ) -> FileVersion:
        self.progress_at = time.monotonic()
        tmp_text = posixpath.join(posixpath.dirname(item.remote_path), temp_name(
            posixpath.basename(item.remote_path), is_per_attempt=True))
        check_remote_path(item, tmp_text)
        sftp = self.client()
        if item.stale_temp_path is not None:
            # What a cut attempt left. If the remote still runs its session, the writes it
            # has queued go on into the unlinked file, and a rename it has queued finds
            # nothing to rename: never a mix with this attempt's file. Removed first: before
            # the new name replaces it in the queue, and before a vanished local file drops
            # the job with its record.
            self._remove_quietly(sftp, os.fsencode(item.stale_temp_path))
        with self.sending_file(LocalFile(item.local_path, item.expected)) as local:
            # paramiko encodes str paths as strict UTF-8; bytes carry any file name.
            final, tmp = os.fsencode(item.remote_path), os.fsencode(tmp_text)
            if note_temp is not None:
                note_temp(tmp_text)
            remote: paramiko.SFTPFile | None = None  # once set, tmp is ours to remove
            try:
                self._enter(sftp, item)
                remote = self._create(sftp, item, tmp)
                self._write(remote, local, tmp)
                if (refusal := rename_into_place(sftp, [(tmp, final)])[0]) is not None:
                    raise refusal
                return local.version
            except ScpdError:
                if remote is not None:
                    self._remove_quietly(sftp, tmp)
                raise
            except (EOFError, paramiko.SSHException, ConnectionError, TimeoutError) as exc:
                self.close()  # a half-open connection would stall every retry again
                raise classify(exc) from None
            except OSError as exc:
                if sftp.get_channel().closed:  # "Socket is closed": the channel, not the file
                    self._sftp = None
                    raise TransferInterrupted(f"sftp channel closed: {exc}") from None
                if remote is not None:
                    self._remove_quietly(sftp, tmp)
                raise classify_sftp(exc, item.remote_path) from None

    def client(self) -> paramiko.SFTPClient:
        transport = self.connection.transport()
        sftp = self._sftp
        # The sftp channel can close while the connection lives on (a server ChannelTimeout,
        # an sftp-server that died): then open a new one.
        if sftp is None or self._sftp_transport is not transport or sftp.get_channel().closed:
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

    def _enter(self, sftp: paramiko.SFTPClient, item: Upload) -> None:
        """Make the file's directory ready: remote_dir like mkdir -p (it may be a symbolic
        link: operators point it at a mount), and below it only real directories, each made
        if missing."""
        if item.base is None:
            self.makedirs(sftp, posixpath.dirname(item.remote_path))
            return
        if item.base not in self._checked_dirs:
            self.makedirs(sftp, item.base)
            self._checked_dirs.add(item.base)
        for directory in directories_below(item.base, item.remote_path):
            if directory not in self._checked_dirs:
                self._real_directory(sftp, directory, item.base)
                self._checked_dirs.add(directory)

    def _create(self, sftp: paramiko.SFTPClient, item: Upload, tmp: bytes
                ) -> paramiko.SFTPFile:
        """The temporary file, new (O_CREAT | O_EXCL: never one, or a link, put there)."""
        try:
            return sftp.open(tmp, "wxb")
        except FileNotFoundError:
            if item.base is None:
                raise
            # Its directory, checked earlier in the batch, is gone (a consumer cleared what
            # it took): check and make it again, once.
            self._checked_dirs.clear()
            self._enter(sftp, item)
            return sftp.open(tmp, "wxb")

    def _real_directory(self, sftp: paramiko.SFTPClient, directory: str, base: str) -> None:
        """directory, made if missing; refused if it is a symbolic link (lstat: the link, not
        where it leads), which would take the file outside remote_dir. SFTP has no way to
        enter a directory without following links: this keeps out a link that is there, not
        one swapped in between this check and the write."""
        raw = os.fsencode(directory)
        try:
            mode = sftp.lstat(raw).st_mode
        except FileNotFoundError:
            try:
                sftp.mkdir(raw)
                return
            except OSError as exc:
                try:
                    mode = sftp.lstat(raw).st_mode  # made meanwhile, by another worker?
                except OSError:
                    raise exc from None
        if mode is not None and stat.S_ISLNK(mode):
            raise symlink_refusal(directory, base)
        if mode is not None and not stat.S_ISDIR(mode):
            raise RemotePathError(f"remote: Not a directory ({directory})")

    def _write(self, remote: paramiko.SFTPFile, local: LocalFile, tmp: bytes) -> None:
        """The data, then mode and times, through the handle (fsetstat): by path, they would
        go to whatever the name leads to by then."""
        chunk = self.throttle.chunk_bytes(_CHUNK_BYTES)
        with remote:
            remote.set_pipelined(True)
            for data in local.read_chunks(chunk):
                self.throttle.take(len(data))
                remote.write(data)
                self.progress_at = time.monotonic()
            remote.flush()
            _wait_for_write_replies(remote, self._note_progress)
            remote.chmod((local.stat.st_mode & 0o7777) if self.target.preserve_mode else 0o644)
            if self.target.preserve_times and \
                    self.can_carry_times(local, _LATEST_SFTP_SECONDS):
                remote.utime((local.stat.st_atime_ns / 1e9, local.stat.st_mtime_ns / 1e9))
            written = remote.stat().st_size
        if written != local.version.size:
            raise TransferInterrupted(f"remote holds {written} of {local.version.size} bytes"
                                      f" of {os.fsdecode(tmp)}")
        if local.has_changed():
            raise FileChangedError(f"{local.path} changed while it was sent")

    def _note_progress(self) -> None:
        self.progress_at = time.monotonic()

    def _remove_quietly(self, sftp: paramiko.SFTPClient, path: bytes) -> None:
        try:
            sftp.remove(path)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # gone already, or the link is down: the next attempt overwrites it




def _wait_for_write_replies(remote: paramiko.SFTPFile, on_reply: Callable[[], None]) -> None:
    """Collect the status of every pipelined write, in order, raising on the first error.

    paramiko files pipelined write replies under no file object: a reply that arrives while
    it waits for another request (chmod, close) is dropped unread, so a failed write (a full
    disk) would go unnoticed. Reading each one here, before any other request, sees them all.
    """
    pending = remote._reqs  # noqa: SLF001 -- paramiko has no public way to await writes
    while pending:
        remote.sftp._read_response(pending.popleft())  # noqa: SLF001 -- raises on error
        on_reply()


def rename_into_place(sftp: paramiko.SFTPClient, pairs: list[tuple[bytes, bytes]]
                      ) -> list[ScpdError | None]:
    """posix-rename@openssh.com each (temp, final), which replaces atomically (plain SFTPv3
    rename refuses to). Pipelined: one round trip for them all. None where it was done."""
    numbers = [sftp._async_request(type(None), CMD_EXTENDED,  # noqa: SLF001 -- see below
                                   "posix-rename@openssh.com", temp, final)
               for temp, final in pairs]
    refused: dict[int, OSError] = {}
    for index, number in enumerate(numbers):
        try:
            # paramiko answers one request at a time; replies are read in order here, and
            # nothing else is asked before all are in (it would drop them unread).
            sftp._read_response(number)  # noqa: SLF001
        except OSError as exc:
            if sftp.get_channel().closed:  # the channel, not the file
                raise TransferInterrupted(f"sftp channel closed: {exc}") from None
            refused[index] = exc
    return [_rename_refusal(sftp, final, refused[index]) if index in refused else None
            for index, (_, final) in enumerate(pairs)]


def _rename_refusal(sftp: paramiko.SFTPClient, final: bytes, exc: OSError) -> ScpdError:
    if exc.errno is None and _is_dir(sftp, final):
        return RemotePathError(f"remote: {os.fsdecode(final)}: Is a directory")
    return classify_sftp(exc, os.fsdecode(final))


def _is_dir(sftp: paramiko.SFTPClient, path: bytes) -> bool:
    try:
        return stat.S_ISDIR(sftp.stat(path).st_mode or 0)
    except OSError:
        return False
