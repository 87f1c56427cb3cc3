"""`scpd status` and the daemon's own queue queries on a queue of a million jobs (run by hand:
`.venv/bin/python bench/status.py`; not part of `make test` or `make bench`).

The queue database is built directly (a million rows through enqueue() would take minutes and
measure nothing of interest here): 3 targets x 2 watches, one job per (watch, target, file),
files 50 to a directory, queued over 30 days, with the mix of states a busy installation has:

  offsite   healthy: nearly everything delivered, a few due, a few in flight, a few failed
  loghost   back after an outage: a third of its jobs still owed, half of them in backoff
  archive   paused (auth refused): its recent files pending, 1% failed with an error

The queue is built at the schema before the indexes of `scpd status`, then upgraded as a
daemon's first start after an upgrade does (timed once); with --grown, the jobs are inserted
with every index in place instead, as a queue grows. Then timed, each the median of several
runs on a warm page cache:

  status query      Store.summaries() on a read-only connection, open to close (in process)
  scpd status       the command end to end (a new Python process), text and --json
  counts            Store.counts(): the daemon's STATUS= line asks it once a second
  claim_batch       a worker's claim of its next batch (claimed jobs are released again)
  next_due_at       what an idle worker asks to know how long to sleep
  retry_failed      `scpd retry --target T`'s statement (last: it changes the queue)

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scpd.store import DB_NAME, MIGRATIONS, JobState, Store  # noqa: E402

TARGETS = ("offsite", "loghost", "archive")
WATCHES = ("reports", "logs")
FILES_PER_DIRECTORY = 50
DAY = 86400.0
OWED = (JobState.PENDING, JobState.SENDING, JobState.FAILED)
# The schema before the indexes of `scpd status` (store.py MIGRATIONS[3]): the queue is built
# at this version, and upgraded by the daemon's first start (timed), unless --grown.
PRE_STATUS_SCHEMA = 3
ENV = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}


def fill(state_dir: Path, rows: int, now: float, schema_version: int) -> dict[str, int]:
    """A queue of `rows` jobs, by bulk INSERT into the schema of that version; the counts."""
    state_dir.mkdir(parents=True)
    rng = random.Random(42)
    files = rows // len(TARGETS)
    counts: dict[str, int] = {}
    db = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    for script in MIGRATIONS[:schema_version]:
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {schema_version}")
    batch: list[tuple] = []
    for f in range(files):
        watch = WATCHES[0] if f % 3 else WATCHES[1]  # two thirds reports, a third logs
        directory = f // FILES_PER_DIRECTORY
        rel_path = f"{directory // 100:04d}/{directory % 100:02d}/file-{f:07d}.csv".encode()
        size = int(rng.lognormvariate(10, 2)) + 1  # median 22 kB, a long tail
        age = (1 - f / files) * 30 * DAY  # the oldest files first, as a queue fills
        queued_at = now - age
        for target in TARGETS:
            state, next_at, error, error_at = _state_of(target, age, rng, now)
            counts[f"{target} {state}"] = counts.get(f"{target} {state}", 0) + 1
            was_delivered = state == "delivered" or (state == "pending" and rng.random() < 0.3)
            batch.append((watch, target, rel_path, state, size, int(queued_at * 1e9), f,
                          size if was_delivered else None,
                          int(queued_at * 1e9) if was_delivered else None,
                          queued_at + 5 if was_delivered else None,
                          1 if error else 0, next_at, error, error_at, queued_at))
        if len(batch) >= 30_000:
            _insert(db, batch)
            batch = []
    _insert(db, batch)
    db.execute("INSERT INTO target_pauses VALUES ('archive', 'authentication failed', ?)",
               (now - 3600,))
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return counts


def _state_of(target: str, age: float, rng: random.Random, now: float
              ) -> tuple[str, float, str | None, float | None]:
    """(state, next_attempt_at, last_error, last_error_at) of one job of this target."""
    r = rng.random()
    if target == "offsite":
        if age < 600:
            return ("sending" if r < 0.1 else "pending"), 0.0, None, None
        if r < 0.0005:
            return "failed", 0.0, "remote: Permission denied", now - age + 30
        return "delivered", 0.0, None, None
    if target == "loghost":
        if age < 10 * DAY:
            if r < 0.5:
                return "pending", now + rng.uniform(1, 300), "connection refused", now - 60
            return "pending", 0.0, None, None
        return "delivered", 0.0, None, None
    if age < 1 * DAY:
        return "pending", 0.0, None, None
    if r < 0.01:
        return "failed", 0.0, "remote: No space left on device", now - age + 30
    return "delivered", 0.0, None, None


def _insert(db: sqlite3.Connection, batch: list[tuple]) -> None:
    db.executemany(
        """INSERT INTO jobs (watch, target, rel_path, state, size, mtime_ns, inode,
               delivered_size, delivered_mtime_ns, delivered_at, attempts, next_attempt_at,
               last_error, last_error_at, queued_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", batch)


def timed(action: Callable[[], object], runs: int) -> float:
    """Median seconds of `runs` calls, after one unmeasured call (a warm cache)."""
    action()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def write_config(work: Path, state_dir: Path) -> Path:
    known_hosts = work / "known_hosts"
    known_hosts.write_text("")
    targets = "".join(
        f'\n[targets.{name}]\nhost = "127.0.0.1"\nuser = "bench"\nuse_agent = true\n'
        f'known_hosts = "{known_hosts}"\nremote_dir = "/srv/{name}"\n' for name in TARGETS)
    watches = "".join(
        f'\n[[watch]]\nname = "{name}"\npath = "{work / name}"\ntargets = {list(TARGETS)!r}\n'
        .replace("'", '"') for name in WATCHES)
    config = work / "scpd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state_dir}"\n{targets}{watches}')
    return config


def scpd(config: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "scpd", *args, "-c", str(config)],
                            capture_output=True, text=True, env=ENV, check=False)
    if result.returncode != 0:
        raise SystemExit(f"scpd {' '.join(args)} failed: {result.stderr}")


