"""make bench-scan: the start-up scan and the watcher at scale (issue: 100,000 files in 10,000
directories, under 3 s and 80 MB on a 2-core machine).

`scpd run` is started as a subprocess on a generated tree, with its one target down (a
throwaway sshd, stopped: connection refused), so that what is measured is the scan and the
queue, not the transfers. Three runs:

  fresh    every file new: walked, found ready (older than settle), queued in the SQLite queue
  restart  every file already delivered (as recorded in the queue): walked, compared, skipped
  moved in the same tree `mv`'d into the watch of a running scpd: time from the rename until
           every file is queued (watchdog's events for the new subtree, and scpd's scan of it)

`scpd ready` is also timed: inotify watches on every directory are in place by then.

Times are the daemon's own report of its scan ("start-up scan of watch ...: ... in N s") and
the wall time to its log lines; memory is the daemon's peak RSS (VmHWM) when the scan is done.
Warm page cache (the tree was just written). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.harness import scpd_config_text, wait_until  # noqa: E402
from tools.sshd import ThrowawaySshd  # noqa: E402

SCAN_LINE = re.compile(r"start-up scan of watch outbox: (\d+) file\(s\) in (\d+) dir\(s\),"
                       r" (\d+) new or changed, ([\d.]+)s")
ENV = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
TIMEOUT_SECONDS = 300


def make_tree(root: Path, directories: int, files_per_directory: int) -> None:
    """directories spread over two levels (100 per parent), small files in each."""
    old = time.time() - 3600  # written an hour ago: ready on sight, no settle wait
    for d in range(directories):
        directory = root / f"d{d // 100:04d}" / f"e{d % 100:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        for f in range(files_per_directory):
            path = directory / f"report-{f:03d}.csv"
            path.write_bytes(b"x" * 200)
            os.utime(path, (old, old))


def run_daemon(config: Path, log_path: Path) -> dict[str, float]:
    """Start scpd, wait for its start-up scan report, read its peak RSS, stop it."""
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "scpd", "run", "-c", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    ready_at = None
    try:
        def scanned() -> bool:
            nonlocal ready_at
            text = log_path.read_text(errors="replace")
            if ready_at is None and "scpd ready" in text:
                ready_at = time.monotonic()
            return SCAN_LINE.search(text) is not None or process.poll() is not None

        if not wait_until(scanned, TIMEOUT_SECONDS, poll=0.05):
            raise SystemExit(f"no scan report within {TIMEOUT_SECONDS}s; see {log_path}")
        done_at = time.monotonic()
        match = SCAN_LINE.search(log_path.read_text(errors="replace"))
        if match is None:
            raise SystemExit(f"scpd exited before its scan report; see {log_path}")
        peak_kib = _peak_rss_kib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    files, directories, handed_on, seconds = match.groups()
    return {"files": int(files), "directories": int(directories), "new": int(handed_on),
            "scan_s": float(seconds), "wall_s": done_at - started,
            "ready_s": (ready_at or done_at) - started, "peak_rss_mb": peak_kib / 1024}


def run_moved_in(config: Path, log_path: Path, tree: Path, watch_dir: Path,
                 state_dir: Path, files: int) -> dict[str, float]:
    """Start scpd on an empty watch, move the tree in, wait until every file is queued."""
    watch_dir.mkdir()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "scpd", "run", "-c", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    try:
        if not wait_until(lambda: SCAN_LINE.search(log_path.read_text()) is not None, 60):
            raise SystemExit(f"scpd did not start; see {log_path}")
        moved_at = time.monotonic()
        tree.rename(watch_dir / tree.name)
        if not wait_until(lambda: _jobs(state_dir) >= files, TIMEOUT_SECONDS, poll=0.1):
            raise SystemExit(f"only {_jobs(state_dir)} of {files} queued; see {log_path}")
        queued_s = time.monotonic() - moved_at
        peak_kib = _peak_rss_kib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"queued_s": queued_s, "peak_rss_mb": peak_kib / 1024}


def _jobs(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "queue.sqlite3", timeout=10) as db:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/PID/status")


def mark_all_delivered(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "queue.sqlite3") as db:
        return db.execute("UPDATE jobs SET state = 'delivered', delivered_size = size,"
                          " delivered_mtime_ns = mtime_ns, delivered_at = 0").rowcount


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directories", type=int, default=10_000)
    parser.add_argument("--files-per-directory", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scpd-bench-scan-") as tmp:
        work = Path(tmp)
        sshd = ThrowawaySshd(work / "sshd").start()
        known_hosts = work / "known_hosts"
        sshd.write_known_hosts(known_hosts)
        sshd.stop()  # the target is down: nothing is sent, the scan is what runs
        watch_dir, state_dir = work / "outbox", work / "state"
        t0 = time.monotonic()
        make_tree(watch_dir, args.directories, args.files_per_directory)
        print(f"tree: {args.directories * args.files_per_directory} files in"
              f" {args.directories} directories, written in {time.monotonic() - t0:.1f}s",
              file=sys.stderr)
        config = work / "scpd.toml"
        config.write_text(scpd_config_text(sshd, known_hosts, work / "remote", watch_dir,
                                           state_dir, watch_extra='rescan_interval = "1h"'))
        fresh = run_daemon(config, work / "fresh.log")
        delivered = mark_all_delivered(state_dir)
        restart = run_daemon(config, work / "restart.log")
        moved_config = work / "moved.toml"
        moved_watch, moved_state = work / "outbox-moved", work / "state-moved"
        moved_config.write_text(scpd_config_text(
            sshd, known_hosts, work / "remote", moved_watch, moved_state,
            watch_extra='rescan_interval = "1h"'))
        moved = run_moved_in(moved_config, work / "moved.log", watch_dir, moved_watch,
                             moved_state, fresh["files"])
    print("| run | files | dirs | new | scan | start to ready | start to scanned | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in (("fresh: every file new, queued", fresh),
                      (f"restart: {delivered} delivered, none sent again", restart)):
        print(f"| {name} | {row['files']} | {row['directories']} | {row['new']}"
              f" | {row['scan_s']:.2f} s | {row['ready_s']:.2f} s | {row['wall_s']:.2f} s"
              f" | {row['peak_rss_mb']:.0f} MB |")
    print()
    print("| run | files | mv to all queued | peak RSS |")
    print("|---|---:|---:|---:|")
    print(f"| moved in: the tree mv'd into a running scpd's watch | {fresh['files']}"
          f" | {moved['queued_s']:.2f} s | {moved['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
