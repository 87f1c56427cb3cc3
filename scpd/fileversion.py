"""The version of a local file: what the queue records and what the transport proves it sent."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FileVersion:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileVersion:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)

    def same_content_as(self, other: FileVersion | None) -> bool:
        """Size and mtime decide 'already sent' (DESIGN 4.4); the inode may change on restore."""
        return other is not None and (self.size, self.mtime_ns) == (other.size, other.mtime_ns)
