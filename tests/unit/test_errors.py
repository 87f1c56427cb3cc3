"""Error sorting: what is retried, what fails a job, and what stops a whole target."""

from __future__ import annotations

import socket

import paramiko
import pytest

from scpd.errors import (
    AuthError,
    ConnectError,
    HostKeyError,
    PermanentError,
    ProtocolUnavailableError,
    RemoteFullError,
    RemotePathError,
    RetryableError,
    ScpdError,
    TransferInterrupted,
    classify,
    classify_remote_message,
    classify_sftp,
)


def test_classify_sorts_an_auth_failure_as_permanent_for_the_whole_target() -> None:
    error = classify(paramiko.AuthenticationException("Authentication failed."))

    assert isinstance(error, AuthError)
    assert isinstance(error, PermanentError)
    assert error.is_target_level is True


def test_classify_retries_an_auth_failure_that_was_really_a_lost_connection() -> None:
    exc = paramiko.AuthenticationException(
        "Authentication failed: transport shut down or saw EOF")

    error = classify(exc)

    assert isinstance(error, RetryableError)
    assert not isinstance(error, PermanentError)


def test_classify_retries_an_auth_timeout_caused_by_a_stalled_link() -> None:
    error = classify(paramiko.AuthenticationException("Authentication timeout."))

    assert isinstance(error, RetryableError)


def test_classify_sorts_a_changed_host_key_as_a_host_key_error() -> None:
    got, expected = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()

    error = classify(paramiko.BadHostKeyException("backup.example.com", got, expected))

    assert isinstance(error, HostKeyError)
    assert error.is_target_level is True
    assert "backup.example.com" in str(error)
    assert got.fingerprint in str(error)  # the operator can compare it with the server's


def test_classify_sorts_an_unknown_host_as_a_host_key_error() -> None:
    error = classify(paramiko.SSHException("Server '[127.0.0.1]:2222' not found in known_hosts"))

    assert isinstance(error, HostKeyError)
    assert "known_hosts" in str(error)


@pytest.mark.parametrize("exc", [
    EOFError(),
    TimeoutError("timed out"),
    ConnectionResetError(104, "Connection reset by peer"),
    ConnectionRefusedError(111, "Connection refused"),
    BrokenPipeError(32, "Broken pipe"),
    paramiko.SSHException("Error reading SSH protocol banner"),
    socket.gaierror(-2, "Name or service not known"),
    paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 2222): OSError(111, "x")}),
], ids=lambda exc: type(exc).__name__)
def test_classify_retries_network_faults(exc: BaseException) -> None:
    assert isinstance(classify(exc), RetryableError)


def test_classify_names_the_kind_of_network_fault() -> None:
    assert isinstance(classify(socket.gaierror(-2, "Name or service not known")), ConnectError)
    assert isinstance(classify(TimeoutError()), TransferInterrupted)
    assert "timed out" in str(classify(TimeoutError()))


def test_classify_passes_scpd_errors_through() -> None:
    original = RemoteFullError("remote: No space left on device")

    assert classify(original) is original


def test_classify_does_not_disguise_a_programming_error_as_a_network_fault() -> None:
    with pytest.raises(KeyError):
        classify(KeyError("oops"))


@pytest.mark.parametrize(("message", "kind"), [
    ("scp: /srv/x: No space left on device", RemoteFullError),
    ("scp: /srv/x: Disk quota exceeded", RemoteFullError),
    ("scp: /srv/x: Permission denied", RemotePathError),
    ("scp: /srv/x: Read-only file system", RemotePathError),
    ("scp: /srv/x: Not a directory", RemotePathError),
    ("mkdir: cannot create directory '/srv/x': File name too long", RemotePathError),
    ("scp: /srv/x: File name too long", RemotePathError),
    ("mkdir: cannot create directory '/srv/sub': File exists", RemotePathError),
    ("scp: /srv/x: Operation not permitted", RemotePathError),
    ("bash: line 1: scp: command not found", ProtocolUnavailableError),
    ("This service allows sftp connections only.", ProtocolUnavailableError),
])
def test_classify_remote_message_sorts_what_the_remote_printed(
        message: str, kind: type[ScpdError]) -> None:
    error = classify_remote_message(message)

    assert type(error) is kind
    assert message in str(error)


def test_classify_remote_message_retries_a_full_disk_but_not_a_denied_path() -> None:
    assert isinstance(classify_remote_message("scp: /x: No space left on device"),
                      RetryableError)
    assert isinstance(classify_remote_message("scp: /x: Permission denied"), PermanentError)


def test_classify_remote_message_retries_unknown_trouble_rather_than_losing_the_file() -> None:
    assert isinstance(classify_remote_message("scp: something odd happened"), RetryableError)


@pytest.mark.parametrize(("message", "kind"), [
    # The name says one thing, the reason at the end another: the reason decides.
    ("scp: /srv/x command not found: Permission denied", RemotePathError),
    ("scp: /srv/No space left on device: Permission denied", RemotePathError),
    ("mkdir: cannot create directory '/srv/y Permission denied': No space left on device",
     RemoteFullError),
    ("mv: cannot move '/srv/.a' to '/srv/sftp connections only': Operation not permitted",
     RemotePathError),
    ("scp: /srv/Permission denied: something odd happened", TransferInterrupted),
])
def test_a_file_name_in_the_message_never_decides_how_it_is_sorted(
        message: str, kind: type[ScpdError]) -> None:
    assert type(classify_remote_message(message)) is kind


def test_context_is_shown_but_never_sorted_on() -> None:
    error = classify_remote_message("mv: cannot move 'a' to 'b': Permission denied",
                                    " (renaming into /srv/No space left on device)")

    assert type(error) is RemotePathError
    assert str(error).endswith("(renaming into /srv/No space left on device)")


def test_a_name_too_long_fails_the_file_for_good_instead_of_retrying() -> None:
    error = classify_remote_message("mkdir: cannot create directory '/x': File name too long")

    assert isinstance(error, RemotePathError)
    assert not error.is_target_level  # this file only; the target goes on


def test_a_server_without_scp_pauses_the_target_instead_of_failing_each_file() -> None:
    for message in ("This service allows sftp connections only.",
                    "sh: 1: scp: command not found"):
        error = classify_remote_message(message)

        assert isinstance(error, PermanentError)
        assert error.is_target_level is True, message


def test_classify_sftp_fails_a_path_the_server_calls_a_bad_message_for_good() -> None:
    # OpenSSH's sftp-server answers ENAMETOOLONG with SSH_FX_BAD_MESSAGE, which paramiko
    # raises as an OSError without errno.
    error = classify_sftp(OSError("Bad message"), "/srv/in/" + "d" * 300)

    assert isinstance(error, RemotePathError)
    assert "File name too long" in str(error)
    assert "/srv/in/ddd" in str(error)


def test_classify_sftp_still_retries_a_failure_without_a_reason() -> None:
    # SSH_FX_FAILURE: a full disk over SFTPv3, most often.
    assert isinstance(classify_sftp(OSError("Failure"), "/srv/in/x"), RetryableError)
