"""The SCP source side, written for scpd over a paramiko exec channel.

One long-lived remote session per connection: a small POSIX shell loop (the agent, below)
that runs `scp -t -d DIR` for each batch of files bound for one directory, then renames
each file that arrived whole into place. The session outlives the batch, so a file costs one
round trip and no new remote shell (a login shell's rc files can cost 100 ms per exec).

The requests scpd sends the agent are lines, each starting with a random token of this
session, so that the bytes of a file can never be taken for a request, even if the scp sink
dies in the middle of one. Paths travel octal-escaped where they hold anything but plain
characters: file names are data, never shell. remote_dir is made like mkdir -p (it may be a
symbolic link: operators point it at a mount); each directory below it (S) must be a real
one, made if missing: a link there would lead files outside remote_dir, and is refused.

A batch, on the wire:

    D<dir>  B<remote_dir>  [S<dir below it>...]  N<temp>...  [R<stale temp>...]  G
                                                  then the scp stream: T, C, data, \\0 for
    each file (pipelined: the next file's records go out before the last file's ack is
    read), E. Then each file acknowledged whole is renamed into place: over an SFTP channel
    of the same connection (posix-rename, pipelined) where the server has one; else, or
    where SFTP refused, by the agent: M<temp> P<final>, answered with the token and 0, or
    with what mv said and the token and 1.

A file that changed while it was read is finished with a non-fatal \\x01 record instead of
\\0: the sink keeps going, and its temporary copy is removed (R) instead of renamed. A session
cut by the network, but still running on the remote, reads end of input: it removes the
temporary files of its batch and ends. Renames are asked for only once the whole batch is
acknowledged; one that reached the remote before the cut is carried out, which costs at
most a resend (the retry goes to a new temporary name).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paramiko
from paramiko.sftp import SFTPError

from scpd.errors import (
    FileChangedError,
    LocalReadError,
    PermanentError,
    ProtocolUnavailableError,
    RemotePathError,
    ScpdError,
    TransferInterrupted,
    classify,
    classify_remote_message,
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
from scpd.transport.sftp import rename_into_place
from scpd.transport.ssh import SshConnection
from scpd.transport.throttle import Throttle

log = logging.getLogger("scpd.transport")

_CHUNK_BYTES = 256 * 1024  # 16 KiB to 256 KiB measured equal; larger costs paramiko copies
_SLICE_BYTES = 32704  # the payload of one packet under OpenSSH's 32 KiB maximum
_MAX_MESSAGE_LINES = 20
# The sink reads T's seconds as unsigned digits (a negative time is a protocol error) into a
# 64-bit time_t: no upper limit worth the name.
_LATEST_SCP_SECONDS = 2**62
# A refusal names the path, which may be 4 KB long, before the reason ("File name too long"):
# read that far, and keep the head and the reason of it.
_MAX_LINE_BYTES = 64 * 1024
_KEPT_LINE_CHARS = 400
_SYMLINK_REFUSAL = re.compile(r"scpd: symbolic link (\d+)")
_PLAIN_PATH = re.compile(rb"[A-Za-z0-9._/+,=@:-]*")

# `set -f`: no globbing of unquoted words. $@ holds the temporary files of the current
# batch, which are removed when the session ends (published ones are gone by then): also
# when the sink died with the connection (SIGPIPE), as only a missing scp (126, 127) ends
# the loop at once. A temporary file that cannot be renamed is removed at once. Statuses
# of renames carry the token: mv's own words can never pass for one. $e: why the batch's
# directory cannot be used (the first refusal of B or S), said at G; $n counts the S lines,
# so that a link is named by its place in the list, never by a path printed by the shell.
_AGENT = r"""set -f; tok=TOKEN; nl='
'
below() {
  n=$((n + 1))
  if [ -L "$1" ]; then e="scpd: symbolic link $n"
  elif [ ! -d "$1" ] && ! e=$(mkdir -- "$1" 2>&1) && { [ -L "$1" ] || [ ! -d "$1" ]; }; then
    e=${e:-"mkdir: cannot create directory $n"}
  else e=; fi
}
while IFS= read -r op; do
  rest=${op#"$tok"}; [ "$rest" != "$op" ] || break
  a=${rest#?}
  case $a in *\\*) a=$(printf '%bx' "$a"); a=${a%x};; esac
  case $rest in
    D*) set --; dir=$a; e=; n=0;;
    B*) [ -n "$e" ] || e=$(mkdir -p -- "$a" 2>&1) || e=${e:-"mkdir: cannot create $a"};;
    S*) [ -n "$e" ] || below "$a";;
    N*) set -- "$@" "$a";;
    R*) rm -f -- "$a";;
    G*) [ -z "$e" ] || { printf '\001%s\n' "${e%%"$nl"*}"; break; }
        scp FLAGS-t -d -- "$dir"; s=$?; case $s in 126|127) exit $s;; esac;;
    M*) t=$a;;
    P*) if [ -d "$a" ]; then echo 'scpd: Is a directory'; rm -f -- "$t"; echo "${tok}1"
        elif mv -f -- "$t" "$a" 2>&1; then echo "${tok}0"
        else rm -f -- "$t"; echo "${tok}1"; fi;;
    *) break;;
  esac