def read_only_summaries(state_dir: Path, now: float) -> object:
    store = Store.open_read_only(state_dir)
    try:
        return store.summaries(WATCHES, now)
    finally:
        store.close()


def claim_and_release(store: Store, target: str) -> int:
    jobs = store.claim_batch(target, WATCHES, max_files=100, max_bytes=1024 * 1024)
    for job in jobs:
        store.release(job)
    return len(jobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the queue here and keep it")
    parser.add_argument("--grown", action="store_true",
                        help="insert the jobs with every index in place, as a queue grows"
                             " (slower to build; its indexes less compact than ones made at"
                             " once by the upgrade)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scpd-bench-status-") as tmp:
        work = args.keep or Path(tmp)
        state_dir = work / "state"
        now = time.time()
        started = time.monotonic()
        counts = fill(state_dir, args.rows, now,
                      len(MIGRATIONS) if args.grown else PRE_STATUS_SCHEMA)
        size_mb = (state_dir / DB_NAME).stat().st_size / 1e6
        print(f"queue: {sum(counts.values())} jobs ({size_mb:.0f} MB) built in"
              f" {time.monotonic() - started:.1f}s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
        # The schema steps since, as a daemon's first start after an upgrade runs them.
        started = time.monotonic()
        Store.open(state_dir).close()
        migrate_s = time.monotonic() - started
        config = write_config(work, state_dir)
        rows: list[tuple[str, float]] = [
            ("status query (Store.summaries, read-only, in process)",
             timed(lambda: read_only_summaries(state_dir, now), args.runs)),
            ("`scpd status` (a new process, end to end)",
             timed(lambda: scpd(config, "status"), args.runs)),
            ("`scpd status --json` (a new process, end to end)",
             timed(lambda: scpd(config, "status", "--json"), args.runs)),
            ("`scpd --version` (the process alone, for comparison)",
             timed(lambda: subprocess.run([sys.executable, "-m", "scpd", "--version"],
                                          capture_output=True, env=ENV, check=True),
                   args.runs)),
        ]
        store = Store.open(state_dir)
        try:
            rows.append(("counts, every state (the daemon's STATUS= line, once a second)",
                         timed(lambda: store.counts(WATCHES), args.runs)))
            rows.append(("counts, pending, sending and failed only",
                         timed(lambda: store.counts(WATCHES, OWED), args.runs)))
            for target in TARGETS:
                rows.append((f"claim_batch {target} (+ release)",
                             timed(lambda t=target: claim_and_release(store, t), 4 * args.runs)))
            for target in TARGETS:
                rows.append((f"next_due_at {target}",
                             timed(lambda t=target: store.next_due_at(t, WATCHES), args.runs)))
            started = time.perf_counter()
            retried = store.retry_failed(target="archive")
            rows.append((f"retry_failed archive ({retried} jobs, once)",
                         time.perf_counter() - started))
        finally:
            store.close()
    print(f"| {args.rows} jobs, {len(TARGETS)} targets, {len(WATCHES)} watches | median |")
    print("|---|---:|")
    if not args.grown:
        print(f"| upgrade of the queue from schema {PRE_STATUS_SCHEMA} (once)"
              f" | {migrate_s * 1000:.0f} ms |")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1000:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
