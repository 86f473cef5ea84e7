"""The agent's sans-IO send window when one device's MQTT client is down: its rows wait, the others flow."""

from __future__ import annotations

from edge_agent.outbox import Pending
from edge_agent.window import SendWindow


class Rows:
    """An outbox stand-in with the same paging contract as Outbox.pending_after (rows by increasing id)."""

    def __init__(self, devices: list[str]) -> None:
        self.rows = [Pending(i + 1, d, i, b"") for i, d in enumerate(devices)]

    def pending_after(self, row_id: int, limit: int) -> list[Pending]:
        return [r for r in self.rows if r.row_id > row_id][:limit]

    def ack(self, sent: list[Pending], window: SendWindow) -> None:
        for r in sent:
            self.rows.remove(r)
            window.settled((r.device_id, r.seq))


def ids(rows: list[Pending]) -> list[int]:
    return [r.row_id for r in rows]


def test_a_disconnected_devices_backlog_does_not_hold_up_the_others() -> None:
    outbox = Rows(["b"] * 300 + ["a"] * 5)  # b's large backlog comes first
    w = SendWindow(size=10, resend_after_ms=10_000)
    up = {"a"}
    sent = w.due(outbox.pending_after, 0, eligible=up.__contains__)
    assert [r.device_id for r in sent] == ["a"] * 5  # b's rows were skipped, not counted against the window
    assert w.due(outbox.pending_after, 1, eligible=up.__contains__) == []  # nothing resent early, no rescans
    outbox.ack(sent, w)
    up.add("b")
    w.resume("b")
    resumed = w.due(outbox.pending_after, 2, eligible=up.__contains__)
    assert ids(resumed) == list(range(1, 11))  # b from its oldest row, within the window


def test_a_device_that_drops_mid_flight_gets_its_rows_again_when_it_returns() -> None:
    outbox = Rows(["a", "b", "a", "b", "a", "b"])
    w = SendWindow(size=100, resend_after_ms=50)
    up = {"a", "b"}
    first = w.due(outbox.pending_after, 0, eligible=up.__contains__)
    assert ids(first) == [1, 2, 3, 4, 5, 6]
    outbox.ack([r for r in first if r.device_id == "a"], w)
    up.discard("b")  # b's three sends were lost with its connection
    assert w.due(outbox.pending_after, 100, eligible=up.__contains__) == []  # expired, but b is down: parked
    up.add("b")
    w.resume("b")
    assert ids(w.due(outbox.pending_after, 101, eligible=up.__contains__)) == [2, 4, 6]


def test_a_row_refused_by_a_device_that_just_went_down_waits_for_it() -> None:
    outbox = Rows(["a", "b", "a"])
    w = SendWindow(size=10, resend_after_ms=10_000)
    up = {"a", "b"}
    sent = w.due(outbox.pending_after, 0, eligible=up.__contains__)
    w.unsent(sent[1])  # the publish of b's row failed: its client had just disconnected
    up.discard("b")
    assert w.due(outbox.pending_after, 1, eligible=up.__contains__) == []
    up.add("b")
    w.resume("b")
    assert ids(w.due(outbox.pending_after, 2, eligible=up.__contains__)) == [2]


def test_without_a_predicate_every_row_is_due_as_before() -> None:
    outbox = Rows(["a", "b"])
    assert ids(SendWindow(size=10, resend_after_ms=1).due(outbox.pending_after, 0)) == [1, 2]