done
rm -f -- "$@"
"""


@dataclass
class _Item:
    """One file of a batch on its way."""

    index: int
    upload: Upload
    temp: str
    version: FileVersion | None = None  # what was read, once the file is open
    is_whole_at_remote: bool = False  # acknowledged whole under its temporary name
    outcome: FileVersion | ScpdError | None = None


class _Session:
    """The agent's exec channel, and the token its requests carry."""

    def __init__(self, channel: paramiko.Channel, token: bytes):
        self.channel = channel
        self.token = token

    def request(self, letter: bytes, path: str = "") -> bytes:
        return self.token + letter + _wire_path(path) + b"\n"


class ScpUploader(Uploader):
    def __init__(self, connection: SshConnection, throttle: Throttle):
        self.connection = connection
        self.throttle = throttle
        self.target = connection.target
        self._session: _Session | None = None
        self._session_transport: paramiko.Transport | None = None
        self._renames_sftp: paramiko.SFTPClient | None = None
        self._renames_transport: paramiko.Transport | None = None
        self._said_no_sftp = False

    def prepare(self) -> None:
        try:
            self._open_session()
            self._sftp_for_renames()
        except (OSError, EOFError, paramiko.SSHException, SFTPError) as exc:
            self.close()
            raise classify(exc) from None

    def close(self) -> None:
        self._session = None
        self.connection.close()

    def retire(self) -> None:
        self._session = None
        self.connection.retire()

    def upload_batch(self, uploads: Sequence[Upload], on_results: ResultCallback,
                     note_temps: TempCallback | None = None) -> None:
        """Files bound for one directory (below one remote_dir) go in one batch; a change of
        directory starts another batch on the same session. A refusal of the whole target
        (no scp there) ends it all: the rest get the same error without being tried."""
        self.progress_at = time.monotonic()
        start = 0
        while start < len(uploads):
            key = _batch_key(uploads[start])
            end = start + 1
            while end < len(uploads) and _batch_key(uploads[end]) == key:
                end += 1
            error = self._upload_into(key[0], uploads, range(start, end), on_results,
                                      note_temps)
            if error is not None:
                on_results([(rest, error) for rest in range(end, len(uploads))])
                return
            start = end

    def _upload_into(self, directory: str, uploads: Sequence[Upload], indices: range,
                     on_results: ResultCallback, note_temps: TempCallback | None
                     ) -> ScpdError | None:
        """One batch; the error that says the whole target refuses us, if one did."""
        items = [_Item(index, uploads[index], posixpath.join(directory, temp_name(
            posixpath.basename(uploads[index].remote_path), is_per_attempt=True)))
            for index in indices]
        for item in items:
            try:
                check_remote_path(item.upload, item.temp)
            except RemotePathError as error:
                item.outcome = error
        try:
            if sendable := [item for item in items if item.outcome is None]:
                self._send_batch(directory, sendable, note_temps)
        except (OSError, EOFError, paramiko.SSHException, SFTPError) as exc:
            self.close()  # a half-dead connection is rebuilt, not reused
            self._settle_rest(items, classify(exc))
        except ScpdError as error:
            # The session's state is unknown: end it (the remote cleans up after it).
            self._end_session()
            if isinstance(error, TransferInterrupted):
                self.connection.close()
            self._settle_rest(items, error)
        assert all(item.outcome is not None for item in items)
        on_results([(item.index, item.outcome) for item in items])  # type: ignore[misc]
        return next((item.outcome for item in items if isinstance(item.outcome, PermanentError)
                     and item.outcome.is_target_level), None)

    @staticmethod
    def _settle_rest(items: list[_Item], error: ScpdError) -> None:
        for item in items:
            if item.outcome is None:
                item.outcome = error

    # -- one batch ---------------------------------------------------------------------------

    def _send_batch(self, directory: str, items: list[_Item],
                    note_temps: TempCallback | None) -> None:
        session = self._open_session()
        if note_temps is not None:
            note_temps([(item.index, item.temp) for item in items])
        base = items[0].upload.base
        below = directories_below(base, items[0].upload.remote_path)
        header = [session.request(b"D", directory), session.request(b"B", base or directory)]
        header += [session.request(b"S", path) for path in below]
        header += [session.request(b"N", item.temp) for item in items]
        # Best effort: a stale file that cannot be removed must not stop this attempt.
        header += [session.request(b"R", item.upload.stale_temp_path) for item in items
                   if item.upload.stale_temp_path and item.upload.stale_temp_path != item.temp]
        header.append(session.request(b"G"))
        channel = session.channel
        try:
            channel.sendall(b"".join(header))
        except OSError:
            if not channel.closed:
                raise
            # The remote ended the session before reading a word (an SFTP-only server does
            # at once): what it said, or its exit status, is why.
            if (refusal := self._read_ack(channel)) is not None:
                raise classify_remote_message(refusal) from None
            raise
        refusal = self._read_ack(channel)
        if refusal is not None:  # the directory could not be made, or is a link
            raise _directory_refusal(refusal, base, below)
        self._send_files(channel, items)
        channel.sendall(b"E\n")  # ends the sink, which acknowledges and exits
        if (refusal := self._read_ack(channel)) is not None:
            raise classify_remote_message(refusal)
        self._publish(session, items)
        self._drain_stderr(channel)

    def _send_files(self, channel: paramiko.Channel, items: list[_Item]) -> None:
        """T, C, data and trailer of each file; the ack of a file's data is read after the
        next file's records are on their way, so each file costs one round trip."""
        unacknowledged: _Item | None = None
        for item in items:
            try:  # opened one at a time: a batch holds one local file open, not a hundred
                local = LocalFile(item.upload.local_path, item.upload.expected)
            except ScpdError as error:
                item.outcome = error
                continue
            with self.sending_file(local):
                item.version = local.version
                has_times = self.target.preserve_times and \
                    self.can_carry_times(local, _LATEST_SCP_SECONDS)
                channel.sendall(self._records(local, item.temp, has_times))
                if unacknowledged is not None:
                    self._finish(channel, unacknowledged)
                    unacknowledged = None
                if has_times and (refusal := self._read_ack(channel)) is not None:
                    raise classify_remote_message(refusal)  # the sink gives up on a bad T
                if (refusal := self._read_ack(channel)) is not None:
                    item.outcome = classify_remote_message(refusal)  # nothing was created
                    continue
                self._send_data(channel, item, local)
            unacknowledged = item
        if unacknowledged is not None:
            self._finish(channel, unacknowledged)

    def _records(self, local: LocalFile, temp: str, has_times: bool) -> bytes:
        st, size = local.stat, local.version.size
        mode = (st.st_mode & 0o7777) if self.target.preserve_mode else 0o644
        times = _time_record(st.st_mtime_ns, st.st_atime_ns) if has_times else b""
        return times + f"C{mode:04o} {size} ".encode() + \
            os.fsencode(posixpath.basename(temp)) + b"\n"

    def _send_data(self, channel: paramiko.Channel, item: _Item, local: LocalFile) -> None:
        """Exactly the announced size, then \\0, or \\x01 if what was read is not one version
        of the file (the sink then keeps the copy under its temporary name, which is
        removed)."""
        chunk, sent = self.throttle.chunk_bytes(_CHUNK_BYTES), 0
        try:
            for data in local.read_chunks(chunk):
                self.throttle.take(len(data))
                self._send_slices(channel, data)
                sent += len(data)
        except (FileChangedError, LocalReadError) as error:
            item.outcome = error
            self._send_zeros(channel, local.version.size - sent)
        if item.outcome is None and local.has_changed():
            item.outcome = FileChangedError(f"{local.path} changed while it was sent")
        channel.sendall(b"\x00" if item.outcome is None else b"\x01scpd: not sent whole\n")

    def _send_slices(self, channel: paramiko.Channel, data: bytes) -> None:
        view = memoryview(data)
        # Slices of one SSH packet's payload: each return is a sign of life on slow links.
        for start in range(0, len(view), _SLICE_BYTES):
            channel.sendall(view[start:start + _SLICE_BYTES])
            self.progress_at = time.monotonic()

    def _send_zeros(self, channel: paramiko.Channel, count: int) -> None:
        """The rest of a file that shrank: the sink waits for the announced size (under the
        cap like any other byte)."""
        zeros = bytes(min(count, self.throttle.chunk_bytes(_CHUNK_BYTES)))
        while count > 0:
            piece = zeros[:count]
            self.throttle.take(len(piece))
            self._send_slices(channel, piece)
            count -= len(piece)

    def _finish(self, channel: paramiko.Channel, item: _Item) -> None:
        refusal = self._read_ack(channel, is_last=True)
        if refusal is not None and item.outcome is None:
            item.outcome = classify_remote_message(refusal)  # e.g. the remote disk is full
        item.is_whole_at_remote = item.outcome is None

    def _publish(self, session: _Session, items: list[_Item]) -> None:
        """Rename each whole file into place, remove the rest. Renames go over SFTP where
        the server offers it: one request each, where mv costs the remote a process (which
        measured 40 % of the time of a flood of small files). A rename SFTP refused is
        tried by mv, which has the last word and says why."""
        whole = [item for item in items if item.is_whole_at_remote]
        sftp = self._sftp_for_renames() if whole else None
        by_mv = whole
        if sftp is not None:
            refusals = rename_into_place(sftp, [(os.fsencode(item.temp),
                                                 os.fsencode(item.upload.remote_path))
                                                for item in whole])
            self.progress_at = time.monotonic()
            for item, refusal in zip(whole, refusals, strict=True):
                if refusal is None:
                    item.outcome = item.version
            by_mv = [item for item in whole if item.outcome is None]
        requests = []
        for item in by_mv:
            requests += [session.request(b"M", item.temp),
                         session.request(b"P", item.upload.remote_path)]
        requests += [session.request(b"R", item.temp) for item in items
                     if not item.is_whole_at_remote]
        if requests:
            session.channel.sendall(b"".join(requests))
        for item in by_mv:
            item.outcome = self._renamed_by_agent(session, item)
        if sftp is not None and any(item.outcome is item.version for item in by_mv):
            # e.g. sftp-server -P posix-rename, or a server without the extension
            log.info("%s refuses renames over SFTP; files are renamed into place by mv",
                     self.target.name)
            self._renames_sftp = None  # for the rest of this connection

    def _renamed_by_agent(self, session: _Session, item: _Item) -> FileVersion | ScpdError:
        message = self._read_status(session)
        if message is None:
            assert item.version is not None
            return item.version
        return classify_remote_message(message, f" (renaming into {item.upload.remote_path})")

    def _sftp_for_renames(self) -> paramiko.SFTPClient | None:
        """An SFTP channel on this connection, or None if the server has no SFTP."""
        transport = self.connection.transport()
        if self._renames_transport is not transport:
            self._renames_transport, self._renames_sftp = transport, None
            try:
                self._renames_sftp = paramiko.SFTPClient.from_transport(transport)
            except (EOFError, paramiko.SSHException, OSError, SFTPError):
                if not transport.is_active():
                    raise
                if not self._said_no_sftp:
                    log.info("%s offers no SFTP: files are renamed into place by mv",
                             self.target.name)
                    self._said_no_sftp = True
            if self._renames_sftp is not None:
                self._renames_sftp.get_channel().settimeout(self.target.io_timeout_seconds)
        sftp = self._renames_sftp
        if sftp is not None and sftp.get_channel().closed:
            self._renames_transport = None  # reopened next time
            raise TransferInterrupted("the sftp channel for renames closed")
        return sftp

    # -- the session -------------------------------------------------------------------------

    def _open_session(self) -> _Session:
        transport = self.connection.transport()
        session = self._session
        if session is not None and self._session_transport is transport and \
                not session.channel.closed and not session.channel.exit_status_ready():
            return session
        self._end_session()
        target = self.target
        channel = transport.open_session(timeout=target.connect_timeout_seconds)
        channel.settimeout(target.io_timeout_seconds)
        token = secrets.token_hex(8)
        flags = "-p " if (target.preserve_times or target.preserve_mode) else ""
        channel.exec_command(_AGENT.replace("TOKEN", token).replace("FLAGS", flags))
        self._session, self._session_transport = _Session(channel, token.encode()), transport
        return self._session

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.channel.close()  # the agent reads end of input and removes its temps

    def _drain_stderr(self, channel: paramiko.Channel) -> None:
        """What the agent's commands print on stderr (mkdir, rm, a missing scp); unread,
        it would eat the channel window."""
        while channel.recv_stderr_ready():
            channel.recv_stderr(65536)

    # -- reading the remote ------------------------------------------------------------------

    def _read_ack(self, channel: paramiko.Channel, *, is_last: bool = False) -> str | None:
        """None for an ack, the message of a refusal of this file (\\x01); raises when the
        sink gave up or never spoke SCP."""
        code = self._recv_last_ack(channel) if is_last else channel.recv(1)
        self.progress_at = time.monotonic()
        if code == b"\x00":
            return None
        if not code:
            status, stderr = self._wait_exit(channel)
            raise _remote_failure(status, stderr)
        message = _read_line(channel)
        if code == b"\x01":
            return message
        if code == b"\x02":
            raise classify_remote_message(message)
        # Not the SCP protocol at all: e.g. "This service allows sftp connections only."
        # (ForceCommand internal-sftp). No file can go this way: the target pauses.
        raise ProtocolUnavailableError(
            f"remote did not speak SCP: {(code.decode('latin-1') + message)!r}"
            " (try protocol = \"sftp\")")

    def _recv_last_ack(self, channel: paramiko.Channel) -> bytes:
        """The ack of a whole file comes once the remote has read everything still in
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

    def _read_status(self, session: _Session) -> str | None:
        """The agent's answer to a rename: None when done, else what mv said."""
        said: list[str] = []
        done, failed = (session.token + code for code in (b"0", b"1"))
        while (line := _read_line(session.channel).encode()) not in (done, failed):
            if session.channel.eof_received or len(said) > _MAX_MESSAGE_LINES:
                raise TransferInterrupted("the remote session ended during the rename")
            said.append(line.decode())
        self.progress_at = time.monotonic()
        return None if line == done else ("; ".join(said) or "rename failed")

    def _wait_exit(self, channel: paramiko.Channel) -> tuple[int | None, str]:
        if not channel.status_event.wait(self.target.io_timeout_seconds):
            return None, ""
        stderr = b""
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(4096)
        return channel.recv_exit_status(), stderr.decode("utf-8", "replace").strip()


