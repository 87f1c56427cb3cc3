"""The durable queue: what is owed survives restarts, and a version is sent once."""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scpd.fileversion import FileVersion
from scpd.store import (
    _LOOK_AHEAD_JOBS,
    DB_NAME,
    MIGRATIONS,
    JobState,
    SchemaTooNewError,
    StateDirBusyError,
    Store,
    lock_state_dir,
)

WATCHES = ("reports",)
T0 = 1_700_000_000.0
V1 = FileVersion(size=100, mtime_ns=1_000_000_000, inode=11)
V2 = FileVersion(size=200, mtime_ns=2_000_000_000, inode=11)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    store = Store.open(state_dir)
    try:
        yield store
    finally:
        store.close()


def states(store: Store, target: str = "offsite") -> dict[str, int]:
    return store.counts(WATCHES).get(target, {})


def test_store_enqueue_creates_a_pending_job(store: Store) -> None:
    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0) is True

    assert states(store) == {"pending": 1, "sending": 0, "delivered": 0, "failed": 0}
    job = store.claim("offsite", WATCHES, now=T0)
    assert job is not None
    assert (job.watch, job.target, job.rel_path, job.version, job.attempts) == \
        ("reports", "offsite", "a.pdf", V1, 0)


def test_store_state_dir_is_created_private(state_dir: Path, store: Store) -> None:
    assert (state_dir / DB_NAME).is_file()
    assert state_dir.stat().st_mode & 0o777 == 0o700


def test_store_enqueue_of_the_same_version_again_is_a_no_op(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)

    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0 + 5) is False

    assert states(store)["pending"] == 1


def test_store_keeps_one_job_per_target_of_the_same_file(store: Store) -> None:
    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    assert store.enqueue("reports", "loghost", "a.pdf", V1, now=T0)

    assert states(store, "offsite")["pending"] == 1
    assert states(store, "loghost")["pending"] == 1


def test_store_claim_marks_the_job_sending_and_returns_it(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)

    job = store.claim("offsite", WATCHES, now=T0)

    assert job is not None and job.rel_path == "a.pdf"
    assert states(store)["sending"] == 1
    assert store.claim("offsite", WATCHES, now=T0) is None  # not handed to a second worker


def test_store_claim_ignores_other_targets(store: Store) -> None:
    store.enqueue("reports", "loghost", "a.pdf", V1, now=T0)

    assert store.claim("offsite", WATCHES, now=T0) is None


def test_store_mark_delivered_records_the_job_as_delivered(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)

    assert store.mark_delivered(job, V1, now=T0 + 1) is True

    assert states(store) == {"pending": 0, "sending": 0, "delivered": 1, "failed": 0}
    assert store.claim("offsite", WATCHES, now=T0 + 2) is None
    assert store.is_delivered_everywhere("reports", "a.pdf", V1, ("offsite",))


def test_store_does_not_queue_a_delivered_version_again(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0)

    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0 + 60) is False
    # A restored file (new inode, same size and mtime) is the same version: DESIGN 4.4.
    restored = FileVersion(V1.size, V1.mtime_ns, inode=99)
    assert store.enqueue("reports", "offsite", "a.pdf", restored, now=T0 + 60) is False

    assert store.claim("offsite", WATCHES, now=T0 + 60) is None


@pytest.mark.parametrize("new_version", [
    FileVersion(size=V1.size + 1, mtime_ns=V1.mtime_ns, inode=V1.inode),
    FileVersion(size=V1.size, mtime_ns=V1.mtime_ns + 1, inode=V1.inode),
], ids=["size", "mtime"])
def test_store_queues_a_new_version_of_a_delivered_file(store: Store,
                                                        new_version: FileVersion) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0)

    assert store.enqueue("reports", "offsite", "a.pdf", new_version, now=T0 + 60) is True

    job = store.claim("offsite", WATCHES, now=T0 + 60)
    assert job is not None and job.version == new_version


