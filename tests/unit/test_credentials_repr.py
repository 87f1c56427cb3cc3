"""Loaded secrets stay out of anything printed."""

from __future__ import annotations

from scpd.transport.ssh import Credentials

SECRET = "Hunter2Secret"  # noqa: S105 -- a stand-in, to look for in the output


def test_credentials_never_show_the_password() -> None:
    credentials = Credentials(password=SECRET)

    assert SECRET not in f"{credentials!r} {credentials}"
