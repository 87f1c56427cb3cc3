"""SSH connections: credentials, strict host keys, fast sockets, reconnect on loss."""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from scpd.config import Target
from scpd.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    HostKeyError,
    ProtocolUnavailableError,
    RetryableError,
    TransferInterrupted,
    classify,
    classify_connect,
)

log = logging.getLogger("scpd.transport")

# AES-GCM first: 30-45 % faster than paramiko's default aes-ctr + HMAC-SHA-256 (research,
# performance.md); the CTR modes remain for servers without GCM.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
_DISABLED = {"ciphers": ["aes128-cbc", "aes192-cbc", "aes256-cbc", "3des-cbc"],
             "macs": ["hmac-sha1", "hmac-md5", "hmac-sha1-96", "hmac-md5-96"]}
_known_hosts_lock = threading.Lock()


@dataclass(frozen=True)
class Credentials:
    pkey: paramiko.PKey | None = None
    password: str | None = field(default=None, repr=False)  # never in a log or traceback
    use_agent: bool = False  # offer the keys of $SSH_AUTH_SOCK's agent too


def load_credentials(target: Target) -> Credentials:
    """Load the key or password once, at start or reload: a bad key is a config error.
    The known_hosts file is parsed here too, so that a broken one is refused at start."""
    if target.known_hosts.exists():
        _host_keys_client(target).close()
    if target.identity_file is not None:
        return Credentials(pkey=_load_key(target), use_agent=target.use_agent)
    if target.password_file is not None:
        password = _read_secret(target.password_file, f"targets.{target.name}.password_file")
        return Credentials(password=password, use_agent=target.use_agent)
    return Credentials(use_agent=target.use_agent)


def _load_key(target: Target) -> paramiko.PKey:
    key_path, path = f"targets.{target.name}.identity_file", target.identity_file
    passphrase = None
    if target.passphrase_file is not None:
        passphrase = _read_secret(target.passphrase_file,
                                  f"targets.{target.name}.passphrase_file").encode()
    try:
        return paramiko.PKey.from_path(path, password=passphrase)  # bytes, though typed str
    except FileNotFoundError:
        raise ConfigError(key_path, f"file not found: {path}") from None
    except TypeError:
        # cryptography's words for both: "Key is password-protected, but password was not
        # provided", and "Password was given but private key is not encrypted".
        if passphrase is None:
            raise ConfigError(key_path, f"{path} is protected by a passphrase: set"
                              " passphrase_file to a file holding it") from None
        raise ConfigError(key_path, f"{path} is not encrypted: remove passphrase_file"
                          f" ({target.passphrase_file})") from None
    except paramiko.UnknownKeyType as exc:  # DSA, Ed448, X25519: none of them SSH keys
        raise ConfigError(key_path, f"{path} is a key of a type scpd cannot use"
                          f" ({exc.key_type or 'unknown'}); use an ed25519, ecdsa or RSA"
                          " key") from None
    except (ValueError, paramiko.SSHException, OSError) as exc:
        if passphrase is not None:
            # paramiko words a wrong passphrase as a PEM parsing error: say what it means.
            raise ConfigError(key_path, f"cannot decrypt {path} with the passphrase in"
                              f" {target.passphrase_file} (wrong passphrase?), or it is not"
                              " a usable private key") from None
        raise ConfigError(key_path, f"{path} is not a usable private key ({exc}); use an"
                          " OpenSSH-format ed25519, ecdsa or RSA key") from None


