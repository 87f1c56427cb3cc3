"""The SCP source side, written for scpd over a paramiko exec channel.

One remote command per file, its exit status checked:

    { mkdir -p -- DIR && { rm -f -- STALE || :; } && scp -p -t -- TMP && read -r go &&
      [ "$go" = publish ] && mv -f -- TMP FINAL; } || { rm -f -- TMP; exit 1; }

(with a guard that refuses to mv onto a directory named FINAL). STALE is the temporary file
of the previous attempt at this file, which a crash of the remote leaves behind; the queue
remembers its name.

Once this client has seen the whole file acknowledged it ends the scp with an `E` record
(the sink reads its input a byte at a time, so nothing more is consumed) and sends `publish`.
A session that the network cut, but that is still alive on the remote, reads end of input
instead: it removes its temp file and never renames (it could put an old version over the
newer one its retry delivered).

Every remote path is shell-quoted (file names are data, never shell), exactly the announced
number of bytes is sent, and a file that changed while it was read is aborted with a fatal
\\x02 record so that the remote scp exits non-zero and the temporary copy is removed.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import time
from collections.abc import Callable

import paramiko

from scpd.errors import (
    FileChangedError,
    RemotePathError,
    ScpdError,
    TransferInterrupted,
    classify,
    classify_remote_message,
)
from scpd.fileversion import FileVersion
from scpd.transport.base import LocalFile, Uploader, temp_name
from scpd.transport.ssh import SshConnection
from scpd.transport.throttle import Throttle

_CHUNK_BYTES = 256 * 1024  # 16 KiB to 256 KiB measured equal; larger costs paramiko copies
_SLICE_BYTES = 32704  # the payload of one packet under OpenSSH's 32 KiB maximum


class ScpUploader(Uploader):
    def __init__(self, connection: SshConnection, throttle: Throttle):
        self.connection = connection
        self.throttle = throttle
        self.target = connection.target

    def close(self) -> None:
        self.connection.close()

    def retire(self) -> None:
        self.connection.retire()

    def upload(self, local_path: str | os.PathLike[str], remote_path: str,
               expected: FileVersion | None = None, *, stale_temp_path: str | None = None,
               note_temp: Callable[[str], None] | None = None) -> FileVersion:
        self.progress_at = time.monotonic()
        with LocalFile(local_path, expected) as local:
            try:
                return self._send(local, remote_path, stale_temp_path, note_temp)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self.connection.close()  # a half-dead connection is rebuilt, not reused
                raise classify(exc) from None
            except TransferInterrupted:
                self.connection.close()
                raise

    def _send(self, local: LocalFile, final: str, stale: str | None,
              note_temp: Callable[[str], None] | None) -> FileVersion:
        target = self.target
        tmp = posixpath.join(posixpath.dirname(final),
                             temp_name(posixpath.basename(final), is_per_attempt=True))
        transport = self.connection.transport()
        if note_temp is not None:
            note_temp(tmp)
        channel = transport.open_session(timeout=target.connect_timeout_seconds)
        try:
            channel.settimeout(target.io_timeout_seconds)
            channel.exec_command(os.fsencode(self._receive_command(final, tmp, stale)))
            self._expect_ack(channel)
            version = local.version
            if target.preserve_times:
                st = local.stat
                channel.sendall(_time_record(st.st_mtime_ns, st.st_atime_ns))
                self._expect_ack(channel)
            mode = (local.stat.st_mode & 0o7777) if target.preserve_mode else 0o644
            # The sink writes to TMP, the name in the C record is only checked for sanity.
            channel.sendall(f"C{mode:04o} {version.size} scpd-upload\n".encode())
            self._expect_ack(channel)
            self._send_data(channel, local)
            if local.has_changed():
                channel.sendall(b"\x02scpd: source changed while it was sent\n")
                self._wait_exit(channel)
                raise FileChangedError(f"{local.path} changed while it was sent")
            channel.sendall(b"\x00")
            self._expect_ack(channel, is_last=True)
            channel.sendall(b"E\n")  # ends the remote scp, which acknowledges and exits 0
            self._expect_ack(channel)
            channel.sendall(b"publish\n")
            channel.shutdown_write()
            status, stderr = self._wait_exit(channel)
            if status != 0:
                raise _remote_failure(status, stderr)
            return version
        finally:
            channel.close()

    def _receive_command(self, final: str, tmp: str, stale: str | None) -> str:
        q = shlex.quote
        flags = "-p " if (self.target.preserve_times or self.target.preserve_mode) else ""
        directory = posixpath.dirname(final) or "."
        # Best effort: a stale file that cannot be removed must not stop this attempt.
        clear_stale = (f" {{ rm -f -- {q(stale)} 2>/dev/null || :; }} &&"
                       if stale and stale != tmp else "")
        # mv onto an existing directory would move the file inside it: refuse that instead.
        publish = (f"if [ -d {q(final)} ]; then printf 'scpd: %s: Is a directory\\n' {q(final)}"
                   f" >&2; false; else mv -f -- {q(tmp)} {q(final)}; fi")
        return (f"{{ mkdir -p -- {q(directory)} &&{clear_stale} scp {flags}-t -- {q(tmp)} &&"
                f' IFS= read -r go && [ "$go" = publish ] && {publish}; }}'
                f" || {{ rm -f -- {q(tmp)}; exit 1; }}")

    def _send_data(self, channel: paramiko.Channel, local: LocalFile) -> None:
        chunk = self.throttle.chunk_bytes(_CHUNK_BYTES)
        for data in local.read_chunks(chunk):
            self.throttle.take(len(data))
            view = memoryview(data)
            # Slices of one SSH packet's payload: each return is a sign of life on slow links.
            for start in range(0, len(view), _SLICE_BYTES):
                channel.sendall(view[start:start + _SLICE_BYTES])
                self.progress_at = time.monotonic()

    def _expect_ack(self, channel: paramiko.Channel, *, is_last: bool = False) -> None:
        code = self._recv_last_ack(channel) if is_last else channel.recv(1)
        self.progress_at = time.monotonic()
        if code == b"\x00":
            return
        if not code:
            status, stderr = self._wait_exit(channel)
            raise _remote_failure(status, stderr)
        message = _read_line(channel)
        if code in (b"\x01", b"\x02"):
            raise classify_remote_message(message)
        # Not the SCP protocol at all: e.g. "This service allows sftp connections only."
        raise RemotePathError(f"remote did not speak SCP: {(code.decode('latin-1') + message)!r}"
                              " (try protocol = \"sftp\")")

    def _recv_last_ack(self, channel: paramiko.Channel) -> bytes:
        """The ack of the whole file comes once the remote has read everything still in
        flight, which on a slow link takes longer than io_timeout: wait as long as the
        kernel's send queue keeps draining, and io_timeout past the moment it stops."""
        channel.settimeout(1.0)
        try:
            unsent, still_since = self.connection.unsent_bytes(), time.monotonic()
            while True:
                try:
                    return channel.recv(1)
                except TimeoutError:
                    now = time.monotonic()
                    now_unsent = self.connection.unsent_bytes()
                    if now_unsent is not None and unsent is not None and now_unsent < unsent:
                        still_since = self.progress_at = now
                    elif now - still_since > self.target.io_timeout_seconds:
                        raise
                    unsent = now_unsent
        finally:
            channel.settimeout(self.target.io_timeout_seconds)

    def _wait_exit(self, channel: paramiko.Channel) -> tuple[int | None, str]:
        if not channel.status_event.wait(self.target.io_timeout_seconds):
            return None, ""
        stderr = b""
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(4096)
        return channel.recv_exit_status(), stderr.decode("utf-8", "replace").strip()


def _time_record(mtime_ns: int, atime_ns: int) -> bytes:
    # OpenSSH's sink takes microseconds in the T record; most clients send 0 there.
    m_sec, m_ns = divmod(mtime_ns, 1_000_000_000)
    a_sec, a_ns = divmod(atime_ns, 1_000_000_000)
    return f"T{m_sec} {m_ns // 1000} {a_sec} {a_ns // 1000}\n".encode()


def _read_line(channel: paramiko.Channel, limit: int = 4096) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        byte = channel.recv(1)
        if not byte:
            break
        data += byte
    return data.decode("utf-8", "replace").strip()


def _remote_failure(status: int | None, stderr: str) -> ScpdError:
    if status is None:
        return TransferInterrupted("remote closed the channel without an exit status")
    if status == 127:
        return RemotePathError(f"scp is not installed on the remote ({stderr})")
    if stderr:
        return classify_remote_message(stderr)
    return TransferInterrupted(f"remote command exited {status}")
