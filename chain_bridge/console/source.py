"""What the console reads from the running bridge, behind one small interface (`ConsoleSource`).

The pages read ledger metadata through their own connection (`LedgerScan`); from the bridge process they read
only counters and a few live facts: its stats, the latest final checkpoint, readiness, and — when the bridge
has them — sign-to-receipt latency, the agents' status reports and the contracts' bonds. Each optional fact
is None when absent, and the page shows "—".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from chain_bridge.ledger.sql import StoreLocation

if TYPE_CHECKING:
    from chain_bridge.bridge import Bridge


@dataclass(frozen=True)
class AgentStatus:
    """An agent's latest report for one device: outbox depth and battery (no reading)."""

    outbox_depth: int
    battery_pct: int | None
    reported_ms: int


@dataclass(frozen=True)
class Bond:
    party: str  # the party id as the contracts key it
    amount: int  # minor units
    offences: tuple[str, ...]
    suspended: bool


@dataclass(frozen=True)
class TokenAccount:
    account: str  # "<role>:<id>" as the token contracts key it (contract_rules.tokens)
    balance: int  # minor units
    allocated: int  # its genesis allocation


class ConsoleSource(Protocol):
    """The live facts of one bridge the console shows."""

    @property
    def location(self) -> StoreLocation:
        """Where the ledger is: the console opens its own read-only connection there."""

    def stats(self) -> dict[str, object]:
        """The bridge's counters (`BridgeStats.as_dict()`)."""

    def final_size(self) -> int:
        """Tree size of the newest checkpoint known final (-1: none yet)."""

    def not_ready(self) -> str | None:
        """None when the bridge is subscribed and ingesting; else why not (for /readyz)."""

    def latency(self, seconds: float) -> tuple[int, float | None, float | None] | None:
        """(count, p50 ms, p99 ms) of sign→receipt latency over the last `seconds`; None if not measured."""

    def agent_status(self) -> dict[str, AgentStatus] | None:
        """device id → the latest status its agent reported; None if the bridge takes no status reports."""

    def bonds(self) -> list[Bond] | None:
        """The contracts' bonds (with slashes); None without contracts."""

    def token_accounts(self) -> list[TokenAccount] | None:
        """Every token account with a balance or a genesis allocation; None without contracts."""


class BridgeSource:
    """A `ConsoleSource` over a `Bridge` in this process (`carechain bridge`, the demo)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    @property
    def location(self) -> StoreLocation:
        return self.bridge.ledger.location

    def stats(self) -> dict[str, object]:
        return self.bridge.stats.as_dict()

    def final_size(self) -> int:
        return self.bridge.final_size()

    def not_ready(self) -> str | None:
        if not self.bridge.wait_ready(0):
            return ("the bridge is not subscribed to the broker (starting, stopped, or the broker is unreachable): "
                    "see its log")
        return None

    def latency(self, seconds: float) -> tuple[int, float | None, float | None] | None:
        window = getattr(self.bridge.stats, "latency", None)  # chain_bridge.metrics.LatencyWindow, when present
        if window is None:
            return None
        count, p50, p99 = window.recent(seconds)
        return int(count), p50, p99

    def agent_status(self) -> dict[str, AgentStatus] | None:
        book = getattr(self.bridge, "device_status", None)  # chain_bridge.status_intake.DeviceStatusBook
        if book is None:
            return None
        return {device: AgentStatus(int(s.outbox_depth), s.battery_pct, int(s.reported_ms))
                for device, s in book.snapshot().items()}

    def bonds(self) -> list[Bond] | None:
        gate = self.bridge.contracts
        if gate is None:
            return None
        # The sequencer mutates the contract state under the ledger lock: copy the small bonds table under it.
        with self.bridge.ledger_lock:
            table = dict(gate.state.table("bonds"))
        bonds = []
        for party, record in sorted(table.items()):
            if not isinstance(record, dict):
                continue
            offences = tuple(str(o[1]) for o in record.get("offences") or [] if isinstance(o, list) and len(o) > 1)
            bonds.append(Bond(party, int(record.get("amount") or 0), offences,
                              record.get("suspended_at") is not None))
        return bonds

    def token_accounts(self) -> list[TokenAccount] | None:
        gate = self.bridge.contracts
        if gate is None:
            return None
        with self.bridge.ledger_lock:  # the sequencer applies transfers under it
            balances = dict(gate.state.balances)
        allocated = dict(gate.genesis.allocations)
        return [TokenAccount(a, balances.get(a, 0), allocated.get(a, 0)) for a in sorted({*balances, *allocated})]