def _wire_path(path: str) -> bytes:
    """A path as one line of plain characters: others as \\0NNN, which the agent's
    printf %b turns back into bytes."""
    raw = os.fsencode(path)
    if _PLAIN_PATH.fullmatch(raw):
        return raw
    return b"".join(bytes((byte,)) if _PLAIN_PATH.fullmatch(bytes((byte,)))
                    else b"\\0%03o" % byte for byte in raw)


def _time_record(mtime_ns: int, atime_ns: int) -> bytes:
    # OpenSSH's sink takes microseconds in the T record; most clients send 0 there.
    m_sec, m_ns = divmod(mtime_ns, 1_000_000_000)
    a_sec, a_ns = divmod(atime_ns, 1_000_000_000)
    return f"T{m_sec} {m_ns // 1000} {a_sec} {a_ns // 1000}\n".encode()


def _batch_key(upload: Upload) -> tuple[str, str | None]:
    return posixpath.dirname(upload.remote_path) or ".", upload.base


def _directory_refusal(message: str, base: str | None, below: list[str]) -> ScpdError:
    """Why the agent would not use the batch's directory: the n-th directory below
    remote_dir is a symbolic link, or what mkdir said."""
    link = _SYMLINK_REFUSAL.fullmatch(message)
    if link is not None and base is not None and 0 < int(link[1]) <= len(below):
        return symlink_refusal(below[int(link[1]) - 1], base)
    return classify_remote_message(message)


def _read_line(channel: paramiko.Channel) -> str:
    """One line, one byte at a time (what follows it is the protocol's). A long one keeps its
    start and its end, where the reason of a refusal is."""
    data = bytearray()
    while not data.endswith(b"\n") and len(data) < _MAX_LINE_BYTES:
        byte = channel.recv(1)
        if not byte:
            break
        data += byte
    line = data.decode("utf-8", "replace").strip()
    if len(line) <= 2 * _KEPT_LINE_CHARS:
        return line
    return f"{line[:_KEPT_LINE_CHARS]}...{line[-_KEPT_LINE_CHARS:]}"


def _remote_failure(status: int | None, stderr: str) -> ScpdError:
    if status is None:
        return TransferInterrupted("remote closed the channel without an exit status")
    if status == 127:
        return ProtocolUnavailableError(f"scp is not installed on the remote ({stderr})"
                                        " (install it, or set protocol = \"sftp\")")
    if stderr:
        return classify_remote_message(stderr)
    return TransferInterrupted(f"remote command exited {status}")