def test_store_keeps_a_newer_version_queued_while_the_old_one_was_sending(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)

    assert store.enqueue("reports", "offsite", "a.pdf", V2, now=T0 + 1) is True
    assert store.mark_delivered(job, V1, now=T0 + 2) is False

    assert states(store)["pending"] == 1
    again = store.claim("offsite", WATCHES, now=T0 + 3)
    assert again is not None and again.version == V2
    assert store.mark_delivered(again, V2, now=T0 + 4) is True
    assert store.is_delivered_everywhere("reports", "a.pdf", V2, ("offsite",))


def test_store_scan_of_the_version_being_sent_does_not_send_it_twice(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)

    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0 + 1) is False

    assert store.mark_delivered(job, V1, now=T0 + 2) is True
    assert store.claim("offsite", WATCHES, now=T0 + 3) is None


def test_store_mark_retry_holds_the_job_until_its_next_attempt(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)

    store.mark_retry(job, "connection lost", next_attempt_at=T0 + 60, now=T0)

    assert states(store)["pending"] == 1
    assert store.next_due_at("offsite", WATCHES) == T0 + 60
    assert store.claim("offsite", WATCHES, now=T0 + 59) is None
    job = store.claim("offsite", WATCHES, now=T0 + 60)
    assert job is not None
    assert job.attempts == 1
    assert job.first_failure_at == T0

    store.mark_retry(job, "connection lost", next_attempt_at=T0 + 180, now=T0 + 60)
    job = store.claim("offsite", WATCHES, now=T0 + 180)
    assert job.attempts == 2
    assert job.first_failure_at == T0  # the give-up clock runs from the first failure