def _read_secret(path: Path, key_path: str) -> str:
    """A password or passphrase file's content; a trailing newline is not part of it."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")
    except OSError as exc:
        raise ConfigError(key_path, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key_path, f"{path} is not UTF-8 text") from None


class _RefuseUnknownPolicy(paramiko.MissingHostKeyPolicy):
    """host_key_policy = "strict": an unknown host is refused, and the message says how to
    add its key (with the fingerprint it offered, to check out of band)."""

    def __init__(self, target: Target):
        self.target = target

    def missing_host_key(self, client, hostname, key):
        raise unknown_host_key_error(self.target, hostname, key)


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """Like OpenSSH's StrictHostKeyChecking=accept-new: remember the first key seen.

    A changed key is still refused: paramiko raises BadHostKeyException before asking us.
    """

    def __init__(self, target: Target):
        self.target = target
        self.known_hosts = target.known_hosts

    def missing_host_key(self, client, hostname, key):
        try:
            with _known_hosts_lock:
                # Several connections meet a new host at once: the first records its key,
                # the others find it there (or find that it differs, and refuse).
                recorded = recorded_keys(self.known_hosts, hostname).get(key.get_name())
                if recorded is None:
                    self._record(hostname, key)
        except OSError as exc:
            raise HostKeyError(f"cannot record the new host key of {hostname} in"
                               f" {self.known_hosts}: {exc.strerror} (host_key_policy ="
                               ' "accept-new" needs it writable)') from None
        if recorded is not None and recorded != key:
            raise changed_host_key_error(self.target, hostname, recorded, key)
        client.get_host_keys().add(hostname, key.get_name(), key)

    def _record(self, hostname: str, key: paramiko.PKey) -> None:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.known_hosts.open("a+", encoding="utf-8") as f:
            # A file whose last line has no newline would have this entry glued to it,
            # spoiling both (and with them every host in the file).
            f.seek(0, os.SEEK_END)
            ends_open = f.tell() > 0 and _last_byte(self.known_hosts) != b"\n"
            f.write(("\n" if ends_open else "") +
                    f"{hostname} {key.get_name()} {key.get_base64()}\n")
        log.warning("accepted new host key for %s: %s %s, recorded in %s"
                    " (host_key_policy = accept-new)", hostname, key.get_name(),
                    key.fingerprint, self.known_hosts)


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def recorded_keys(known_hosts: Path, hostname: str) -> dict[str, paramiko.PKey]:
    """{key type: key} that known_hosts holds for hostname (as known_hosts names it)."""
    if not known_hosts.exists():
        return {}
    entry = paramiko.HostKeys(str(known_hosts)).lookup(hostname)
    return {} if entry is None else {key_type: entry[key_type] for key_type in entry}


def known_hosts_name(target: Target) -> str:
    """The host as known_hosts names it: "host", or "[host]:port" off port 22."""
    return target.host if target.port == 22 else f"[{target.host}]:{target.port}"


def unknown_host_key_error(target: Target, hostname: str, offered: paramiko.PKey
                           ) -> HostKeyError:
    port = f"-p {target.port} " if target.port != 22 else ""
    return HostKeyError(
        f"host {hostname} not found in known_hosts {target.known_hosts} (it offered"
        f" {offered.get_name()} {offered.fingerprint})",
        "Check that fingerprint with the host's administrator, then add the key:"
        f" ssh-keyscan {port}{shlex.quote(target.host)}"
        f" >> {shlex.quote(str(target.known_hosts))}; or set host_key_policy = \"accept-new\"")


def changed_host_key_error(target: Target, hostname: str, expected: paramiko.PKey,
                           offered: paramiko.PKey) -> HostKeyError:
    """OpenSSH's "REMOTE HOST IDENTIFICATION HAS CHANGED", in one line."""
    return HostKeyError(
        f"host key for {hostname} does not match known_hosts: {target.known_hosts} holds"
        f" {expected.get_name()} {expected.fingerprint}, the server offered"
        f" {offered.get_name()} {offered.fingerprint}. Someone may be intercepting the"
        " connection (man-in-the-middle), or the host was reinstalled; nothing is sent to it",
        f"If the new key is genuine: ssh-keygen -R {shlex.quote(hostname)}"
        f" -f {shlex.quote(str(target.known_hosts))}, then add the new key")


def _host_keys_client(target: Target) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    # Only the configured file is trusted, never ~/.ssh/known_hosts or /etc/ssh.
    if target.known_hosts.exists():
        try:
            client.load_host_keys(str(target.known_hosts))
        except (OSError, UnicodeDecodeError, ValueError, paramiko.SSHException,
                paramiko.hostkeys.InvalidHostKey) as exc:
            raise ConfigError(f"targets.{target.name}.known_hosts",
                              f"cannot load {target.known_hosts}: {exc}") from None
    if target.host_key_policy == "accept-new":
        client.set_missing_host_key_policy(_AcceptNewPolicy(target))
    else:
        client.set_missing_host_key_policy(_RefuseUnknownPolicy(target))
    return client


def make_transport(sock, **kwargs) -> paramiko.Transport:
    transport = paramiko.Transport(sock, **kwargs)
    transport.get_security_options().ciphers = _CIPHERS
    return transport


