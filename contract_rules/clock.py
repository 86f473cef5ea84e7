"""Attested time: the clock time-based rules judge on (a library for rule modules, not a rule module).

Rules may not read the wall clock (every replica must reach the same state), and a terminal's or a
party's own `ts` is only its claim: a pharmacy could backdate a sale into an expired prescription's
validity. So the bridge attests the time on the ledger itself, with operator-signed `clock.attest`
entries (each later than the one before; the core runtime keeps the latest in table `clock`, key "now",
as {"ms", "at": leaf index}), and rules judge on that. The bridge's contract gate appends one before a
sale whenever the attested time is more than a second old, so a sale is judged on a time at most about a
second before it landed; a sale whose own `ts` is further than `MAX_SALE_SKEW_MS` from it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runtime imports this module for its `clock.attest` core entry
    from contract_rules.runtime import State

CLOCK_TABLE = "clock"
NOW = "now"
MAX_SALE_SKEW_MS = 300_000  # five minutes: a terminal's clock may drift, a sale may sit in its outbox briefly


def attested_ms(state: State) -> int | None:
    """The latest attested time (ms since the epoch), or None before the first `clock.attest`."""
    now = state.table(CLOCK_TABLE).get(NOW)
    return None if now is None else int(now["ms"])


def sale_time_problem(state: State, ts: int) -> str | None:
    """Why a sale stamped `ts` cannot be judged on the attested time, or None: "no_attested_time" before
    any attestation, "sale_time_skew" when `ts` is more than MAX_SALE_SKEW_MS from it."""
    now = attested_ms(state)
    if now is None:
        return "no_attested_time"
    if abs(ts - now) > MAX_SALE_SKEW_MS:
        return "sale_time_skew"
    return None
