"""scpd/metrics.py against a real queue database: the gauges read at scrape time, the counters
the pool feeds, one private registry each, and prometheus_client only when metrics are on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from scpd.config import Config, Target, Watch
from scpd.fileversion import FileVersion
from scpd.metrics import Metrics, _ProcessCollector
from scpd.store import DB_NAME, Store


def make_config(state_dir: Path, targets: tuple[str, ...] = ("offsite", "loghost"),
                watches: tuple[str, ...] = ("reports",)) -> Config:
    return Config(
        path=state_dir / "config.toml", state_dir=state_dir,
        targets={name: Target(name=name, host="h", user="u", known_hosts=Path("/kh"),
                              remote_dir="/r") for name in targets},
        watches=tuple(Watch(name=name, path=Path("/w") / name, targets=targets)
                      for name in watches))


@pytest.fixture
def store(tmp_path: Path):
    store = Store.open(tmp_path)
    yield store
    store.close()


def gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_queue_gauges_read_jobs_oldest_age_and_pauses_at_scrape_time(
        tmp_path: Path, store: Store) -> None:
    metrics = Metrics(make_config(tmp_path))
    now = time.time()
    store.enqueue("reports", "offsite", "old.csv", FileVersion(10, 1, 1), now=now - 600)
    store.enqueue("reports", "offsite", "new.csv", FileVersion(10, 1, 2), now=now - 5)
    store.enqueue("reports", "loghost", "bad.csv", FileVersion(10, 1, 3), now=now)
    store.mark_failed(store.claim("loghost", ("reports",)), "permission denied")
    store.pause_target("loghost", "authentication failed")

    assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="pending") == 2
    assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="sending") == 0
    assert gauge(metrics, "scpd_queue_jobs", target="loghost", state="failed") == 1
    assert gauge(metrics, "scpd_oldest_pending_age_seconds", target="offsite") == \
        pytest.approx(600, abs=2)
    assert gauge(metrics, "scpd_oldest_pending_age_seconds", target="loghost") == 0
    assert gauge(metrics, "scpd_target_paused", target="loghost") == 1
    assert gauge(metrics, "scpd_target_paused", target="offsite") == 0
    # At the next scrape, not at the first one: nothing is cached.
    store.claim("offsite", ("reports",))
    assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="sending") == 1
    assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="pending") == 1


def test_queue_gauges_name_only_the_configured_targets_and_count_only_their_watches(
        tmp_path: Path, store: Store) -> None:
    metrics = Metrics(make_config(tmp_path, targets=("offsite",)))
    store.enqueue("reports", "offsite", "a", FileVersion(1, 1, 1))
    store.enqueue("gone-watch", "offsite", "b", FileVersion(1, 1, 2))
    store.enqueue("reports", "gone-target", "c", FileVersion(1, 1, 3))

    assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="pending") == 1
    assert gauge(metrics, "scpd_queue_jobs", target="gone-target", state="pending") is None


def test_queue_gauges_are_read_from_the_scraping_thread_over_their_own_connection(
        tmp_path: Path, store: Store) -> None:
    metrics = Metrics(make_config(tmp_path))
    store.enqueue("reports", "offsite", "a", FileVersion(1, 1, 1))
    seen: list[float | None] = []

    scraper = threading.Thread(
        target=lambda: seen.append(gauge(metrics, "scpd_queue_jobs", target="offsite",
                                         state="pending")))
    scraper.start()
    scraper.join(10)

    assert seen == [1]


def test_queue_gauges_are_zero_before_there_is_a_queue(tmp_path: Path) -> None:
    metrics = Metrics(make_config(tmp_path / "no-such-dir"))

    assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="pending") == 0
    assert not (tmp_path / "no-such-dir").exists()  # a scrape makes nothing


def test_queue_gauges_are_left_out_when_the_queue_cannot_be_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not a database" * 100)
    metrics = Metrics(make_config(tmp_path))
    metrics.delivered("offsite", 10, 0.1)

    with caplog.at_level(logging.WARNING, logger="scpd.metrics"):
        assert gauge(metrics, "scpd_queue_jobs", target="offsite", state="pending") is None

    assert gauge(metrics, "scpd_files_delivered_total", target="offsite") == 1
    assert "metrics: cannot read the queue in" in caplog.text


def test_counters_follow_the_pool_and_start_at_zero_for_every_target(tmp_path: Path) -> None:
    metrics = Metrics(make_config(tmp_path))

    metrics.delivered("offsite", 1000, 0.004)
    metrics.delivered("offsite", 24, 75.0)
    metrics.retried("offsite")
    metrics.failed("offsite")

    assert gauge(metrics, "scpd_files_delivered_total", target="offsite") == 2
    assert gauge(metrics, "scpd_delivered_bytes_total", target="offsite") == 1024
    assert gauge(metrics, "scpd_delivery_retries_total", target="offsite") == 1
    assert gauge(metrics, "scpd_delivery_failures_total", target="offsite") == 1
    assert gauge(metrics, "scpd_transfer_duration_seconds_bucket", target="offsite",
                 le="0.005") == 1
    assert gauge(metrics, "scpd_transfer_duration_seconds_bucket", target="offsite",
                 le="60.0") == 1
    assert gauge(metrics, "scpd_transfer_duration_seconds_bucket", target="offsite",
                 le="120.0") == 2
    for name in ("scpd_files_delivered_total", "scpd_delivered_bytes_total",
                 "scpd_delivery_failures_total", "scpd_delivery_retries_total",
                 "scpd_transfer_duration_seconds_count"):
        assert gauge(metrics, name, target="loghost") == 0
    # Not exported: Prometheus finds counter resets by itself.
    assert gauge(metrics, "scpd_files_delivered_created", target="offsite") is None


def test_a_reload_keeps_the_counts_and_drops_the_series_of_a_removed_target(
        tmp_path: Path) -> None:
    metrics = Metrics(make_config(tmp_path))
    metrics.delivered("offsite", 10, 0.1)

    metrics.use(make_config(tmp_path, targets=("offsite", "archive")))

    assert gauge(metrics, "scpd_files_delivered_total", target="offsite") == 1
    assert gauge(metrics, "scpd_files_delivered_total", target="archive") == 0
    assert gauge(metrics, "scpd_files_delivered_total", target="loghost") is None
    assert gauge(metrics, "scpd_target_paused", target="loghost") is None


def test_each_metrics_has_a_registry_of_its_own(tmp_path: Path) -> None:
    first, second = Metrics(make_config(tmp_path)), Metrics(make_config(tmp_path))

    first.delivered("offsite", 10, 0.1)

    assert gauge(first, "scpd_files_delivered_total", target="offsite") == 1
    assert gauge(second, "scpd_files_delivered_total", target="offsite") == 0


def test_the_daemon_imports_prometheus_client_only_when_metrics_are_on() -> None:
    # It costs the start about 20 ms; most daemons never serve metrics.
    code = ("import sys, scpd.cli, scpd.daemon, scpd.pool, scpd.config;"
            " print('prometheus_client' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_process_metrics_are_there_where_proc_stat_is_hidden(tmp_path: Path) -> None:
    # The shipped unit's ProcSubset=pid leaves /proc/self but hides /proc/stat, where
    # prometheus_client looks up the boot time; without it, it drops every process_* metric.
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to(f"/proc/{os.getpid()}")
    registry = CollectorRegistry()
    _ProcessCollector(proc=str(proc), registry=registry)

    started = registry.get_sample_value("process_start_time_seconds")
    assert started is not None
    assert time.time() - 7 * 86400 < started <= time.time()
    assert registry.get_sample_value("process_resident_memory_bytes") > 0
