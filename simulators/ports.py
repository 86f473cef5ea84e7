"""Listening ports for processes that bind later (the miners' MPC parties), outside the kernel's ephemeral range.

A port from bind(("", 0)) lies in the ephemeral range, where every outgoing connection of the machine (an MQTT
client, an MPyC party dialling its peers) also takes its local port: a listener that binds such a port seconds
later can find it taken ("address already in use"). Ports below that range are never handed out on their own.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["listen_port_ranges"]

LOWEST = 20_000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # MPyC listens on every interface
        except OSError:
            return False
    return True


def listen_port_ranges(n: int, span: int, rng: random.Random | None = None) -> list[int]:
    """n base ports, each the first of `span` ports that are free now, disjoint, all below the ephemeral range.
    RuntimeError when they cannot be found (a machine whose low ports are all taken)."""
    rng = rng or random.Random()
    high = _ephemeral_low() - span
    if high <= LOWEST:
        raise RuntimeError(f"no room below the ephemeral port range ({_ephemeral_low()}) for ranges of {span} ports")
    bases: list[int] = []
    for _ in range(200 * n):
        base = rng.randrange(LOWEST, high)
        if any(abs(base - b) < span for b in bases):
            continue
        if all(_free(p) for p in range(base, base + span)):
            bases.append(base)
            if len(bases) == n:
                return bases
    raise RuntimeError(f"could not find {n} free ranges of {span} ports between {LOWEST} and {high + span}")
