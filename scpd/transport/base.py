"""What every transport shares: the Uploader interface and careful reading of the local file."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator

from scpd.errors import FileChangedError, LocalReadError, SourceVanished
from scpd.fileversion import FileVersion

_NAME_MAX_BYTES = 255


class Uploader(ABC):
    """Puts one local file at one remote path, atomically: all of it under the final name, or
    nothing there. Returns the version it sent; raises the scpd error family."""

    @abstractmethod
    def upload(self, local_path: str | os.PathLike[str], remote_path: str) -> FileVersion: ...

    @abstractmethod
    def close(self) -> None: ...


def temp_name(final_name: str) -> str:
    """The hidden name a file is written under before it is renamed into place."""
    name = f".{final_name}.scpd-part"
    if len(os.fsencode(name)) <= _NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(os.fsencode(final_name)).hexdigest()[:32]
    return f".{digest}.scpd-part"


class LocalFile:
    """An open local file, its version at open, and the means to notice it changing."""

    def __init__(self, path: str | os.PathLike[str]):
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
            raise LocalReadError(f"cannot read {self.path}: {exc.strerror}") from None
        self.stat = os.fstat(self.fd)
        if not stat.S_ISREG(self.stat.st_mode):
            os.close(self.fd)
            raise LocalReadError(f"{self.path} is not a regular file; not sent")
        self.version = FileVersion.of(self.stat)

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
            yield data

    def has_changed(self) -> bool:
        """True if the open file was written to, or the path now names another file."""
        if FileVersion.of(os.fstat(self.fd)) != self.version:
            return True
        try:
            return FileVersion.of(os.stat(self.path, follow_symlinks=False)) != self.version
        except OSError:
            return True
