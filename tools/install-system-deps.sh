#!/usr/bin/env bash
# Install the Debian 12 packages that building the venv and running the tests need.
# Idempotent, and silent when everything is already there. Run by `make venv`.
#   openssh-server/-client  the throwaway sshd the integration tests and benchmarks talk to
#   libsystemd-dev, pkg-config, gcc  systemd-python builds from its sdist (no wheels on PyPI)
#   systemd                 journald and systemd-analyze for the logging and unit tests
#   rsync                   one of the writer patterns the watching tests replay
#   python3-venv, python3-dev  `python3 -m venv` and Python.h, when python3 lacks them
set -euo pipefail

missing=()
for pkg in openssh-server openssh-client libsystemd-dev pkg-config gcc systemd rsync; do
    if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

# Debian's python3 has the venv module even without python3-venv, but not ensurepip, so
# `python3 -m venv --help` passes and only the real `python3 -m venv` fails: test ensurepip.
has_python_headers() {
    python3 -c "import os, sysconfig
raise SystemExit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))"
}
if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1 || ! has_python_headers; then
    missing+=(python3-venv python3-dev)
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi

if ((EUID != 0)); then
    echo "install-system-deps: missing Debian packages; as root run: apt-get install ${missing[*]}" >&2
    exit 1
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

# Installing openssh-server starts the system's sshd on port 22 unless policy-rc.d forbids it.
# The tests bring their own sshd, so forbid it for the length of this install (containers
# usually have such a policy already; leave theirs alone).
policy=/usr/sbin/policy-rc.d
if [[ " ${missing[*]} " == *" openssh-server "* && ! -e $policy ]]; then
    printf '#!/bin/sh\n# written by scpd tools/install-system-deps.sh for one install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
