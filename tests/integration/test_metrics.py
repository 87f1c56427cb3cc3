"""`[daemon] metrics_listen`: the running daemon serves Prometheus metrics over HTTP on
loopback, counting what reached the real sshd, what failed, and what the queue holds; off by
default (no port opened); a port in use stops the start with one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import Setup, make_file, wait_until, write_config
from prometheus_client.parser import text_string_to_metric_families

from tools.sshd import ThrowawaySshd, free_port

START_SECONDS = 20.0
LAND_SECONDS = 15.0
# No proxy from the environment (http_proxy) may stand between the test and loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def with_metrics(setup: Setup, listen: str | None) -> None:
    """Set (or, with None, remove) [daemon] metrics_listen in the setup's config."""
    lines = [line for line in setup.config.read_text().splitlines()
             if not line.startswith("metrics_listen")]
    text = "\n".join(lines) + "\n"
    if listen is not None:
        text = text.replace("[daemon]\n", f'[daemon]\nmetrics_listen = "{listen}"\n', 1)
    setup.config.write_text(text)


def scrape_text(port: int, host: str = "127.0.0.1") -> str:
    with _OPENER.open(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of one scrape, through prometheus_client's parser."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(scrape_text(port, host))
            for sample in family.samples}


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_until(port: int, name: str, expected: float, timeout: float = LAND_SECONDS,
                 **labels: str) -> dict[tuple[str, frozenset], float]:
    """Scrapes until the sample has the expected value (a landed file is counted a moment
    after it appears at the remote); the last scrape."""
    last: dict[tuple[str, frozenset], float] = {}

    def has_it() -> bool:
        nonlocal last
        last = scrape(port)
        return last.get((name, frozenset(labels.items()))) == expected

    assert wait_until(has_it, timeout, poll=0.1), \
        f"{name}{labels} != {expected}: {sorted((k[0], sorted(k[1]), v) for k, v in last.items() if k[0].startswith('scpd_'))}"  # noqa: E501
    return last


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (IPv4 and IPv6), from /proc: its sockets' inodes
    matched against the LISTEN rows of its network namespace's tables."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def is_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_metrics_count_deliveries_scraped_over_http_on_loopback(setup: Setup):
    port = free_port()
    with_metrics(setup, f"127.0.0.1:{port}")
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        assert f"serving metrics on http://127.0.0.1:{port}/metrics" in daemon.log()
        assert listening_ports(daemon.pid) == {port}
        sizes = {"a.csv": 1_000, "b.bin": 250_000, "c.txt": 3}
        for name, size in sizes.items():
            make_file(setup.watch_dir / name, size)
        assert wait_until(lambda: all((setup.remote_dir / n).exists() for n in sizes),
                          LAND_SECONDS), daemon.log()

        samples = scrape_until(port, "scpd_files_delivered_total", 3, target="local")

        assert value(samples, "scpd_delivered_bytes_total", target="local") == sum(
            sizes.values())
        assert value(samples, "scpd_transfer_duration_seconds_count", target="local") == 3
        assert 0 < value(samples, "scpd_transfer_duration_seconds_sum", target="local") < 60
        assert value(samples, "scpd_transfer_duration_seconds_bucket", target="local",
                     le="+Inf") == 3
        assert value(samples, "scpd_delivery_failures_total", target="local") == 0
        assert value(samples, "scpd_delivery_retries_total", target="local") == 0
        for state in ("pending", "sending", "failed"):
            assert value(samples, "scpd_queue_jobs", target="local", state=state) == 0
        assert value(samples, "scpd_oldest_pending_age_seconds", target="local") == 0
        assert value(samples, "scpd_target_paused", target="local") == 0
        assert value(samples, "process_resident_memory_bytes") > 0
        # Target names are the only labels of scpd's own: no path, file name or host.
        text = scrape_text(port)
        for secret in (str(setup.watch_dir), str(setup.remote_dir), "a.csv", "outbox"):
            assert secret not in text
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log()


