"""The durable queue in SQLite: schema, migrations, and every statement scpd runs.

One row per (watch, target, relative path). The row holds the version last queued, the
version last delivered, and the retry state, so everything that must survive a crash is a
column. `generation` counts queued versions: a delivery is recorded as final only if no newer
version was queued while it was being sent.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import os
import posixpath
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scpd.errors import ConfigError, ScpdError
from scpd.fileversion import FileVersion

DB_NAME = "queue.sqlite3"
LOCK_NAME = "scpd.lock"

# Index i upgrades the schema from user_version i to i + 1. Append; never edit a shipped step.
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        watch TEXT NOT NULL,
        target TEXT NOT NULL,
        rel_path BLOB NOT NULL,            -- file names are bytes, and not every name is UTF-8
        state TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
        size INTEGER NOT NULL,             -- version last queued
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        generation INTEGER NOT NULL DEFAULT 1,
        delivered_size INTEGER,            -- version last delivered (NULL: never)
        delivered_mtime_ns INTEGER,
        delivered_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_failure_at REAL,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        last_error_at REAL,
        queued_at REAL NOT NULL,
        UNIQUE (watch, target, rel_path)
    );
    CREATE INDEX jobs_due ON jobs (target, state, next_attempt_at);
    """,
    """
    -- A target refused us for a reason no retry fixes (auth, host key): its jobs wait, kept
    -- pending, until an operator acts. A row here is what `scpd status` shows as paused.
    CREATE TABLE target_pauses (
        target TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        paused_at REAL NOT NULL
    );
    """,
    """
    -- The hidden remote path the latest attempt wrote to: what a crash of the remote leaves
    -- behind, removed by the next attempt (by exact name: it may share a directory with
    -- another sender's temporary files).
    ALTER TABLE jobs ADD COLUMN remote_temp BLOB;
    """,
    """
    -- What `scpd status` and the daemon's STATUS= line (once a second) count: one pass over
    -- this index per state asked for, never a walk of the table (a million jobs: 0.15 s for
    -- status, not 1.5 s). State first: the states owed, few, are counted without the
    -- delivered bulk.
    CREATE INDEX jobs_status
        ON jobs (state, target, watch, delivered_size, delivered_at, queued_at);
    -- The latest error of a target, found among the few jobs that have one.
    CREATE INDEX jobs_errors ON jobs (target, last_error_at) WHERE last_error IS NOT NULL;
    """,
]


# The schema retry and resume_targets work with: target_pauses (2), remote_temp (3). Later
# steps only add indexes.
_TOOLS_NEED_SCHEMA = 3


def _DELIVERED_IS(prefix: str = "") -> str:  # noqa: N802 -- reads as SQL
    """SQL: the delivered version equals the queued one (given by column prefix)."""
    return (f"delivered_size IS {prefix}size AND delivered_mtime_ns IS {prefix}mtime_ns")


def _HAS_VERSION(size: str, mtime_ns: str) -> str:  # noqa: N802 -- reads as SQL
    """SQL: the job already holds this version, delivered or queued (enqueue is a no-op).
    held_versions() reads the same rule."""
    return (f"((state = 'delivered' AND delivered_size = {size}"
            f" AND delivered_mtime_ns = {mtime_ns})"
            f" OR (state != 'delivered' AND size = {size} AND mtime_ns = {mtime_ns}))")


# SQL: where a job goes when the outcome of an attempt concerned an older queued version:
# nothing owed if the remote already has the version now queued, else due at once.
_SETTLED = f"CASE WHEN {_DELIVERED_IS()} THEN 'delivered' ELSE 'pending' END"


class JobState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class StateDirBusyError(ScpdError):
    """Another scpd process holds this state directory."""


class SchemaTooNewError(ConfigError):
    """The queue was written by a newer scpd, whose schema this one would misread."""

    def __init__(self, path: Path, found_version: int):
        super().__init__("daemon.state_dir", f"{path} holds the queue of a newer scpd, schema"
                         f" version {found_version} where this scpd knows up to"
                         f" {len(MIGRATIONS)} (upgrade scpd, or use another state_dir)")
        self.found_version = found_version