def test_store_make_all_due_ignores_saved_backoff(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_retry(store.claim("offsite", WATCHES, now=T0), "timeout", T0 + 3600, now=T0)

    store.make_all_due()

    assert store.claim("offsite", WATCHES, now=T0 + 1) is not None


def test_store_mark_failed_then_retry_failed_brings_it_back(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_failed(store.claim("offsite", WATCHES, now=T0), "Permission denied", now=T0)

    assert states(store)["failed"] == 1
    assert store.claim("offsite", WATCHES, now=T0 + 3600) is None  # no hot retry loop
    # A scan finding the same version again does not un-fail it: an operator must act.
    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0 + 1) is False

    assert store.retry_failed() == 1

    job = store.claim("offsite", WATCHES, now=T0 + 2)
    assert job is not None and job.version == V1 and job.attempts == 0


def test_store_retry_failed_can_pick_a_target_and_paths(store: Store) -> None:
    for target in ("offsite", "loghost"):
        for name in ("a.pdf", "b.pdf"):
            store.enqueue("reports", target, name, V1, now=T0)
            store.mark_failed(store.claim(target, WATCHES, now=T0), "denied", now=T0)

    assert store.retry_failed(target="offsite", rel_paths=[("reports", "b.pdf")]) == 1
    assert states(store, "offsite")["failed"] == 1
    assert store.retry_failed(target="loghost") == 2
    assert states(store, "loghost") == {"pending": 2, "sending": 0, "delivered": 0, "failed": 0}


def test_store_mark_failed_of_an_outdated_send_keeps_the_new_version_pending(
        store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)
    store.enqueue("reports", "offsite", "a.pdf", V2, now=T0 + 1)

    store.mark_failed(job, "Permission denied", now=T0 + 2)

    again = store.claim("offsite", WATCHES, now=T0 + 3)
    assert again is not None and again.version == V2


def test_store_drop_forgets_a_vanished_file_unless_it_came_back(store: Store) -> None:
    store.enqueue("reports", "offsite", "gone.pdf", V1, now=T0)
    store.drop(store.claim("offsite", WATCHES, now=T0))
    assert states(store) == {}

    store.enqueue("reports", "offsite", "back.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)
    store.enqueue("reports", "offsite", "back.pdf", V2, now=T0 + 1)
    store.drop(job)
    again = store.claim("offsite", WATCHES, now=T0 + 2)
    assert again is not None and again.version == V2


def test_store_requeue_interrupted_resends_what_a_crash_left_sending(state_dir: Path) -> None:
    store = Store.open(state_dir)
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    assert store.claim("offsite", WATCHES, now=T0) is not None
    store.close()  # the daemon dies here, mid-send

    store = Store.open(state_dir)
    try:
        assert store.claim("offsite", WATCHES, now=T0 + 1) is None  # still marked sending
        assert store.requeue_interrupted() == 1
        job = store.claim("offsite", WATCHES, now=T0 + 1)
        assert job is not None and (job.rel_path, job.version) == ("a.pdf", V1)
    finally:
        store.close()


def test_store_round_trips_file_names_that_are_not_utf8(state_dir: Path) -> None:
    name = os.fsdecode(b"sub/caf\xe9.txt")
    store = Store.open(state_dir)
    store.enqueue("reports", "offsite", name, V1, now=T0)
    store.close()

    store = Store.open(state_dir)
    try:
        job = store.claim("offsite", WATCHES, now=T0)
        assert os.fsencode(job.rel_path) == b"sub/caf\xe9.txt"
        store.mark_failed(job, "denied", now=T0)
        assert store.retry_failed(rel_paths=[("reports", name)]) == 1
    finally:
        store.close()


def test_store_claim_ignores_watches_not_in_the_given_tuple(store: Store) -> None:
    store.enqueue("old-watch", "offsite", "a.pdf", V1, now=T0)

    assert store.claim("offsite", WATCHES, now=T0) is None
    assert store.claim("offsite", (), now=T0) is None

    job = store.claim("offsite", ("reports", "old-watch"), now=T0)
    assert job is not None and job.watch == "old-watch"


def test_store_schema_version_equals_the_number_of_migrations(state_dir: Path) -> None:
    Store.open(state_dir).close()
    db = sqlite3.connect(state_dir / DB_NAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_store_reopens_an_existing_database_with_its_jobs(state_dir: Path) -> None:
    store = Store.open(state_dir)
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.close()

    for _ in range(2):  # the migrations must not run again
        store = Store.open(state_dir)
        try:
            assert states(store)["pending"] == 1
        finally:
            store.close()


def test_store_summaries_give_the_fields_of_status_json(store: Store) -> None:
    store.enqueue("reports", "offsite", "pending.pdf", V1, now=T0)
    store.enqueue("reports", "offsite", "delivered.pdf", V2, now=T0 + 10)
    store.enqueue("reports", "offsite", "failed.pdf", V1, now=T0 + 20)
    store.enqueue("reports", "offsite", "sending.pdf", V1, now=T0 + 30)
    by_name = {}
    while job := store.claim("offsite", WATCHES, now=T0 + 40):
        by_name[job.rel_path] = job
    store.mark_delivered(by_name["delivered.pdf"], V2, now=T0 + 41)
    store.mark_failed(by_name["failed.pdf"], "remote: Permission denied", now=T0 + 42)
    store.release(by_name["pending.pdf"])

    summary = store.summaries(WATCHES, now=T0 + 100)["offsite"]

    assert set(summary) >= {"pending", "sending", "failed", "delivered", "bytes_delivered",
                            "oldest_pending_age_s", "paused", "last_error", "last_error_at"}
    assert summary["pending"] == 1
    assert summary["sending"] == 1
    assert summary["failed"] == 1
    assert summary["delivered"] == 1
    assert summary["bytes_delivered"] == V2.size
    assert summary["oldest_pending_age_s"] == 100.0  # pending.pdf, queued at T0
    assert summary["paused"] is False
    assert summary["last_error"] == "remote: Permission denied"
    assert datetime.datetime.fromisoformat(summary["last_error_at"]) == \
        datetime.datetime.fromtimestamp(T0 + 42, datetime.UTC).replace(microsecond=0)
    assert datetime.datetime.fromisoformat(summary["last_delivered_at"]) == \
        datetime.datetime.fromtimestamp(T0 + 41, datetime.UTC)


def test_store_summaries_have_no_age_when_nothing_is_owed(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0)

    summary = store.summaries(WATCHES, now=T0 + 100)["offsite"]

    assert summary["oldest_pending_age_s"] is None
    assert summary["last_error"] is None and summary["last_error_at"] is None
    assert Store.empty_summary().keys() == summary.keys()


def test_store_summaries_keep_the_last_delivery_of_a_file_queued_again(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0 + 1)
    store.enqueue("reports", "offsite", "a.pdf", V2, now=T0 + 50)  # pending again

    summary = store.summaries(WATCHES, now=T0 + 100)["offsite"]

    assert (summary["pending"], summary["delivered"]) == (1, 0)
    assert summary["oldest_pending_age_s"] == 50.0
    assert datetime.datetime.fromisoformat(summary["last_delivered_at"]) == \
        datetime.datetime.fromtimestamp(T0 + 1, datetime.UTC)


def test_store_summaries_count_only_the_watches_asked_for(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.enqueue("gone", "offsite", "b.pdf", V2, now=T0 - 50)
    store.mark_failed(store.claim("offsite", ("gone",), now=T0), "denied", now=T0)

    summary = store.summaries(WATCHES, now=T0 + 100)["offsite"]

    assert (summary["pending"], summary["failed"], summary["last_error"]) == (1, 0, None)
    assert summary["oldest_pending_age_s"] == 100.0


def test_store_counts_only_the_states_asked_for(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.enqueue("reports", "offsite", "b.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0)

    owed = store.counts(WATCHES, (JobState.PENDING, JobState.SENDING, JobState.FAILED))

    assert owed == {"offsite": {"pending": 1, "sending": 0, "failed": 0}}
    assert store.counts(WATCHES)["offsite"]["delivered"] == 1


# -- read-only, for `scpd status` ---------------------------------------------------------------


def test_store_open_read_only_of_no_queue_is_none_and_makes_nothing(state_dir: Path) -> None:
    assert Store.open_read_only(state_dir) is None
    assert not state_dir.exists()
    state_dir.mkdir()
    assert Store.open_read_only(state_dir) is None
    assert Store.open_if_exists(state_dir) is None
    assert list(state_dir.iterdir()) == []


def test_store_read_only_writes_nothing_and_cannot(state_dir: Path) -> None:
    with contextlib.closing(Store.open(state_dir)) as writer:
        writer.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
        writer.mark_failed(writer.claim("offsite", WATCHES, now=T0), "denied", now=T0)
    before = {p.name: p.read_bytes() for p in state_dir.iterdir()}

    reader = Store.open_read_only(state_dir)
    try:
        assert reader.summaries(WATCHES, now=T0)["offsite"]["failed"] == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.retry_failed()
    finally:
        reader.close()

    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == before  # no -wal, -shm


def test_store_read_only_reads_beside_a_writer_and_never_holds_it_up(state_dir: Path) -> None:
    writer = Store.open(state_dir)
    try:
        writer.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
        reader = Store.open_read_only(state_dir)
        try:
            with reader._reading():  # a long report: its read transaction stays open
                started = time.monotonic()
                writer.enqueue("reports", "offsite", "b.pdf", V1, now=T0)
                assert time.monotonic() - started < 1.0  # no wait for the reader
            assert reader.summaries(WATCHES, now=T0)["offsite"]["pending"] == 2
        finally:
            reader.close()
        writer.enqueue("reports", "offsite", "c.pdf", V1, now=T0)  # the reader left no lock
    finally:
        writer.close()


def test_store_read_only_sees_a_daemon_that_opens_the_queue_during_the_read(
        state_dir: Path) -> None:
    with contextlib.closing(Store.open(state_dir)) as first:
        first.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    reader = Store.open_read_only(state_dir)  # no -wal: the file is read as immutable
    writer = Store.open(state_dir)  # a daemon starts; its commits go to a new -wal
    try:
        writer.enqueue("reports", "offsite", "b.pdf", V1, now=T0)

        assert reader.summaries(WATCHES, now=T0)["offsite"]["pending"] == 2
    finally:
        reader.close()
        writer.close()


def test_store_read_only_reads_an_older_schema_as_it_is(state_dir: Path) -> None:
    state_dir.mkdir()
    db = sqlite3.connect(state_dir / DB_NAME)
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")  # before target_pauses
    db.execute("INSERT INTO jobs (watch, target, rel_path, state, size, mtime_ns, inode,"
               " queued_at) VALUES ('reports', 'offsite', ?, 'pending', 1, 1, 1, ?)",
               (b"old.pdf", T0))
    db.commit()
    db.close()

    reader = Store.open_read_only(state_dir)
    try:
        summary = reader.summaries(WATCHES, now=T0 + 10)["offsite"]
    finally:
        reader.close()

    assert (summary["pending"], summary["paused"], summary["oldest_pending_age_s"]) == \
        (1, False, 10.0)
    db = sqlite3.connect(state_dir / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # not migrated
    db.close()


@pytest.mark.parametrize("opener", [Store.open, Store.open_read_only, Store.open_if_exists])
def test_store_refuses_the_queue_of_a_newer_scpd(state_dir: Path, opener) -> None:
    Store.open(state_dir).close()
    db = sqlite3.connect(state_dir / DB_NAME)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()

    with pytest.raises(SchemaTooNewError) as refused:
        opener(state_dir)

    assert refused.value.key_path == "daemon.state_dir"  # a config error: exit 78
    assert refused.value.found_version == len(MIGRATIONS) + 1
    assert "newer scpd" in str(refused.value)


def test_store_has_changed_elsewhere_sees_the_commits_of_others_only(state_dir: Path) -> None:
    daemon, command = Store.open(state_dir), Store.open(state_dir)
    try:
        daemon.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
        daemon.mark_failed(daemon.claim("offsite", WATCHES, now=T0), "denied", now=T0)
        assert daemon.has_changed_elsewhere() is False  # its own commits

        assert command.retry_failed() == 1  # `scpd retry`, another process

        assert daemon.has_changed_elsewhere() is True
        assert daemon.has_changed_elsewhere() is False  # said once
        command.pause_target("offsite", "authentication failed", now=T0)
        command.resume_targets()
        assert daemon.has_changed_elsewhere() is True
    finally:
        daemon.close()
        command.close()


def test_lock_state_dir_refuses_a_second_lock_on_the_same_dir(state_dir: Path) -> None:
    # flock locks belong to an open file description, so even a second open in this
    # process conflicts, just as a second daemon would.
    fd = lock_state_dir(state_dir)
    try:
        with pytest.raises(StateDirBusyError, match=str(state_dir)):
            lock_state_dir(state_dir)
    finally:
        os.close(fd)

    fd = lock_state_dir(state_dir)  # free again once the holder is gone
    os.close(fd)


def test_store_a_file_restored_to_its_delivered_version_owes_nothing(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)
    assert job is not None
    store.mark_delivered(job, V1, now=T0)
    assert store.enqueue("reports", "offsite", "a.pdf", V2, now=T0) is True

    # The file is put back as it was (cp -p, rsync -a, tar): the remote already has it.
    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0) is False

    assert states(store)["delivered"] == 1
    assert store.claim("offsite", WATCHES, now=T0 + 3600) is None


def test_store_defer_of_an_older_version_leaves_the_newer_one_due(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)
    assert job is not None
    store.enqueue("reports", "offsite", "a.pdf", V2, now=T0)  # queued while V1 was sending

    store.defer(job, until=T0 + 3600)

    again = store.claim("offsite", WATCHES, now=T0)
    assert again is not None and again.version == V2


def test_store_failure_of_an_older_version_does_not_fail_the_newer_one(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    job = store.claim("offsite", WATCHES, now=T0)
    assert job is not None
    store.enqueue("reports", "offsite", "a.pdf", V2, now=T0)

    store.mark_failed(job, "permission denied", now=T0)

    assert states(store)["failed"] == 0
    again = store.claim("offsite", WATCHES, now=T0)
    assert again is not None and again.version == V2


def test_store_a_paused_target_shows_in_summaries_with_its_reason(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_failed(store.claim("offsite", WATCHES, now=T0), "an older error", now=T0 + 1)
    store.pause_target("offsite", "host key does not match", now=T0 + 5)
    store.pause_target("offsite", "authentication failed", now=T0 + 9)  # first time is kept
    store.pause_target("idle", "authentication failed", now=T0 + 5)  # no jobs at all

    summaries = store.summaries(WATCHES, now=T0 + 100)

    assert summaries["offsite"]["paused"] is True
    assert summaries["offsite"]["last_error"] == "authentication failed"
    assert datetime.datetime.fromisoformat(summaries["offsite"]["last_error_at"]) == \
        datetime.datetime.fromtimestamp(T0 + 5, datetime.UTC)
    assert summaries["offsite"]["failed"] == 1
    assert summaries["idle"]["paused"] is True and summaries["idle"]["pending"] == 0


def test_store_resume_targets_clears_one_or_every_pause(store: Store) -> None:
    store.pause_target("offsite", "authentication failed", now=T0)
    store.pause_target("backup", "host key does not match", now=T0)

    assert store.resume_targets("offsite") == {"offsite": "authentication failed"}
    assert store.resume_targets("offsite") == {}
    assert set(store.paused_targets()) == {"backup"}
    assert store.resume_targets() == {"backup": "host key does not match"}
    assert store.paused_targets() == {}


def test_store_migrates_a_first_schema_database_keeping_its_jobs(state_dir: Path) -> None:
    state_dir.mkdir()
    db = sqlite3.connect(state_dir / DB_NAME)
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO jobs (watch, target, rel_path, state, size, mtime_ns, inode,"
               " queued_at) VALUES ('reports', 'offsite', ?, 'pending', 1, 1, 1, ?)",
               (b"old.pdf", T0))
    db.commit()
    db.close()

    store = Store.open(state_dir)
    try:
        store.pause_target("offsite", "authentication failed", now=T0)
        assert states(store)["pending"] == 1
        assert store.claim("offsite", WATCHES, now=T0).rel_path == "old.pdf"
        assert "offsite" in store.paused_targets()
    finally:
        store.close()


def test_store_remembers_the_remote_temp_of_an_attempt_until_delivery(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    first = store.claim("offsite", WATCHES, now=T0)
    assert first.remote_temp is None
    store.note_remote_temps([(first, "/in/.a.pdf.0badf00d.scpd-part")])
    store.mark_retry(first, "connection lost", next_attempt_at=T0, now=T0)

    second = store.claim("offsite", WATCHES, now=T0)
    assert second.remote_temp == "/in/.a.pdf.0badf00d.scpd-part"  # for the retry to remove
    store.mark_delivered(second, V1, now=T0)
    store.enqueue("reports", "offsite", "a.pdf", V2, now=T0 + 1)

    assert store.claim("offsite", WATCHES, now=T0 + 1).remote_temp is None


def test_store_held_versions_are_what_each_target_has_delivered_or_queued(
        store: Store) -> None:
    targets = ("offsite", "loghost")
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.enqueue("reports", "loghost", "a.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0)
    store.enqueue("reports", "offsite", "a.pdf", V2, now=T0 + 1)  # pending again, newer
    store.enqueue("reports", "offsite", "b.pdf", V1, now=T0)

    held = store.held_versions("reports", ["a.pdf", "b.pdf", "never.pdf"], targets)

    assert held == {
        "a.pdf": {"offsite": (V2.size, V2.mtime_ns), "loghost": (V1.size, V1.mtime_ns)},
        "b.pdf": {"offsite": (V1.size, V1.mtime_ns)},  # nothing owed to loghost yet
    }


def test_store_held_version_of_a_delivered_job_is_the_delivered_one(store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_delivered(store.claim("offsite", WATCHES, now=T0), V1, now=T0)

    assert store.held_versions("reports", ["a.pdf"], ("offsite",)) == {
        "a.pdf": {"offsite": (V1.size, V1.mtime_ns)}}
    # ... which is exactly when enqueue() of it is a no-op
    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0 + 1) is False


def test_store_held_version_of_a_failed_job_keeps_a_scan_from_queueing_it(
        store: Store) -> None:
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    store.mark_failed(store.claim("offsite", WATCHES, now=T0), "permission denied", now=T0)

    # Failed stays failed until `scpd retry`: a scan must not queue it again either.
    assert store.held_versions("reports", ["a.pdf"], ("offsite",)) == {
        "a.pdf": {"offsite": (V1.size, V1.mtime_ns)}}
    assert store.enqueue("reports", "offsite", "a.pdf", V1, now=T0 + 1) is False


def test_store_held_versions_of_names_that_are_not_utf8(store: Store) -> None:
    name = os.fsdecode(b"caf\xe9.csv")
    store.enqueue("reports", "offsite", name, V1, now=T0)

    assert store.held_versions("reports", [name], ("offsite",)) == {
        name: {"offsite": (V1.size, V1.mtime_ns)}}


def test_store_enqueue_many_answers_per_item_in_one_go(store: Store) -> None:
    store.enqueue("reports", "offsite", "old.pdf", V1, now=T0)

    queued = store.enqueue_many([("reports", "offsite", "old.pdf", V1),
                                 ("reports", "offsite", "new.pdf", V1),
                                 ("reports", "loghost", "new.pdf", V2)], now=T0 + 1)

    assert queued == [False, True, True]
    assert states(store)["pending"] == 2
    assert states(store, "loghost")["pending"] == 1


# -- batches ----------------------------------------------------------------------------------


def enqueue_files(store: Store, rel_paths: list[str], size: int = 100) -> None:
    for i, rel in enumerate(rel_paths):
        store.enqueue("reports", "offsite", rel, FileVersion(size, 1_000 + i, 50 + i),
                      now=T0 + i * 0.001)


def test_a_batch_takes_due_jobs_of_one_directory_only_however_interleaved(store: Store):
    # Written round-robin into three directories and the root, as a busy writer does.
    names = [f"{d}f{i:03d}" for i in range(40) for d in ("a/", "b/", "a/b/", "")]
    enqueue_files(store, names)

    first = store.claim_batch("offsite", WATCHES, max_files=25, max_bytes=10**6, now=T0 + 1)
    second = store.claim_batch("offsite", WATCHES, max_files=25, max_bytes=10**6, now=T0 + 1)
    nested = store.claim_batch("offsite", WATCHES, max_files=100, max_bytes=10**6, now=T0 + 1)

    assert [j.rel_path for j in first] == [f"a/f{i:03d}" for i in range(25)]
    assert [j.rel_path for j in second] == [f"b/f{i:03d}" for i in range(25)]
    assert sorted(j.rel_path for j in nested) == [f"a/b/f{i:03d}" for i in range(40)]
    assert states(store)["sending"] == 90


def test_a_batch_stays_within_its_bytes_and_passes_over_what_does_not_fit(store: Store):
    enqueue_files(store, ["x/small0", "x/big"], size=600)
    enqueue_files(store, ["x/small1", "x/small2"], size=300)

    batch = store.claim_batch("offsite", WATCHES, max_files=10, max_bytes=1000, now=T0 + 1)

    assert [j.rel_path for j in batch] == ["x/small0", "x/small1"]
    assert store.claim_batch("offsite", WATCHES, max_files=1, max_bytes=0, now=T0 + 1)[0] \
        .rel_path == "x/big"


def test_a_batch_of_the_root_takes_no_file_of_a_subdirectory(store: Store):
    enqueue_files(store, ["top1", "sub/inner", "top2", "subway"])

    batch = store.claim_batch("offsite", WATCHES, max_files=10, max_bytes=10**6, now=T0 + 1)

    assert [j.rel_path for j in batch] == ["top1", "top2", "subway"]


def test_a_batch_looks_for_its_directory_among_the_next_due_jobs_only(store: Store):
    # A directory's files queued far apart (a backlog of another directory between them):
    # a claim does not walk the whole backlog to find them; the later one goes later.
    store.enqueue_many([("reports", "offsite", "a/first", FileVersion(1, 1, 1)),
                        *[("reports", "offsite", f"b/{i}", FileVersion(1, i, i))
                          for i in range(_LOOK_AHEAD_JOBS)],
                        ("reports", "offsite", "a/far", FileVersion(1, 2, 2))], now=T0)

    batch = store.claim_batch("offsite", WATCHES, max_files=100, max_bytes=10**6, now=T0 + 1)

    assert [j.rel_path for j in batch] == ["a/first"]
    assert store.counts(WATCHES)["offsite"]["pending"] == _LOOK_AHEAD_JOBS + 1


def test_a_reader_in_the_daemon_process_leaves_the_live_wal_alone(
        store: Store, state_dir: Path) -> None:
    # A metrics scrape reads the queue inside the daemon. Closing any descriptor of the file
    # drops the process's POSIX locks, SQLite's too: another process closing its connection
    # then took the database for unused and deleted the WAL the daemon still wrote to.
    store.enqueue("reports", "offsite", "a.pdf", V1, now=T0)
    reader = Store.open_read_only(state_dir)
    assert reader is not None
    reader.close()
    wal = state_dir / (DB_NAME + "-wal")
    other_process = ("import sqlite3, sys; db = sqlite3.connect(sys.argv[1]);"
                     " db.execute('SELECT count(*) FROM jobs').fetchone(); db.close()")
    subprocess.run([sys.executable, "-c", other_process, str(state_dir / DB_NAME)],
                   check=True, timeout=30)

    assert wal.exists(), "another process deleted the WAL of a queue still open"
    store.enqueue("reports", "offsite", "b.pdf", V1, now=T0)
    check = sqlite3.connect(state_dir / DB_NAME)
    try:
        paths = {row[0] for row in check.execute("SELECT rel_path FROM jobs")}
    finally:
        check.close()
    assert {os.fsencode("a.pdf"), os.fsencode("b.pdf")} <= {
        p if isinstance(p, bytes) else os.fsencode(p) for p in paths}


def test_retry_beside_a_daemon_not_restarted_since_an_upgrade_leaves_the_schema(
        state_dir: Path) -> None:
    # A queue at schema 3 (before the status indexes): `scpd retry` of the new version must
    # not build them under the write lock while the old daemon runs on it; the daemon's
    # next start does.
    Store.open(state_dir).close()
    db = sqlite3.connect(state_dir / DB_NAME)
    db.executescript("DROP INDEX jobs_status; DROP INDEX jobs_errors; PRAGMA user_version = 3;")
    db.close()

    tool = Store.open_if_exists(state_dir)
    assert tool is not None
    assert tool.retry_failed() == 0
    tool.close()
    after_tool = _schema_of(state_dir)
    Store.open(state_dir).close()

    assert after_tool == (3, set())
    assert _schema_of(state_dir) == (len(MIGRATIONS), {"jobs_status", "jobs_errors"})


def _schema_of(state_dir: Path) -> tuple[int, set[str]]:
    db = sqlite3.connect(state_dir / DB_NAME)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        indexes = {row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
            " AND name IN ('jobs_status', 'jobs_errors')")}
    finally:
        db.close()
    return version, indexes
