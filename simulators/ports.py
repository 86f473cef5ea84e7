"""Listening ports for the brokers, nodes and servers that tests, benchmarks and the demo start, outside the
kernel's ephemeral range.

A port from bind(("", 0)) lies in the ephemeral range, where every outgoing connection of the machine (an MQTT
client, an MPyC party dialling its peers) also takes its local port: a listener that binds such a port a moment
after it was probed can find it taken ("address already in use"), and two test processes probing at once can be
handed the same one. Ports below that range are never handed out on their own. Under pytest-xdist each worker
takes its ports from a slice of its own, so parallel workers never pick the same port; within one process
`free_port` walks its slice in turn, so two ports asked for one after another are never the same either.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
from pathlib import Path

__all__ = ["free_port", "free_ports", "listen_port_ranges"]

LOWEST = 20_000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _slice() -> tuple[int, int]:
    """[low, high) of the ports this process may hand out: below the ephemeral range, one slice per xdist worker."""
    low, high = LOWEST, _ephemeral_low()
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and workers.isdigit() and int(workers) > 0:
        width = (high - low) // int(workers)
        low += int(worker[2:]) * width
        high = low + width
    return low, high


def _free(port: int, host: str = "0.0.0.0") -> bool:  # MPyC listens on every interface
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_lock = threading.Lock()
_cursor: itertools.count[int] | None = None


def _next_candidate(low: int, high: int) -> int:
    global _cursor
    with _lock:
        if _cursor is None:  # a random start: two runs in a row (or a crashed one's leftovers) rarely meet
            _cursor = itertools.count(random.randrange(high - low))
        return low + next(_cursor) % (high - low)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that are free on `host` now, below the ephemeral range (see the module's doc).
    Falls back to ports the kernel picks when there is no room below that range (an unusual port range)."""
    low, high = _slice()
    if high - low < 16 * count:
        return _kernel_ports(count, host)
    ports: list[int] = []
    for _ in range(high - low):
        port = _next_candidate(low, high)
        if port not in ports and _free(port, host):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports on {host} between {low} and {high}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now, below the ephemeral range (see the module's doc)."""
    return free_ports(1, host)[0]


def _kernel_ports(count: int, host: str) -> list[int]:
    # Each probe stays bound until all are chosen: probes one after another may be handed the same port twice.
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def listen_port_ranges(n: int, span: int, rng: random.Random | None = None) -> list[int]:
    """n base ports, each the first of `span` ports that are free now, disjoint, all below the ephemeral range
    (in this xdist worker's slice). RuntimeError when they cannot be found (a machine whose low ports are taken)."""
    rng = rng or random.Random()
    low, high = _slice()
    high -= span
    if high <= low:
        raise RuntimeError(f"no room below the ephemeral port range ({_ephemeral_low()}) for ranges of {span} ports")
    bases: list[int] = []
    for _ in range(200 * n):
        base = rng.randrange(low, high)
        if any(abs(base - b) < span for b in bases):
            continue
        if all(_free(p) for p in range(base, base + span)):
            bases.append(base)
            if len(bases) == n:
                return bases
    raise RuntimeError(f"could not find {n} free ranges of {span} ports between {low} and {high + span}")