@dataclass(frozen=True)
class Job:
    id: int
    watch: str
    target: str
    rel_path: str
    version: FileVersion
    generation: int
    attempts: int
    first_failure_at: float | None
    remote_temp: str | None = None


class Store:
    """The queue. Thread-safe: one connection, one lock, short transactions."""

    schema_version = len(MIGRATIONS)  # an older one only when opened read-only
    _is_immutable = False

    def __init__(self, path: Path, *, is_read_only: bool = False,
                 migrates_below: int = len(MIGRATIONS) + 1):
        """is_read_only: for reports beside a running daemon (see open_read_only).
        migrates_below: bring the schema up to date only if it is older than this version
        (`scpd retry` beside a daemon not restarted since an upgrade: see open_if_exists)."""
        self.path = path
        self._lock = threading.Lock()
        # While a daemon has the queue open, its -wal and -shm files exist, and a reader reads
        # through them. With no -wal, no one has it open and the file holds every commit: it
        # is read as immutable then, so that neither file is created (owned by root, or at
        # all: a reader that may not write the directory could not open it otherwise).
        self._is_immutable = is_read_only and not _wal_of(path).exists()
        self._db = _connect(path, is_read_only=is_read_only, is_immutable=self._is_immutable)
        try:
            self.schema_version = self._check_schema() if is_read_only \
                else self._migrate(migrates_below)
            self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(state_dir / DB_NAME)

    @classmethod
    def open_if_exists(cls, state_dir: Path) -> Store | None:
        """The queue, None if scpd has made none in state_dir. (`scpd retry` has nothing to do
        then; a queue it made, as root, could not be written by the daemon's user.)"""
        path = state_dir / DB_NAME
        # Not migrated if it has what retry needs: a new index built under the write lock
        # (1.7 s at a million jobs) would hold up the daemon still running on it.
        return cls(path, migrates_below=_TOOLS_NEED_SCHEMA) if _exists(path) else None

    @classmethod
    def open_read_only(cls, state_dir: Path) -> Store | None:
        """The queue for reading alone (`scpd status`), beside a running daemon or not: it
        creates, migrates, writes and checkpoints nothing, and takes no write lock (a WAL
        reader never blocks the writer). None if scpd has made no queue in state_dir.

        Raises PermissionError (the file is not readable by this user), SchemaTooNewError,
        sqlite3.Error."""
        path = state_dir / DB_NAME
        if not _exists(path):
            return None
        store = cls(path, is_read_only=True)
        if store.schema_version == 0:  # made, but its first migration never committed
            store.close()
            return None
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also after a failed COMMIT (state disk full)
                    self._db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: the statements of one report see one state of the queue."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")  # a read: nothing to keep

    def _migrate(self, migrates_below: int) -> int:
        """Bring the schema up to date if it is older than migrates_below; its version."""
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise SchemaTooNewError(self.path, version)
            if version >= migrates_below:
                return version
            for step, script in enumerate(MIGRATIONS[version:], start=version):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")
        return len(MIGRATIONS)

    def _check_schema(self) -> int:
        """The schema version of a queue opened read-only: an older one is read as it is
        (a daemon not restarted since an upgrade), a newer one is refused."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise SchemaTooNewError(self.path, version)
        return version

    def has_changed_elsewhere(self) -> bool:
        """True if another process (`scpd retry`) committed to the queue since the last call:
        this connection's own commits do not count (PRAGMA data_version). A microsecond."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
        has_changed, self._data_version = version != self._data_version, version
        return has_changed

    # -- producers ---------------------------------------------------------------------------

    def enqueue(self, watch: str, target: str, rel_path: str, version: FileVersion,
                now: float | None = None) -> bool:
        """Queue this version unless it is already delivered or already queued. True if queued."""
        return self.enqueue_many([(watch, target, rel_path, version)], now)[0]

    def enqueue_many(self, items: list[tuple[str, str, str, FileVersion]],
                     now: float | None = None) -> list[bool]:
        """enqueue() for (watch, target, relative path, version) items, in one transaction."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return [self._upsert(db, *item, now) for item in items]

    @staticmethod
    def _upsert(db: sqlite3.Connection, watch: str, target: str, rel_path: str,
                version: FileVersion, now: float) -> bool:
        row = db.execute(
            f"""
            INSERT INTO jobs (watch, target, rel_path, state, size, mtime_ns, inode, queued_at)
            VALUES (?, ?, ?, 'pending', ?, ?, ?, ?)
            ON CONFLICT (watch, target, rel_path) DO UPDATE SET
                size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode,
                generation = generation + 1,
                -- Back to a version the remote already has (a restore): nothing owed.
                state = CASE WHEN state = 'sending' THEN 'sending'
                             WHEN {_DELIVERED_IS("excluded.")} THEN 'delivered'
                             ELSE 'pending' END,
                attempts = 0, first_failure_at = NULL, next_attempt_at = 0,
                last_error = NULL, queued_at = excluded.queued_at
            WHERE NOT {_HAS_VERSION("excluded.size", "excluded.mtime_ns")}
            RETURNING state
            """,
            (watch, target, os.fsencode(rel_path), version.size, version.mtime_ns,
             version.inode, now)).fetchone()
        return row is not None and row[0] != JobState.DELIVERED

    def held_versions(self, watch: str, rel_paths: list[str], targets: tuple[str, ...]
                      ) -> dict[str, dict[str, tuple[int, int]]]:
        """{relative path: {target: (size, mtime_ns)}}: the version each job already holds,
        delivered or queued; enqueue() of that version is a no-op. What a scan asks of the
        files it finds, a few hundred per indexed read."""
        paths = [os.fsencode(rel) for rel in rel_paths]
        with self._lock:
            rows = self._db.execute(
                f"""
                SELECT rel_path, target,
                       CASE state WHEN 'delivered' THEN delivered_size ELSE size END,
                       CASE state WHEN 'delivered' THEN delivered_mtime_ns ELSE mtime_ns END
                FROM jobs WHERE watch = ? AND target IN ({_placeholders(targets)})
                  AND rel_path IN ({_placeholders(tuple(paths))})
                """,
                (watch, *targets, *paths)).fetchall()
        held: dict[str, dict[str, tuple[int, int]]] = {}
        for rel_path, target, size, mtime_ns in rows:
            held.setdefault(os.fsdecode(rel_path), {})[target] = (size, mtime_ns)
        return held

    # -- workers -----------------------------------------------------------------------------

    def claim(self, target: str, watches: tuple[str, ...], now: float | None = None
              ) -> Job | None:
        """The next due job of this target for one of these watches, now marked sending;
        None if nothing is due. (Rows of watches no longer configured stay, untouched.)"""
        batch = self.claim_batch(target, watches, max_files=1, max_bytes=0, now=now)
        return batch[0] if batch else None

    def claim_batch(self, target: str, watches: tuple[str, ...], *, max_files: int,
                    max_bytes: int, now: float | None = None) -> list[Job]:
        """The next due job of this target, and after it more due jobs of the same watch
        and directory while the batch stays within max_files and max_bytes; all now marked
        sending. Empty if nothing is due."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(
                f"""{_SELECT_JOB} WHERE target = ? AND state = 'pending'
                      AND next_attempt_at <= ? AND watch IN ({_placeholders(watches)})
                    ORDER BY next_attempt_at, id LIMIT 1""",
                (target, now, *watches)).fetchone()
            if row is None:
                return []
            batch = [_job(row)]
            if max_files > 1 and batch[0].version.size < max_bytes:
                # Same directory: rel_path starts with it and has no "/" after it. Sought
                # among the next due jobs of the target only: with a backlog of a million
                # spread over many directories, every claim would walk all of it otherwise.
                directory = posixpath.dirname(row[3])
                prefix = directory + b"/" if directory else b""
                candidates = db.execute(
                    f"""SELECT {_JOB_COLUMNS} FROM (
                          SELECT {_JOB_COLUMNS}, next_attempt_at FROM jobs
                          WHERE target = ? AND state = 'pending' AND next_attempt_at <= ?
                            AND watch = ?
                          ORDER BY next_attempt_at, id LIMIT ?)
                        WHERE id != ? AND substr(rel_path, 1, ?) = ?
                          AND instr(substr(rel_path, ? + 1), X'2F') = 0
                        ORDER BY next_attempt_at, id LIMIT ?""",
                    (target, now, batch[0].watch, _LOOK_AHEAD_JOBS, batch[0].id,
                     len(prefix), prefix, len(prefix), _CANDIDATES_PER_FILE * max_files))
                batch += _within_limits(batch[0], map(_job, candidates), max_files, max_bytes)
            db.executemany("UPDATE jobs SET state = 'sending' WHERE id = ?",
                           [(job.id,) for job in batch])
        return batch

    def note_remote_temps(self, temps: list[tuple[Job, str]]) -> None:
        """Remember where these attempts write, before they write anything there."""
        with self._transaction() as db:
            db.executemany("UPDATE jobs SET remote_temp = ? WHERE id = ?",
                           [(os.fsencode(temp), job.id) for job, temp in temps])

    def still_sending(self, jobs: list[Job]) -> list[Job]:
        """Those of the jobs whose outcome is not recorded yet."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE state = 'sending' AND id IN"
                f" ({','.join('?' * len(jobs))})", [job.id for job in jobs])
            sending = {row[0] for row in rows}
        return [job for job in jobs if job.id in sending]

    def mark_delivered(self, job: Job, sent: FileVersion, now: float | None = None) -> bool:
        """Record what reached the remote. True if the job is done, False if a newer version
        was queued meanwhile (the job is then pending again)."""
        return self.mark_delivered_many([(job, sent)], now)[0]

    def mark_delivered_many(self, delivered: list[tuple[Job, FileVersion]],
                            now: float | None = None) -> list[bool]:
        """mark_delivered for each, in one transaction (a batch lands at once)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.executemany(
                """
                UPDATE jobs SET delivered_size = ?, delivered_mtime_ns = ?, delivered_at = ?,
                    attempts = 0, first_failure_at = NULL, last_error = NULL,
                    next_attempt_at = 0, remote_temp = NULL,  -- renamed into place
                    -- Done unless a different version was queued while this one was sent.
                    state = CASE WHEN generation = ? OR (size = ? AND mtime_ns = ?)
                                 THEN 'delivered' ELSE 'pending' END
                WHERE id = ?
                """,
                [(sent.size, sent.mtime_ns, now, job.generation, sent.size, sent.mtime_ns,
                  job.id) for job, sent in delivered])
            done = {row[0] for row in db.execute(
                # "+state": not by the state index, which would walk every delivered job.
                f"SELECT id FROM jobs WHERE +state = 'delivered' AND id IN"
                f" ({','.join('?' * len(delivered))})", [job.id for job, _ in delivered])}
        return [job.id in done for job, _ in delivered]

    def mark_retry(self, job: Job, error: str, next_attempt_at: float,
                   now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                f"""
                UPDATE jobs SET state = CASE generation WHEN ? THEN 'pending' ELSE {_SETTLED} END,
                    attempts = attempts + 1, first_failure_at = COALESCE(first_failure_at, ?),
                    next_attempt_at = CASE generation WHEN ? THEN ? ELSE 0 END,
                    last_error = ?, last_error_at = ?
                WHERE id = ?
                """,
                (job.generation, now, job.generation, next_attempt_at, error, now, job.id))

    def mark_failed(self, job: Job, error: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                f"""
                UPDATE jobs SET state = CASE generation WHEN ? THEN 'failed' ELSE {_SETTLED} END,
                    attempts = attempts + 1, last_error = ?, last_error_at = ?
                WHERE id = ?
                """, (job.generation, error, now, job.id))

    def defer(self, job: Job, until: float) -> None:
        """Not now, and not a failure (the file is still changing): pending again at `until`."""
        with self._transaction() as db:
            db.execute(
                f"""
                UPDATE jobs SET state = CASE generation WHEN ? THEN 'pending' ELSE {_SETTLED} END,
                    next_attempt_at = CASE generation WHEN ? THEN ? ELSE 0 END
                WHERE id = ?
                """,
                (job.generation, job.generation, until, job.id))

    def release(self, job: Job) -> None:
        """Back to the queue at once, untouched (e.g. the daemon is stopping)."""
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET state = {_SETTLED} WHERE id = ? AND state = 'sending'",
                       (job.id,))

    def drop(self, job: Job) -> None:
        """Forget a job whose file vanished (unless a new version was queued meanwhile)."""
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ? AND generation = ?",
                       (job.id, job.generation))
            db.execute(f"UPDATE jobs SET state = {_SETTLED} WHERE id = ? AND state = 'sending'",
                       (job.id,))

    # -- start-up and reporting --------------------------------------------------------------

    def requeue_interrupted(self) -> int:
        """Jobs left 'sending' by a crash go back to pending. Returns how many."""
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET state = 'pending' WHERE state = 'sending'"
                              ).rowcount

    def make_all_due(self) -> None:
        """An explicit request (run --once) ignores saved backoff."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET next_attempt_at = 0 WHERE state = 'pending'")

    def next_due_at(self, target: str, watches: tuple[str, ...]) -> float | None:
        with self._lock:
            row = self._db.execute(
                f"""
                SELECT MIN(next_attempt_at) FROM jobs
                WHERE target = ? AND state = 'pending' AND watch IN ({_placeholders(watches)})
                """,
                (target, *watches)).fetchone()
        return row[0]

    def counts(self, watches: tuple[str, ...], states: Iterable[JobState] = tuple(JobState)
               ) -> dict[str, dict[str, int]]:
        """{target: {state: n}} over the jobs of these watches, for each of `states` (default:
        all). Time grows with the jobs counted: leave out DELIVERED, the bulk of a long-lived
        queue, where it is not needed (a million jobs, most delivered: ~0.1 s with it;
        without, ~0.1 ms per thousand jobs owed)."""
        states = tuple(JobState(state) for state in states)
        with self._lock:
            rows = self._db.execute(
                f"""
                SELECT state, target, COUNT(*) FROM jobs
                WHERE state IN ({_placeholders(states)}) AND watch IN ({_placeholders(watches)})
                GROUP BY state, target
                """,
                (*states, *watches)).fetchall()
        result: dict[str, dict[str, int]] = {}
        for state, target, n in rows:
            result.setdefault(target, dict.fromkeys(states, 0))[state] = n
        return result

    @staticmethod
    def empty_summary() -> dict[str, object]:
        return {"pending": 0, "sending": 0, "failed": 0, "delivered": 0, "bytes_delivered": 0,
                "oldest_pending_age_s": None, "paused": False, "last_error": None,
                "last_error_at": None, "last_delivered_at": None}

    def summaries(self, watches: tuple[str, ...], now: float, *,
                  with_delivered: bool = True) -> dict[str, dict[str, object]]:
        """Per target, the fields of `scpd status --json`, as of one moment. Reads the
        jobs_status index, not the table (a million jobs: ~0.15 s). with_delivered=False
        leaves the delivered jobs out (counts, bytes, last delivery: zero or None), and the
        last errors too: what is owed alone costs a few ms (a metrics scrape)."""
        try:
            result = self._summaries(watches, now, with_delivered)
        except sqlite3.DatabaseError:
            if not self._is_immutable:
                raise
            result = None  # a checkpoint changed the file mid-read: "malformed", say
        if self._is_immutable and (result is None or _wal_of(self.path).exists()):
            # A daemon opened the queue during this unlocked read: a checkpoint of its may
            # have changed the file under it. Read again, through its -wal and -shm now.
            with self._lock:
                self._db.close()
                self._db = _connect(self.path, is_read_only=True, is_immutable=False)
                self._is_immutable = False
            result = self._summaries(watches, now, with_delivered)
        return result

    def _summaries(self, watches: tuple[str, ...], now: float, with_delivered: bool
                   ) -> dict[str, dict[str, object]]:
        owed = (JobState.PENDING, JobState.SENDING, JobState.FAILED)
        in_watches = f"watch IN ({_placeholders(watches)})"
        with self._reading() as db:
            # "state = ..." first: the planner then takes jobs_status, not the (watch, ...)
            # unique index and a walk of the whole table.
            delivered = db.execute(
                f"""
                SELECT target, COUNT(*), SUM(delivered_size), MAX(delivered_at) FROM jobs
                WHERE state = 'delivered' AND {in_watches} GROUP BY target
                """, watches).fetchall() if with_delivered else []
            owing = db.execute(
                f"""
                SELECT state, target, COUNT(*), MIN(queued_at), MAX(delivered_at) FROM jobs
                WHERE state IN ({_placeholders(owed)}) AND {in_watches} GROUP BY state, target
                """, (*owed, *watches)).fetchall()
            errors = {}
            for target in ({row[0] for row in delivered} | {row[1] for row in owing}
                           if with_delivered else ()):
                error = db.execute(
                    f"""
                    SELECT last_error, last_error_at FROM jobs
                    WHERE target = ? AND last_error IS NOT NULL AND {in_watches}
                    ORDER BY last_error_at DESC LIMIT 1
                    """, (target, *watches)).fetchone()
                if error is not None:
                    errors[target] = error
            pauses = self._paused_targets(db)
        result = {target: self.empty_summary() for target in pauses}
        oldest_queued: dict[str, list[float]] = {}  # of the jobs owed (pending or sending)
        last_delivered: dict[str, list[float]] = {}  # by state: a job delivered, then queued
        for target, n, nbytes, last_at in delivered:
            result.setdefault(target, self.empty_summary()).update(
                delivered=n, bytes_delivered=nbytes or 0)
            last_delivered.setdefault(target, []).append(last_at)
        for state, target, n, oldest, last_at in owing:
            result.setdefault(target, self.empty_summary())[state] = n
            if state != JobState.FAILED:
                oldest_queued.setdefault(target, []).append(oldest)
            last_delivered.setdefault(target, []).append(last_at)
        for target, summary in result.items():
            summary["paused"] = target in pauses
            if queued_at := [t for t in oldest_queued.get(target, ()) if t is not None]:
                summary["oldest_pending_age_s"] = round(now - min(queued_at), 1)
            if delivered_at := [t for t in last_delivered.get(target, ()) if t is not None]:
                summary["last_delivered_at"] = _iso(max(delivered_at))
            # A pause is the target's newest trouble: its reason is the error to show.
            if target in pauses or target in errors:
                message, at = pauses[target] if target in pauses else errors[target]
                summary["last_error"] = message
                summary["last_error_at"] = _iso(at)
        return result

    def retry_failed(self, target: str | None = None,
                     rel_paths: list[tuple[str, str]] | None = None) -> int:
        """Failed jobs back to pending, due now. rel_paths: (watch, relative path) pairs."""
        query = "UPDATE jobs SET state = 'pending', next_attempt_at = 0, attempts = 0," \
                " first_failure_at = NULL WHERE state = 'failed'"
        params: list[object] = []
        if target:
            query += " AND target = ?"
            params.append(target)
        with self._transaction() as db:
            if not rel_paths:
                return db.execute(query, params).rowcount
            return sum(db.execute(query + " AND watch = ? AND rel_path = ?",
                                  [*params, watch, os.fsencode(rel)]).rowcount
                       for watch, rel in rel_paths)

    # -- paused targets -----------------------------------------------------------------------

    def pause_target(self, target: str, reason: str, now: float | None = None) -> None:
        """Record the target as paused (the first pause time is kept, the reason updated)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("""
                INSERT INTO target_pauses (target, reason, paused_at) VALUES (?, ?, ?)
                ON CONFLICT (target) DO UPDATE SET reason = excluded.reason
                """, (target, reason, now))

    def resume_targets(self, target: str | None = None) -> dict[str, str]:
        """Clear the pause of one target (or all). Returns {target: reason} of those cleared."""
        where, params = ("WHERE target = ?", (target,)) if target else ("", ())
        with self._transaction() as db:
            cleared = dict(db.execute(f"SELECT target, reason FROM target_pauses {where}",
                                      params).fetchall())
            db.execute(f"DELETE FROM target_pauses {where}", params)
        return cleared

    def paused_targets(self) -> dict[str, tuple[str, float]]:
        """{target: (reason, paused_at)}"""
        with self._lock:
            return self._paused_targets(self._db)

    def _paused_targets(self, db: sqlite3.Connection) -> dict[str, tuple[str, float]]:
        if self.schema_version < 2:  # read-only, of an scpd before pauses: none recorded
            return {}
        rows = db.execute("SELECT target, reason, paused_at FROM target_pauses")
        return {target: (reason, at) for target, reason, at in rows}

    def is_delivered_everywhere(self, watch: str, rel_path: str, version: FileVersion,
                                targets: tuple[str, ...]) -> bool:
        """True once every target of the watch has this version of the file."""
        with self._lock:
            n = self._db.execute(
                f"""
                SELECT COUNT(*) FROM jobs WHERE watch = ? AND rel_path = ? AND state = 'delivered'
                  AND delivered_size = ? AND delivered_mtime_ns = ?
                  AND target IN ({_placeholders(targets)})
                """,
                (watch, os.fsencode(rel_path), version.size, version.mtime_ns, *targets)
            ).fetchone()[0]
        return n == len(targets)


_JOB_COLUMNS = """id, watch, target, rel_path, size, mtime_ns, inode, generation, attempts,
                  first_failure_at, remote_temp"""
_SELECT_JOB = f"SELECT {_JOB_COLUMNS} FROM jobs"
# Due jobs of the directory looked at per place in a batch: those too big to fit are
# passed over for smaller ones behind them.
_CANDIDATES_PER_FILE = 2
# How far down the due jobs of a target a batch looks for files of its directory: a scan
# queues a directory's files together, so they are near; files of one directory queued far
# apart go in later batches. Bounds a claim at ~1 ms however long the backlog.
_LOOK_AHEAD_JOBS = 2000


def _job(row: tuple) -> Job:
    return Job(id=row[0], watch=row[1], target=row[2], rel_path=os.fsdecode(row[3]),
               version=FileVersion(row[4], row[5], row[6]), generation=row[7],
               attempts=row[8], first_failure_at=row[9],
               remote_temp=None if row[10] is None else os.fsdecode(row[10]))


def _within_limits(first: Job, candidates: Iterable[Job], max_files: int, max_bytes: int
                   ) -> list[Job]:
    """The candidates that join first's batch: as many as fit in the limits, in order."""
    total, chosen = first.version.size, []
    for job in candidates:
        if len(chosen) + 1 >= max_files:
            break
        if total + job.version.size <= max_bytes:
            chosen.append(job)
            total += job.version.size
    return chosen


def _placeholders(values: tuple[str, ...]) -> str:
    return ",".join("?" * len(values)) or "NULL"


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(float(timestamp), datetime.UTC).isoformat(
        timespec="seconds")


def _exists(db_path: Path) -> bool:
    """Whether the queue file exists; PermissionError if this user cannot read it.

    Never by opening it: closing any descriptor of the file drops every POSIX lock this
    process holds on it, SQLite's included. In the daemon (a metrics scrape) that let
    another process take the database for unused and delete the live WAL under it."""
    try:
        os.stat(db_path)
    except FileNotFoundError:
        return False
    if not os.access(db_path, os.R_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(db_path))
    return True


def _wal_of(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-wal")


def _connect(path: Path, *, is_read_only: bool, is_immutable: bool) -> sqlite3.Connection:
    """The one place a connection is made and its pragmas set."""
    if not is_read_only:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL under WAL survives a crash of scpd; a power cut may lose the last commits,
        # which costs at most a resend (start-up scan), never a lost file.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        return db
    # mode=ro: no write, no write lock, no checkpoint (a read-only connection cannot).
    # immutable: no locks, no -wal or -shm; for a file no one has open.
    query = "mode=ro&immutable=1" if is_immutable else "mode=ro"
    db = sqlite3.connect(f"file:{urllib.parse.quote(os.fsencode(path))}?{query}", uri=True,
                         isolation_level=None, check_same_thread=False, timeout=10)
    db.execute("PRAGMA query_only = ON")
    return db


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for this process's lifetime."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirBusyError(f"another scpd is running with state_dir {state_dir}") from None
    return fd
