"""Listener ports for the brokers and servers tests start: below the ephemeral range, one slice per xdist worker."""

from __future__ import annotations

import socket

import pytest

from simulators import ports


def test_ports_lie_below_the_ephemeral_range_are_distinct_and_free() -> None:
    got = ports.free_ports(8)
    assert len(set(got)) == 8
    assert all(ports.LOWEST <= p < ports._ephemeral_low() for p in got)
    for p in got:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free: a listener can bind it


def test_two_ports_asked_for_one_after_another_differ() -> None:
    """Neither is bound yet when the second is chosen (a broker and a proxy in front of it, say)."""
    assert len({ports.free_port() for _ in range(50)}) == 50


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(ports, "_slice", lambda: (taken, taken + 20))
        assert taken not in ports.free_ports(19)


@pytest.mark.parametrize(("worker", "low", "high"), [("gw0", 20_000, 26_000), ("gw1", 26_000, 32_000)])
def test_each_xdist_worker_has_a_slice_of_its_own(monkeypatch: pytest.MonkeyPatch, worker: str, low: int,
                                                  high: int) -> None:
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 32_000)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert ports._slice() == (low, high)
    assert all(low <= p < high for p in ports.free_ports(5))
    assert all(low <= b and b + 4 <= high for b in ports.listen_port_ranges(3, 4))


def test_without_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: ports.LOWEST + 10)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    got = ports.free_ports(3)
    assert len(set(got)) == 3
