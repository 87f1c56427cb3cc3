#!/usr/bin/env bash
# Install scpd as a system service, or remove it again: `make install` / `make uninstall`.
#
#   tools/install.sh install|uninstall      (as root; settings come from the environment)
#
#   APP_DIR   /opt/scpd             scpd's own virtualenv
#   BIN_DIR   /usr/local/bin        the `scpd` symlink (the units run /usr/local/bin/scpd)
#   UNIT_DIR  /etc/systemd/system   scpd.service and scpd@.service
#   CONF_DIR  /etc/scpd             config.example.toml; the operator's config.toml is never touched
#   STATE_DIR /var/lib/scpd         the queue (StateDirectory=): the user's home; never removed
#   PYTHON    /usr/bin/python3      the interpreter the virtualenv is made from
#
# The installed scpd does not depend on this checkout: it is built from a copy and installed
# into its own virtualenv, not in editable mode. Nothing is enabled or started.
set -euo pipefail

APP_DIR=${APP_DIR:-/opt/scpd}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
CONF_DIR=${CONF_DIR:-/etc/scpd}
STATE_DIR=${STATE_DIR:-/var/lib/scpd}
PYTHON=${PYTHON:-/usr/bin/python3}

SERVICE_USER=scpd   # the units say User=scpd and Group=scpd
UNITS=(scpd.service scpd@.service)
SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The service user must be able to read and run everything installed, whatever root's umask.
umask 022

ACTION=${1:-}

die() {
    echo "scpd $ACTION: $*" >&2
    exit 1
}

say() {
    echo "scpd $ACTION: $*"
}

require_root() {
    ((EUID == 0)) || die "must run as root (it changes $APP_DIR, $UNIT_DIR and $CONF_DIR):" \
        "sudo make $ACTION"
}

systemd_is_running() {
    [[ -d /run/systemd/system ]]
}

# scpd.service and scpd@NAME.service units that are running (or starting, stopping), if any.
active_units() {
    if systemd_is_running; then
        systemctl list-units --all --no-legend --plain \
            --state=active,activating,deactivating,reloading 'scpd.service' 'scpd@*.service' |
            awk '{print $1}' | tr '\n' ' '
    fi
}

# -- install ----------------------------------------------------------------------------------

# Everything that could make the install stop half-way is checked before anything is written.
check_python() {
    [[ -x $PYTHON ]] ||
        die "PYTHON=$PYTHON is not an executable file (use a system one: PYTHON=/usr/bin/python3)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "PYTHON=$PYTHON is older than 3.11, which scpd needs"
    # Debian's python3 has venv without ensurepip (package python3-venv): venv then fails late.
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        die "PYTHON=$PYTHON cannot make a virtualenv (Debian: apt-get install python3-venv)"
    # A python under a private home (a pyenv shim in /root, mode 0700) runs for root but not for
    # the service user: systemd would fail to start scpd with status 203/EXEC. Try it as nobody.
    if command -v setpriv >/dev/null &&
        ! setpriv --reuid=65534 --regid=65534 --clear-groups -- "$PYTHON" -c '' 2>/dev/null; then
        die "PYTHON=$PYTHON cannot be run by other users, so the service user could not run" \
            "scpd; use a system python: PYTHON=/usr/bin/python3"
    fi
}

check_targets() {
    # A venv poured into a directory that holds something else could not be removed cleanly.
    if [[ -e $APP_DIR && ! -e $APP_DIR/pyvenv.cfg ]] && [[ -n $(ls -A "$APP_DIR") ]]; then
        die "APP_DIR=$APP_DIR exists and is not a virtualenv; choose another APP_DIR"
    fi
    if [[ -e $BIN_DIR/scpd && ! -L $BIN_DIR/scpd ]]; then
        die "$BIN_DIR/scpd exists and is not a symlink (another install of scpd?);" \
            "move it away first"
    fi
}

ensure_user() {
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        return
    fi
    # useradd makes the group of the same name itself, unless that group is already there.
    local group_option=()
    if getent group "$SERVICE_USER" >/dev/null; then
        group_option=(--gid "$SERVICE_USER")
    fi
    useradd --system "${group_option[@]}" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
    say "created system user and group $SERVICE_USER"
}

# Builds from a copy: pip's setuptools backend writes build/ and *.egg-info into the tree it
# builds, and the checkout may be read-only or another user's.
copy_source() {
    local into=$1
    mkdir -p "$into"
    tar -C "$SOURCE_DIR" --exclude=./.git --exclude=./.venv --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.ruff_cache -cf - . | tar -C "$into" -xf -
}

install_app() {
    # A venv made by another interpreter (say, a pyenv one from an earlier try) is remade.
    local venv_python
    venv_python=$(readlink -f "$APP_DIR/bin/python" || true)
    if [[ -e $APP_DIR/pyvenv.cfg && $venv_python != $(readlink -f "$PYTHON") ]]; then
        "$PYTHON" -m venv --clear "$APP_DIR"
    else
        "$PYTHON" -m venv "$APP_DIR"
    fi
    local build_dir log=$APP_DIR/pip.log
    build_dir=$(mktemp -d)
    # shellcheck disable=SC2064  # the directory is known now; expand it now
    trap "rm -rf '$build_dir'" EXIT
    copy_source "$build_dir/src"
    say "installing scpd into $APP_DIR (log: $log)"
    # --use-pep517: the pip of Debian 12 (23.0) would otherwise run systemd-python's setup.py
    # install, deprecated, and rebuild it every time instead of reusing a cached wheel.
    if ! "$APP_DIR/bin/pip" install --quiet --use-pep517 --no-warn-script-location \
        "$build_dir/src" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "pip install failed (full log: $log)"
    fi
}

