"""What every transport shares: the Uploader interface and careful reading of the local file."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import secrets
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scpd.errors import (
    ConnectError,
    FileChangedError,
    LocalBusyError,
    LocalReadError,
    PermanentError,
    RemotePathError,
    ScpdError,
    SourceVanished,
    TransferInterrupted,
    shortened,
)
from scpd.fileversion import FileVersion

if TYPE_CHECKING:
    from scpd.config import Target
    from scpd.transport.ssh import SshConnection
    from scpd.transport.throttle import Throttle

log = logging.getLogger("scpd.transport")

_NAME_MAX_BYTES = 255
# PATH_MAX of Linux (4096) counts the final NUL: every system call refuses a longer path, so
# one is refused here, before anything is sent (BSDs allow less: their refusal is sorted too).
_PATH_MAX_BYTES = 4095
# A conflicting lease (Samba oplocks, knfsd), or out of file descriptors: try again later.
_TRANSIENT_OPEN_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EMFILE, errno.ENFILE,
                          errno.EINTR}


@dataclass(frozen=True)
class Upload:
    """One file to put at one remote path. expected: send only this version (size, mtime).
    stale_temp_path: where an earlier attempt at this file wrote; a crash of the remote may
    have left it there, and it is removed first. base: the target's remote_dir, which
    remote_path lies below; the directories between them are made and entered only if real
    (a symbolic link there would lead the file outside remote_dir)."""

    local_path: str | os.PathLike[str]
    remote_path: str
    expected: FileVersion | None = None
    stale_temp_path: str | None = None
    base: str | None = None


#: on_results([(index in the batch, the version now under the final name, or why not), ...])
ResultCallback = Callable[[list[tuple[int, "FileVersion | ScpdError"]]], None]
#: note_temps([(index in the batch, remote temporary path), ...]): told before anything is
#: written there
TempCallback = Callable[[list[tuple[int, str]]], None]


class Uploader(ABC):
    """Puts local files at remote paths, each atomically: all of it under the final name, or
    nothing there. Raises (or reports) the scpd error family."""

    #: time.monotonic() of the last sign of life of the transfer in progress (a stall guard
    #: closes the connection when it gets too old: some paramiko waits have no timeout).
    progress_at: float = 0.0
    #: Each uploader has its own connection.
    connection: SshConnection
    target: Target
    #: The caps it draws from; it also counts the bytes that went out.
    throttle: Throttle
    #: The local file whose bytes are going out now (the status line names it).
    sending: LocalFile | None = None

    @property
    def connected_at(self) -> float:
        """time.monotonic() when its connection last got through host key and login."""
        return self.connection.connected_at

    def upload(self, local_path: str | os.PathLike[str], remote_path: str,
               expected: FileVersion | None = None, *, stale_temp_path: str | None = None,
               note_temp: Callable[[str], None] | None = None, base: str | None = None
               ) -> FileVersion:
        """One file: the version it sent, or the error raised."""
        results: list[FileVersion | ScpdError] = []
        self.upload_batch([Upload(local_path, remote_path, expected, stale_temp_path, base)],
                          lambda outcomes: results.extend(o for _, o in outcomes),
                          None if note_temp is None else lambda temps: note_temp(temps[0][1]))
        if isinstance(results[0], ScpdError):
            raise results[0]
        return results[0]

    def upload_batch(self, uploads: Sequence[Upload], on_results: ResultCallback,
                     note_temps: TempCallback | None = None) -> None:
        """Every upload, in order; each outcome is told to on_results as soon as it is known
        (those known together, together: the caller records them in one go, and a crash
        after a file landed costs at most a resend of what was not told yet).
        The default sends them one by one; an error that says the connection or the target
        is unusable ends the batch, and the rest get the same error without being tried."""
        for index, item in enumerate(uploads):
            try:
                outcome: FileVersion | ScpdError = self._upload_one(
                    item, None if note_temps is None else
                    lambda temp, index=index: note_temps([(index, temp)]))
            except ScpdError as error:
                outcome = error
            if isinstance(outcome, ScpdError) and ends_batch(outcome):
                on_results([(rest, outcome) for rest in range(index, len(uploads))])
                return
            on_results([(index, outcome)])

    def _upload_one(self, item: Upload, note_temp: Callable[[str], None] | None
                    ) -> FileVersion:
        raise NotImplementedError

    def prepare(self) -> None:
        """Open now what the next upload needs (connection, session), so that the first file
        does not wait for a login. Raises the scpd error family."""
        self.connection.transport()

    @contextmanager
    def sending_file(self, local: LocalFile) -> Iterator[LocalFile]:
        """Send from `local` (closed afterwards), shown as the file in progress meanwhile."""
        with local:
            self.sending = local
            try:
                yield local
            finally:
                self.sending = None

    def can_carry_times(self, local: LocalFile, latest_seconds: int) -> bool:
        """Whether the file's mtime and atime fit the protocol's fields (from 1970 to
        latest_seconds). One that does not is sent without its times, with a warning: a
        date no remote can hold must not hold up the file, or the batch it travels in."""
        times = (local.stat.st_mtime_ns // 10**9, local.stat.st_atime_ns // 10**9)
        if all(0 <= seconds <= latest_seconds for seconds in times):
            return True
        log.warning("%s: its times (mtime %d, atime %d) do not fit the %s protocol; sent"
                    " without them (the remote file gets the time of its arrival)",
                    local.path, *times, self.target.protocol.upper())
        return False

    @abstractmethod
    def close(self) -> None:
        """Drop the connection; the next upload opens a new one."""

    @abstractmethod
    def retire(self) -> None:
        """Drop the connection for good: a later upload fails instead of reconnecting."""


def ends_batch(error: ScpdError) -> bool:
    """The connection is gone or the target refuses us: the rest of a batch would fail too."""
    return isinstance(error, ConnectError | TransferInterrupted) or (
        isinstance(error, PermanentError) and error.is_target_level)


def temp_name(final_name: str, *, is_per_attempt: bool) -> str:
    """The hidden name a file is written under before it is renamed into place.

    Both transports take a name per attempt. A session cut by the network may still run on
    the remote for a while (writing to its temporary file, even renaming it), so it must
    never share a name with the retry's; the store records each name before anything is
    written there, and the next attempt removes it. And a name no one can guess is one no one
    can plant a symbolic link at, to have the file written elsewhere.
    A name too long, or with a newline (an SCP record cannot carry one), gets a digest.
    """
    token = f".{secrets.token_hex(4)}" if is_per_attempt else ""
    name = f".{final_name}{token}.scpd-part"
    if len(os.fsencode(name)) <= _NAME_MAX_BYTES and "\n" not in name:
        return name
    digest = hashlib.sha256(os.fsencode(final_name)).hexdigest()[:32]
    return f".{digest}{token}.scpd-part"


def check_remote_path(item: Upload, temp: str) -> None:
    """Raise RemotePathError if the file must not or cannot go to item.remote_path (or be
    written at temp first): outside its base, climbing out of it by "..", or longer than a
    remote takes. Nothing is sent for it: a retry would meet the same refusal."""
    for path in (item.remote_path, temp):
        size = len(os.fsencode(path))
        if size > _PATH_MAX_BYTES:
            raise RemotePathError(f"File name too long for the remote: {shortened(path)} is"
                                  f" {size} bytes; a remote path may have at most"
                                  f" {_PATH_MAX_BYTES} (not sent)")
    directories_below(item.base, item.remote_path)


def directories_below(base: str | None, path: str) -> list[str]:
    """The directories between base (excluded) and the file at path, outermost first: those
    that must be real directories, not symbolic links. Raises RemotePathError if path is not
    below base, or climbs out of it with a ".." (a relative path from the watched tree never
    holds one; refused all the same, so that no join can lead outside remote_dir)."""
    if base is None:
        return []
    root = base.rstrip("/") or base[:1]  # "/" stays "/"
    prefix = root if root in ("", "/") else root + "/"
    parts = [part for part in path[len(prefix):].split("/") if part] \
        if path.startswith(prefix) else []
    if not parts:
        raise RemotePathError(f"remote: {path} is not below remote_dir {base}; not sent")
    if ".." in parts:
        raise RemotePathError(f"remote: {path} has a \"..\" component, which could lead"
                              f" outside remote_dir {base}; not sent")
    return [posixpath.join(root, *parts[:depth]) for depth in range(1, len(parts))]


def symlink_refusal(path: str, base: str) -> RemotePathError:
    """What a symbolic link met below remote_dir means, the same for every transport."""
    return RemotePathError(f"remote: {path} is a symbolic link: scpd makes and enters only"
                           f" real directories below remote_dir {base}, so that no file lands"
                           " outside it (replace the link by a directory, or set remote_dir"
                           " to where it leads)")


class LocalFile:
    """An open local file, its version at open, and the means to notice it changing."""

    def __init__(self, path: str | os.PathLike[str], expected: FileVersion | None = None):
        self.path = os.fspath(path)
        # O_NOFOLLOW: symlinks are never followed out of the watched tree.
        # O_NONBLOCK: opening a FIFO that slipped through must not hang the worker.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise SourceVanished(f"{self.path} no longer exists") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LocalReadError(f"{self.path} is a symbolic link; not sent") from None
            if exc.errno in _TRANSIENT_OPEN_ERRNOS:
                raise LocalBusyError(f"cannot open {self.path} now: {exc.strerror}") from None
            raise LocalReadError(f"cannot read {self.path}: {exc.strerror}") from None
        self.stat = os.fstat(self.fd)
        self.bytes_read = 0  # how far the transfer has got: the status line's percent
        if not stat.S_ISREG(self.stat.st_mode):
            os.close(self.fd)
            raise LocalReadError(f"{self.path} is not a regular file; not sent")
        self.version = FileVersion.of(self.stat)
        if expected is not None and not self.version.same_content_as(expected):
            # Only the settled version is sent: a file changed since is still being written,
            # and the settler queues its new version once it is ready.
            os.close(self.fd)
            raise FileChangedError(f"{self.path} changed since it was queued")

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)

    def read_chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        """Exactly `version.size` bytes, never more, however the file grows meanwhile."""
        remaining = self.version.size
        while remaining:
            try:
                data = os.read(self.fd, min(chunk_bytes, remaining))
            except OSError as exc:
                raise LocalReadError(f"cannot read {self.path}: {exc.strerror}") from None
            if not data:
                raise FileChangedError(f"{self.path} shrank while it was sent")
            remaining -= len(data)
            self.bytes_read += len(data)
            yield data

    def has_changed(self) -> bool:
        """True if the open file was written to, or the path now names another file."""
        if FileVersion.of(os.fstat(self.fd)) != self.version:
            return True
        try:
            return FileVersion.of(os.stat(self.path, follow_symlinks=False)) != self.version
        except OSError:
            return True
