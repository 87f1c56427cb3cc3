"""A TCP proxy on 127.0.0.1 that breaks the stream on purpose, for fault tests.

Standard library only, like tools/sshd.py. Design notes: shared/research/libraries.md 5.4.

    with FaultProxy(sshd.port, cut_after_bytes=1_000_000) as proxy:
        ...  # connect to 127.0.0.1:proxy.port; the first connection dies at that offset

Faults are counted on the client -> server direction ("upstream"), over the proxy's whole
life, and each fires at most once, on the first connection only: the client's retry then
goes through untouched. That is the shape of "the connection was cut mid-file, and the next
attempt succeeds".

    cut_after_bytes    forward exactly that many upstream bytes, then close both sides
                       (with `rst`, abort them with a TCP RST instead of a FIN)
    stall_after_bytes  forward that many upstream bytes, then go silent in both directions
                       while keeping both sockets open, until end_stalled() or close(): a
                       half-open connection, whose server side learns only later that it died
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

_POLL_SECONDS = 0.1  # how often a blocked thread looks at the stop flag
_CHUNK_BYTES = 64 * 1024
_SLOW_RCVBUF_BYTES = 16 * 1024
_CONNECT_TIMEOUT_SECONDS = 5.0
_SEND_STALL_LIMIT_SECONDS = 30.0  # a peer that takes nothing for this long is dropped
_JOIN_TIMEOUT_SECONDS = 2.0
_STALL_LIMIT_SECONDS = 300.0  # a stalled connection is dropped after this even if nobody asks


class FaultProxy:
    def __init__(self, target_port: int, *, cut_after_bytes: int | None = None,
                 stall_after_bytes: int | None = None, rst: bool = False,
                 rate_bytes_per_second: float | None = None) -> None:
        """rate_bytes_per_second: a slow link, client to server (every connection)."""
        self.target = ("127.0.0.1", target_port)  # loopback only, on both sides
        self.rate_bytes_per_second = rate_bytes_per_second
        self.cut_after_bytes = cut_after_bytes
        self.stall_after_bytes = stall_after_bytes
        self.rst = rst
        #: Client connections accepted so far (the first is number 1).
        self.connections = 0
        #: Client -> server bytes forwarded, over all connections.
        self.upstream_bytes = 0
        self.has_cut = False
        self.has_stalled = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        if rate_bytes_per_second:
            # A small receive buffer, inherited by accepted sockets: what the slow link has
            # not carried yet stays unacknowledged in the client's send queue, as on a real
            # slow link, instead of vanishing into this proxy's kernel buffer.
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SLOW_RCVBUF_BYTES)
        self._listener.settimeout(_POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread = self._spawn(self._accept_loop, "faultproxy-accept")

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, drop every connection, join the threads; idempotent."""
        self._stopping.set()
        self._listener.close()
        deadline = time.monotonic() + _JOIN_TIMEOUT_SECONDS
        # The accept thread first: once it is gone, no link or thread is added any more.
        self._accept_thread.join(_JOIN_TIMEOUT_SECONDS)
        with self._lock:
            links = list(self._links)
            threads = list(self._threads)
        for link in links:
            link.close(abort=False)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def end_stalled(self) -> int:
        """Close the stalled connections, as when both ends of a half-open connection
        finally notice; the number closed."""
        with self._lock:
            links = [link for link in self._links if link.is_stalled]
        for link in links:
            link.close(abort=self.rst)
        return len(links)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, run, name: str, *args: object) -> threading.Thread:
        thread = threading.Thread(target=run, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            with self._lock:
                self.connections += 1
                index = self.connections
            try:
                server = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT_SECONDS)
            except OSError:
                client.close()  # the target is down: the client sees its connection closed
                continue
            link = _Link(client, server, index=index)
            with self._lock:
                self._links = [known for known in self._links if not known.is_closed]
                self._links.append(link)
            if self._stopping.is_set():
                link.close(abort=False)
                return
            self._spawn(self._pump, f"faultproxy-{link.index}-up", link, True)
            self._spawn(self._pump, f"faultproxy-{link.index}-down", link, False)

    def _pump(self, link: _Link, is_upstream: bool) -> None:
        src, dst = (link.client, link.server) if is_upstream else (link.server, link.client)
        paced_bytes, started = 0, time.monotonic()
        try:
            while not self._stopping.is_set() and not link.is_stalled:
                try:
                    data = src.recv(_CHUNK_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    return
                if is_upstream:
                    data, fault = self._take_upstream(link, data)
                    if self.rate_bytes_per_second:
                        paced_bytes += len(data)
                        ahead = paced_bytes / self.rate_bytes_per_second - (
                            time.monotonic() - started)
                        if ahead > 0 and self._stopping.wait(ahead):
                            return
                    if data:
                        self._send_all(dst, data)
                    if fault == "cut":
                        link.close(abort=self.rst)
                        return
                    if fault == "stall":
                        link.is_stalled = True
                        return
                else:
                    self._send_all(dst, data)
        except OSError:
            link.close(abort=False)
        finally:
            link.pump_done()
            if link.is_stalled:  # keep the sockets open and silent until asked to end
                deadline = time.monotonic() + _STALL_LIMIT_SECONDS
                while not link.is_closed and time.monotonic() < deadline:
                    if self._stopping.wait(_POLL_SECONDS):
                        break
                link.close(abort=False)

    def _take_upstream(self, link: _Link, data: bytes) -> tuple[bytes, str | None]:
        """The part of `data` to forward, and the fault to apply after it, if any."""
        with self._lock:
            armed = link.index == 1
            before = self.upstream_bytes
            for limit, fault, fired in ((self.cut_after_bytes, "cut", self.has_cut),
                                        (self.stall_after_bytes, "stall", self.has_stalled)):
                if armed and not fired and limit is not None and before + len(data) >= limit:
                    data = data[: max(0, limit - before)]
                    if fault == "cut":
                        self.has_cut = True
                    else:
                        self.has_stalled = True
                    self.upstream_bytes += len(data)
                    return data, fault
            self.upstream_bytes += len(data)
            return data, None

    def _send_all(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + _SEND_STALL_LIMIT_SECONDS
        while view:
            if self._stopping.is_set() or time.monotonic() > deadline:
                raise ConnectionAbortedError("proxy stopping, or the peer takes nothing")
            try:
                sent = sock.send(view)
            except TimeoutError:
                continue
            view = view[sent:]


class _Link:
    """One proxied connection: the accepted client socket and its socket to the target."""

    def __init__(self, client: socket.socket, server: socket.socket, index: int) -> None:
        self.client = client
        self.server = server
        self.index = index
        self.is_stalled = False
        self._lock = threading.Lock()
        self._pumps_left = 2
        self._is_closed = False
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_POLL_SECONDS)

    def pump_done(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            is_last = self._pumps_left == 0
        if is_last and not self.is_stalled:
            self.close(abort=False)

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def close(self, *, abort: bool) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
        for sock in (self.client, self.server):
            try:
                if abort:  # linger 0: close() sends RST and drops unsent data
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