install_files() {
    mkdir -p "$BIN_DIR"
    ln -sfn "$APP_DIR/bin/scpd" "$BIN_DIR/scpd"
    local unit
    for unit in "${UNITS[@]}"; do
        install -D -m 0644 "$SOURCE_DIR/systemd/$unit" "$UNIT_DIR/$unit"
    done
    # 0750 root:scpd: the service reads its config and keys here; other users cannot.
    install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
    install -m 0640 -o root -g "$SERVICE_USER" "$SOURCE_DIR/config.example.toml" \
        "$CONF_DIR/config.example.toml"
}

print_next_steps() {
    local version
    version=$("$APP_DIR/bin/scpd" --version)
    cat <<EOF
scpd install: installed $version: $BIN_DIR/scpd -> $APP_DIR/bin/scpd, units in $UNIT_DIR
Next steps:
  1. Write the config (every key is explained in the example):
       install -m 0640 -o root -g $SERVICE_USER $CONF_DIR/config.example.toml $CONF_DIR/config.toml
     then edit $CONF_DIR/config.toml. A key and known_hosts there must be readable by the
     user $SERVICE_USER (a key: chown $SERVICE_USER $CONF_DIR/id_ed25519; chmod 600 ...).
  2. Check it as the service user; this also logs in to every target:
       runuser -u $SERVICE_USER -- $BIN_DIR/scpd check -c $CONF_DIR/config.toml
  3. Start it now and at every boot:
       systemctl enable --now scpd
     and follow it with: journalctl -u scpd -f
EOF
    if [[ -e $CONF_DIR/config.toml ]]; then
        echo "($CONF_DIR/config.toml already exists and was left as it was.)"
    fi
    local active
    active=$(active_units)
    if [[ -n $active ]]; then
        echo "(Running the version installed before: ${active% }; systemctl restart ${active% }" \
            "runs this one.)"
    fi
}

do_install() {
    require_root
    check_python
    check_targets
    ensure_user
    install_app
    install_files
    if systemd_is_running; then
        systemctl daemon-reload
    fi
    print_next_steps
}

# -- uninstall --------------------------------------------------------------------------------

# Removing the units of a running or enabled service would leave a daemon running from a
# deleted virtualenv, or dangling links in *.wants/: the operator stops and disables it first.
check_not_in_use() {
    local enabled
    enabled=$(find "$UNIT_DIR" -path '*.wants/*' \
        \( -name scpd.service -o -name 'scpd@*.service' \) -printf '%f\n' 2>/dev/null |
        sort -u | tr '\n' ' ')
    if [[ -n $enabled ]]; then
        die "still enabled: ${enabled% }; first: systemctl disable --now ${enabled% }"
    fi
    local active
    active=$(active_units)
    if [[ -n $active ]]; then
        die "still running: ${active% }; first: systemctl stop ${active% }"
    fi
}

REMOVED=()

remove() {
    rm -rf "$1"
    REMOVED+=("$1")
}

remove_app() {
    local link=$BIN_DIR/scpd
    # Only our own link: an scpd installed there some other way is not ours to remove.
    if [[ -L $link && $(readlink "$link") == "$APP_DIR/bin/scpd" ]]; then
        remove "$link"
    fi
    if [[ -e $APP_DIR/pyvenv.cfg ]]; then
        remove "$APP_DIR"
    elif [[ -e $APP_DIR ]]; then
        say "left $APP_DIR: it is not a virtualenv, so not one this script made"
    fi
}

remove_files() {
    local file
    for file in "${UNITS[@]/#/$UNIT_DIR/}" "$CONF_DIR/config.example.toml"; do
        if [[ -e $file ]]; then
            remove "$file"
        fi
    done
    if [[ -d $CONF_DIR ]] && rmdir "$CONF_DIR" 2>/dev/null; then
        REMOVED+=("$CONF_DIR")
    fi
}

report_kept() {
    if [[ -e $CONF_DIR/config.toml ]]; then
        say "kept $CONF_DIR/config.toml and anything else in $CONF_DIR: your config and keys"
    elif [[ -d $CONF_DIR ]]; then
        say "kept $CONF_DIR: it holds files this script did not put there"
    fi
    local unit
    for unit in "${UNITS[@]}"; do
        if [[ -d $UNIT_DIR/$unit.d ]]; then
            say "kept $UNIT_DIR/$unit.d: your drop-ins"
        fi
    done
    if [[ -d $STATE_DIR ]]; then
        say "kept $STATE_DIR: the queue (files still owed, what was delivered)"
    fi
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "kept the user and group $SERVICE_USER (it may own files elsewhere):" \
            "userdel $SERVICE_USER removes them"
    fi
}

do_uninstall() {
    require_root
    check_not_in_use
    remove_app
    remove_files
    if systemd_is_running; then
        systemctl daemon-reload
    fi
    if ((${#REMOVED[@]})); then
        say "removed ${REMOVED[*]}"
    else
        say "nothing to remove: scpd is not installed with these settings"
    fi
    report_kept
}

case $ACTION in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *)
        echo "usage: $0 install|uninstall" >&2
        exit 64
        ;;
esac