def test_metrics_count_a_file_failed_for_good_and_show_it_in_the_queue(setup: Setup):
    port = free_port()
    with_metrics(setup, f"127.0.0.1:{port}")
    (setup.remote_dir / "data").mkdir()  # a remote directory in the way of the file "data"
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        make_file(setup.watch_dir / "data", 100)

        samples = scrape_until(port, "scpd_delivery_failures_total", 1, target="local")

        assert value(samples, "scpd_queue_jobs", target="local", state="failed") == 1
        assert value(samples, "scpd_queue_jobs", target="local", state="pending") == 0
        assert value(samples, "scpd_files_delivered_total", target="local") == 0
        assert "Is a directory" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_metrics_count_retries_and_age_the_file_while_the_target_is_down(
        tmp_path: Path, sshd: ThrowawaySshd, known_hosts: Path, remote_dir: Path):
    setup = write_config(tmp_path, sshd, known_hosts, remote_dir, port=free_port())  # refused
    port = free_port()
    with_metrics(setup, f"127.0.0.1:{port}")
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        make_file(setup.watch_dir / "waiting.txt", 10)
        assert daemon.wait_for_log("retrying in", LAND_SECONDS), daemon.log()

        samples = scrape_until(port, "scpd_queue_jobs", 1, target="local", state="pending")
        assert value(samples, "scpd_delivery_retries_total", target="local") >= 1
        assert value(samples, "scpd_delivery_failures_total", target="local") == 0
        assert wait_until(lambda: value(scrape(port), "scpd_oldest_pending_age_seconds",
                                        target="local") >= 1.0, 10, poll=0.2)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_metrics_are_off_by_default_and_no_port_is_opened(setup: Setup):
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        make_file(setup.watch_dir / "a.txt", 10)
        assert wait_until((setup.remote_dir / "a.txt").exists, LAND_SECONDS), daemon.log()

        assert listening_ports(daemon.pid) == set()
        assert "serving metrics" not in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_metrics_port_in_use_stops_the_start_with_one_line(setup: Setup):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with_metrics(setup, f"127.0.0.1:{port}")

        result = subprocess.run([sys.executable, "-m", "scpd", "run", "-c", str(setup.config)],
                                capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 78, result.stderr
    assert result.stderr.splitlines() == [
        f"scpd: daemon.metrics_listen: cannot listen on 127.0.0.1:{port}: Address already in"
        f" use: another process listens there (ss -ltnp 'sport = :{port}' names it); stop it"
        " or choose another port"]


def test_sighup_moves_metrics_to_a_new_port_and_keeps_the_counts(setup: Setup):
    first, second = free_port(), free_port()
    with_metrics(setup, f"127.0.0.1:{first}")
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        make_file(setup.watch_dir / "before.txt", 10)
        scrape_until(first, "scpd_files_delivered_total", 1, target="local")

        with_metrics(setup, f"127.0.0.1:{second}")
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("config reloaded", 10), daemon.log()

        assert listening_ports(daemon.pid) == {second}
        assert is_refused(first)
        assert value(scrape(second), "scpd_files_delivered_total", target="local") == 1
        make_file(setup.watch_dir / "after.txt", 10)
        scrape_until(second, "scpd_files_delivered_total", 2, target="local")
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_sighup_to_a_metrics_port_in_use_keeps_the_running_config(setup: Setup):
    port = free_port()
    with_metrics(setup, f"127.0.0.1:{port}")
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            busy = holder.getsockname()[1]
            with_metrics(setup, f"127.0.0.1:{busy}")
            daemon.process.send_signal(signal.SIGHUP)

            assert daemon.wait_for_log("reload failed, keeping the running config", 10)
        assert f"daemon.metrics_listen: cannot listen on 127.0.0.1:{busy}" in daemon.log()
        assert listening_ports(daemon.pid) == {port}
        make_file(setup.watch_dir / "still.txt", 10)
        scrape_until(port, "scpd_files_delivered_total", 1, target="local")
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_sighup_without_metrics_listen_closes_the_port(setup: Setup):
    port = free_port()
    with_metrics(setup, f"127.0.0.1:{port}")
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()
        assert listening_ports(daemon.pid) == {port}

        with_metrics(setup, None)
        daemon.process.send_signal(signal.SIGHUP)
        assert daemon.wait_for_log("config reloaded", 10), daemon.log()

        assert listening_ports(daemon.pid) == set()
        assert is_refused(port)
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_metrics_are_served_on_ipv6_loopback(setup: Setup):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with_metrics(setup, f"[::1]:{port}")
    daemon = setup.start_daemon()
    try:
        assert daemon.wait_for_log("scpd ready", START_SECONDS), daemon.log()

        samples = scrape(port, host="[::1]")

        assert value(samples, "scpd_files_delivered_total", target="local") == 0
        assert f"serving metrics on http://[::1]:{port}/metrics" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
    with pytest.raises(urllib.error.URLError):
        scrape_text(port, host="[::1]")
