"""The STATUS= line `systemctl status` shows: counts, the file in progress, the rate."""

from __future__ import annotations

from scpd.daemon import status_line


def line(**overrides) -> str:
    values = dict(queued=0, sending=0, on_wire=[], bytes_per_second=0.0, failed=0, paused=0)
    return status_line(**{**values, **overrides})


def test_names_the_file_in_progress_with_its_percent_and_the_rate() -> None:
    status = line(queued=12, sending=1, on_wire=[("/var/reports/report.pdf", 41, 100)],
                  bytes_per_second=9.8e6)

    assert status == "12 queued, 1 sending report.pdf 41% 9.8 MB/s, 0 failed"


def test_idle_says_nothing_is_sending() -> None:
    assert line() == "0 queued, 0 sending 0.0 kB/s, 0 failed"


def test_with_several_files_going_out_names_the_one_with_most_left() -> None:
    status = line(sending=3, on_wire=[("/o/a.log", 90, 100), ("/o/big.iso", 5 << 30, 8 << 30),
                                      ("/o/c.log", 0, 10)])

    assert " big.iso 62% " in status


def test_a_slow_cap_reads_in_kilobytes() -> None:
    assert " 50.0 kB/s," in line(bytes_per_second=50e3)


def test_failures_and_paused_targets_are_counted() -> None:
    assert line(failed=2, paused=1).endswith(", 2 failed, 1 target(s) paused")


def test_an_empty_file_is_at_100_percent() -> None:
    assert " empty 100% " in line(sending=1, on_wire=[("/o/empty", 0, 0)])


def test_a_hostile_name_cannot_add_a_notification_field() -> None:
    # sd_notify fields are newline-separated: this name must not reach systemd as STOPPING=1.
    status = line(sending=1, on_wire=[("/o/x\nSTOPPING=1", 1, 2)])

    assert "\n" not in status
    assert " x\\nSTOPPING=1 50% " in status


def test_undecodable_bytes_and_long_names_stay_one_short_line() -> None:
    name = "\udcff" + "n" * 200 + ".csv"

    status = line(sending=1, on_wire=[(f"/o/{name}", 1, 2)])

    status.encode()  # the notify socket gets UTF-8: no surrogate may remain
    shown = status.split(" ")[4]
    assert len(shown) <= 40 and shown.startswith("\\xffn") and shown.endswith("n.csv"), shown