def open_tcp(target: Target) -> socket.socket:
    try:
        sock = socket.create_connection((target.host, target.port),
                                        timeout=target.connect_timeout_seconds)
    except OSError as exc:
        raise classify_connect(exc, f"{target.host}:{target.port}") from None
    # paramiko leaves Nagle on: each round trip then waits ~40 ms for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class SshConnection:
    """One SSH connection to a target, opened on first use and rebuilt after a loss."""

    def __init__(self, target: Target, credentials: Credentials, *,
                 open_socket: Callable[[Target], socket.socket] | None = None,
                 transport_factory: Callable[..., paramiko.Transport] | None = None):
        """open_socket, transport_factory: for `scpd check`, which times the TCP connect and
        reads the host key and login method off the paramiko Transport, to report each as
        a step of its own."""
        self.target = target
        self.credentials = credentials
        self._client: paramiko.SSHClient | None = None
        self._sock: socket.socket | None = None  # so close() can cut a connect in progress
        self._is_retired = False
        #: time.monotonic() when a connection last got through host key and login (0: never).
        self.connected_at = 0.0
        self.open_socket = open_socket or open_tcp
        self.transport_factory = transport_factory or make_transport

    def transport(self) -> paramiko.Transport:
        if self._is_retired:
            raise TransferInterrupted("scpd is stopping")
        client = self._client  # once: another thread may close() meanwhile
        if client is not None:
            active = client.get_transport()
            if active is not None and active.is_active():
                return active
            self.close()
        client = self._client = self._connect()
        self.connected_at = time.monotonic()
        transport = client.get_transport()
        if transport is None:
            raise TransferInterrupted("connection closed while it was opened")
        return transport

    def unsent_bytes(self) -> int | None:
        """Bytes the kernel still holds for this connection (not yet acknowledged by the
        peer): when it shrinks, a slow link is still moving."""
        sock = self._sock
        if sock is None:
            return None
        try:
            buffer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):
            return None
        return struct.unpack("i", buffer)[0]

    def _connect(self) -> paramiko.SSHClient:
        target = self.target
        try:
            client = _host_keys_client(target)  # read at each connection: fixes apply at once
        except ConfigError as exc:  # known_hosts broken since start: no host can be trusted
            raise HostKeyError(str(exc)) from None
        sock = self._sock = self.open_socket(target)
        try:
            client.connect(
                target.host, port=target.port, username=target.user,
                pkey=self.credentials.pkey, password=self.credentials.password,
                # Keys only from the config (and the agent when asked): never ~/.ssh.
                sock=sock, allow_agent=self.credentials.use_agent, look_for_keys=False,
                timeout=target.connect_timeout_seconds,
                banner_timeout=target.connect_timeout_seconds,
                auth_timeout=target.connect_timeout_seconds,
                channel_timeout=target.connect_timeout_seconds,
                transport_factory=self.transport_factory, disabled_algorithms=_DISABLED)
        except paramiko.BadHostKeyException as exc:
            client.close()
            sock.close()
            raise changed_host_key_error(target, known_hosts_name(target), exc.expected_key,
                                         exc.key) from None
        except Exception as exc:
            client.close()
            sock.close()
            if _is_without_credentials(exc):
                raise AuthError(_no_credentials_message(self.credentials)) from None
            error = classify(exc)
            if isinstance(error, RetryableError):  # no session yet: the target is unreachable
                raise ConnectError(str(error)) from None
            raise error from None
        active = client.get_transport()
        assert active is not None
        # Keepalives do not detect a dead peer (paramiko sends them without waiting), but they
        # keep idle connections through NAT and firewalls; stalls are caught by io_timeout.
        active.set_keepalive(30)
        return client

    def retire(self) -> None:
        """Close for good: the daemon is stopping, and no later call may reconnect."""
        self._is_retired = True
        self.close()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _is_without_credentials(exc: Exception) -> bool:
    # paramiko's words when it had no key, password or agent key to offer at all.
    return isinstance(exc, paramiko.SSHException) and \
        "No authentication methods available" in str(exc)


def _no_credentials_message(credentials: Credentials) -> str:
    if credentials.use_agent:
        agent = os.environ.get("SSH_AUTH_SOCK")
        where = f"the ssh-agent at {agent}" if agent else "no ssh-agent (SSH_AUTH_SOCK is unset)"
        return f"nothing to log in with: use_agent = true, but {where} offers no key"
    return "nothing to log in with: set identity_file or password_file"


def run_remote(transport: paramiko.Transport, target: Target, command: str | bytes
               ) -> tuple[int, str]:
    """Run one short command; (exit status, its stderr and stdout as text)."""
    try:
        channel = transport.open_session(timeout=target.connect_timeout_seconds)
        channel.settimeout(target.io_timeout_seconds)
        channel.exec_command(command)
        output = channel.makefile_stderr("rb").read() + channel.makefile("rb").read()
        status = channel.recv_exit_status()
        channel.close()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise classify(exc) from None
    text = output.decode("utf-8", "replace").strip()
    if "sftp connections only" in text:
        raise ProtocolUnavailableError(f"{text} (set protocol = \"sftp\")")
    return status, text
