"""Crash points for the fault-injection suite (tests/test_faults.py, bench/fault_table.py).

`CARECHAIN_CRASH_AT=<point>:<n>` makes the process kill itself with SIGKILL — no cleanup, no flush,
exactly like `kill -9` or a power cut — the n-th time it reaches `<point>`. This is how the suite hits
windows too narrow to aim at from outside, such as "the batch is committed but no receipt is out".
Unset (always, in production) a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("CARECHAIN_CRASH_AT", "")
_point, _, _count = _spec.partition(":")
_remaining = {_point: int(_count or 1)} if _point else {}


def crash_point(name: str) -> None:
    if name in _remaining:
        _remaining[name] -= 1
        if _remaining[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
