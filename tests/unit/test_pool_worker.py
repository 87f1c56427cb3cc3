"""A worker's connection: opened before the first file, closed after a quiet spell (with a
stand-in uploader: what is tested is the worker's loop, not SSH)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scpd import config, pool
from scpd.store import Store
from scpd.transport import Credentials
from tools.harness import wait_until


class CountingUploader:
    progress_at = 0.0
    connected_at = 0.0

    def __init__(self) -> None:
        self.prepared = self.closed = 0

    def prepare(self) -> None:
        self.prepared += 1

    def close(self) -> None:
        self.closed += 1

    def retire(self) -> None:
        pass

    def upload_batch(self, uploads, on_results, note_temps=None) -> None:
        raise AssertionError("nothing is queued: nothing may be sent")


@pytest.fixture
def uploaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    key = tmp_path / "id"
    key.write_text("not read here\n")
    key.chmod(0o600)
    (tmp_path / "out").mkdir()
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / "scpd.toml"
    path.write_text(f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
[targets.t]
host = "127.0.0.1"
user = "u"
identity_file = "{key}"
known_hosts = "{tmp_path / 'known_hosts'}"
remote_dir = "/in"
connections = 2
[[watch]]
name = "w"
path = "{tmp_path / 'out'}"
targets = ["t"]
""")
    made: list[CountingUploader] = []
    monkeypatch.setattr(pool, "open_uploader",
                        lambda *args: made.append(CountingUploader()) or made[-1])
    monkeypatch.setattr(pool, "_IDLE_CLOSE_SECONDS", 0.5)
    monkeypatch.setattr(pool, "_IDLE_WAIT_SECONDS", 0.05)
    loaded = config.load(path)
    store = Store.open(loaded.state_dir)
    workers = pool.Pool(loaded, store, {"t": Credentials()}, lambda *args: None)
    workers.start()
    try:
        yield made
    finally:
        assert workers.stop(grace_seconds=0.0)
        store.close()


def test_each_worker_logs_in_before_its_first_file_and_closes_when_idle(uploaders):
    assert len(uploaders) == 2
    assert wait_until(lambda: all(u.prepared == 1 for u in uploaders), 2.0)
    assert all(u.closed == 0 for u in uploaders)  # not yet idle for long

    assert wait_until(lambda: all(u.closed >= 1 for u in uploaders), 3.0)
    assert all(u.prepared == 1 for u in uploaders)  # reopened only by the next file
