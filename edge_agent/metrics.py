"""The edge agent's Prometheus metrics: a collector over the live `Agent`, read at scrape time.

Served by `carechain.health_http.HealthServer` when `agent.metrics_listen` is set (docs/metrics.md lists every
metric). The outbox is read through a connection of the collector's own, read-only: the agent's connections
belong to its event loop, and a scrape must never run a statement inside one of the loop's transactions.
Per-device series are fine here: an agent runs the handful of devices of its config, never a fleet.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from edge_agent.agent import Agent

__all__ = ["AgentCollector", "agent_ready", "agent_registry"]

# AgentStats counter -> (exported as carechain_agent_<name>_total, what it counts).
_COUNTERS = {
    "signed": ("events_signed", "Readings signed and stored in the outbox"),
    "sent": ("events_sent", "Events published (a resend counts again)"),
    "messages": ("messages_sent", "MQTT messages the events went in (batches hold several)"),
    "acked": ("events_receipted", "Events deleted from the outbox on a signed receipt"),
    "resent": ("events_resent", "Events due again after resend_after_s without a receipt"),
    "final": ("events_final", "Receipted events a final checkpoint has covered"),
    "quarantined": ("events_quarantined", "Events the bridge refused for good, kept in quarantine"),
    "rejected_retryable": ("events_deferred", "Refusals the bridge asked to retry later"),
    "resigned": ("events_resigned", "Readings re-signed past the highest anchored seq after a seq_reused refusal"),
    "refused_quota": ("readings_lost_quota", "Readings not stored: the outbox quota was reached"),
    "refused_disk": ("readings_lost_disk_full", "Readings not stored: the outbox's disk was full"),
    "storage_errors": ("storage_errors", "Outbox writes the disk refused"),
    "bad_receipts": ("bad_receipts", "Receipts ignored: not signed by the bridge's key, or malformed"),
    "receipt_mismatches": ("receipt_mismatches", "ok receipts naming other bytes than ours (another holder of the "
                           "device key: an alarm)"),
}


class _OutboxReader:
    """COUNT(*) of the outbox over a read-only connection of its own, opened at the first scrape."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def depth(self) -> int | None:
        with self._lock:
            try:
                if self._db is None:
                    self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=2,
                                               check_same_thread=False)
                return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            except sqlite3.Error:
                return None  # busy or being replaced: this scrape goes without it


class AgentCollector(Collector):
    """Reads one running `Agent`: its counters, its outbox depth, its devices' links and receipts."""

    def __init__(self, agent: Agent, clock: Callable[[], float] = time.time) -> None:
        self.agent = agent
        self._clock = clock
        self._outbox = _OutboxReader(agent.outbox.path)

    def collect(self) -> Iterator[Metric]:
        stats = self.agent.stats  # plain ints, written by the agent's event loop: each read is whole
        for field_name, (name, doc) in _COUNTERS.items():
            family = CounterMetricFamily(f"carechain_agent_{name}", doc)
            family.add_metric([], getattr(stats, field_name))
            yield family
        refused = CounterMetricFamily("carechain_agent_refusals", "Refusals in the bridge's receipts, by reason",
                                      labels=["reason"])
        for reason, n in sorted(dict(stats.reasons).items()):  # one copy (atomic) of a dict the loop adds to
            refused.add_metric([reason], n)
        yield refused
        depth = self._outbox.depth()
        if depth is not None:
            outbox = GaugeMetricFamily("carechain_agent_outbox_depth", "Events stored and not yet receipted")
            outbox.add_metric([], depth)
            yield outbox
        yield from self._devices()

    def _devices(self) -> Iterator[Metric]:
        connected = self.agent.connected
        last = dict(getattr(self.agent, "last_receipt_ms", {}))
        link = GaugeMetricFamily("carechain_agent_link_up", "1 while the device's MQTT client is connected",
                                 labels=["device"])
        age = GaugeMetricFamily("carechain_agent_last_receipt_age_seconds", "Seconds since the device's latest "
                                "valid receipt (absent until the first one)", labels=["device"])
        now = self._clock()
        for device in sorted(self.agent.devices):
            link.add_metric([device], 1 if device in connected else 0)
            if device in last:
                age.add_metric([device], max(0.0, now - last[device] / 1000))
        yield link
        yield age


def agent_ready(agent: Agent) -> tuple[bool, str]:
    """/readyz: ready when every device's MQTT client is connected (events flow, receipts can come back)."""
    down = sorted(set(agent.devices) - agent.connected)
    if not agent.devices:
        return False, "no devices configured"
    if down:
        return False, f"{len(down)} of {len(agent.devices)} device link(s) down: {', '.join(down[:5])}"
    return True, f"{len(agent.devices)} device link(s) up"


def agent_registry(agent: Agent) -> CollectorRegistry:
    """A registry of its own holding this agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry
