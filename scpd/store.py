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
import fcntl
import os
import posixpath
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scpd.errors import ScpdError
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
]


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

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=10)
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL under WAL survives a crash of scpd; a power cut may lose the last commits,
        # which costs at most a resend (start-up scan), never a lost file.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(state_dir / DB_NAME)

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

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for step, script in enumerate(MIGRATIONS[version:], start=version):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")

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
                # Same directory: rel_path starts with it and has no "/" after it.
                directory = posixpath.dirname(row[3])
                prefix = directory + b"/" if directory else b""
                candidates = db.execute(
                    f"""{_SELECT_JOB} WHERE target = ? AND state = 'pending'
                          AND next_attempt_at <= ? AND watch = ? AND id != ?
                          AND substr(rel_path, 1, ?) = ?
                          AND instr(substr(rel_path, ? + 1), X'2F') = 0
                        ORDER BY next_attempt_at, id LIMIT ?""",
                    (target, now, batch[0].watch, batch[0].id, len(prefix), prefix,
                     len(prefix), _CANDIDATES_PER_FILE * max_files))
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
                f"SELECT id FROM jobs WHERE state = 'delivered' AND id IN"
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

    def counts(self, watches: tuple[str, ...]) -> dict[str, dict[str, int]]:
        """{target: {state: n}} over the jobs of these watches."""
        with self._lock:
            rows = self._db.execute(
                f"""
                SELECT target, state, COUNT(*) FROM jobs
                WHERE watch IN ({_placeholders(watches)}) GROUP BY target, state
                """,
                watches).fetchall()
        result: dict[str, dict[str, int]] = {}
        for target, state, n in rows:
            result.setdefault(target, {s.value: 0 for s in JobState})[state] = n
        return result

    @staticmethod
    def empty_summary() -> dict[str, object]:
        return {"pending": 0, "sending": 0, "failed": 0, "delivered": 0, "bytes_delivered": 0,
                "oldest_pending_age_s": None, "paused": False, "last_error": None,
                "last_error_at": None}

    def summaries(self, watches: tuple[str, ...], now: float) -> dict[str, dict[str, object]]:
        """Per target, the fields of `scpd status --json`."""
        with self._lock:
            rows = self._db.execute(
                f"""
                SELECT target,
                  SUM(state = 'pending'), SUM(state = 'sending'), SUM(state = 'failed'),
                  SUM(state = 'delivered'),
                  COALESCE(SUM(CASE state WHEN 'delivered' THEN delivered_size END), 0),
                  MIN(CASE WHEN state IN ('pending', 'sending') THEN queued_at END)
                FROM jobs WHERE watch IN ({_placeholders(watches)}) GROUP BY target
                """,
                watches).fetchall()
            # SQLite takes bare columns from the row holding the MAX(): the latest error.
            errors = {target: (message, at) for target, message, at in self._db.execute(
                f"""
                SELECT target, last_error, MAX(last_error_at) FROM jobs
                WHERE last_error IS NOT NULL AND watch IN ({_placeholders(watches)})
                GROUP BY target
                """, watches)}
        pauses = self.paused_targets()
        result = {target: self.empty_summary() for target in pauses}
        for target, pending, sending, failed, delivered, nbytes, oldest in rows:
            summary = result.setdefault(target, self.empty_summary())
            summary.update(pending=pending, sending=sending, failed=failed, delivered=delivered,
                           bytes_delivered=nbytes,
                           oldest_pending_age_s=None if oldest is None else round(now - oldest, 1))
        for target, summary in result.items():
            summary["paused"] = target in pauses
            # A pause is the target's newest trouble: its reason is the error to show.
            if target in pauses or target in errors:
                message, at = pauses[target] if target in pauses else errors[target]
                summary["last_error"] = message
                summary["last_error_at"] = datetime.datetime.fromtimestamp(
                    float(at), datetime.UTC).isoformat(timespec="seconds")
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
            rows = self._db.execute("SELECT target, reason, paused_at FROM target_pauses")
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


_SELECT_JOB = """SELECT id, watch, target, rel_path, size, mtime_ns, inode, generation, attempts,
                         first_failure_at, remote_temp FROM jobs"""
# Due jobs of the directory looked at per place in a batch: those too big to fit are
# passed over for smaller ones behind them.
_CANDIDATES_PER_FILE = 2


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
