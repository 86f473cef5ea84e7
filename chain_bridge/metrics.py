"""The bridge's Prometheus metrics: a collector over the live `Bridge`, and sign→receipt latency.

`BridgeCollector` reads the bridge's counters (`BridgeStats`) at scrape time, so nothing on the ingest path
pays for metrics but one latency observation per batch. `bridge_metrics_app(bridge)` is the ASGI app the
console mounts at /metrics; each bridge gets its own `CollectorRegistry` (never the process-global one), so
several bridges in one process (tests, the demo) each export their own. Every metric is described in
docs/metrics.md; the names are part of the interface (dashboards and alerts use them).

Cardinality is bounded by construction: rejection reasons are a closed set (`carechain.errors.Reason`, plus
contract rules), miners are the active miner set on the ledger (capped), and device outboxes are exported as
sum and max, never one series per device.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from carechain.identity import device_id_for

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from chain_bridge.bridge import Bridge

__all__ = ["BridgeCollector", "LatencyWindow", "bridge_metrics_app", "bridge_registry"]

# Sign→receipt latency buckets, in seconds: a live device is receipted in well under a second; a device that
# was offline delivers its outbox minutes or hours later, which the top buckets keep apart from "slow".
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, math.inf)
# The recent window keeps one bucket per second for this long: `recent(seconds)` looks back at most this far.
WINDOW_HORIZON_S = 300
# Percentiles of the recent window come from log-spaced bins 5 % wide: memory per second is bounded by the
# number of distinct bins (a few dozen), not by the event rate, at the price of a 5 % rounding.
_BUCKETS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)  # bisect_left: a latency equal to a bound counts in it
_BIN_RATIO = 1.05
_LOG_RATIO = math.log(_BIN_RATIO)
# Miners exported by id: the active set comes from the ledger, this caps a misconfigured one.
MAX_MINER_SERIES = 256


class LatencyWindow:
    """Sign→receipt latency (device event `ts` → durable commit) of anchored events.

    Keeps a Prometheus histogram (cumulative, for rates and quantiles in PromQL) and a bounded window of the
    last WINDOW_HORIZON_S seconds for the console's p50/p99 without Prometheus. Thread-safe: the sequencer
    observes, scrapes and the console read.
    """

    def __init__(self, horizon_s: int = WINDOW_HORIZON_S) -> None:
        # The histogram's buckets are counted here, not by prometheus_client's Histogram: its observe() takes a
        # lock and scans the buckets per call, a few µs per event on the sequencer thread at 10k+ events/s.
        self._bucket_counts = [0] * len(LATENCY_BUCKETS_S)  # per bucket (not cumulative); the last is +Inf
        self._sum_s = 0.0
        self.horizon_s = horizon_s
        self._seconds: deque[tuple[int, dict[int, int]]] = deque()  # (whole second, bin -> count), oldest first
        self._lock = threading.Lock()

    def observe_many(self, latencies_ms: Iterable[float], now: float) -> None:
        """Record latencies (ms; negative ones, from a device clock ahead of ours, count as 0) observed at
        monotonic time `now` (seconds)."""
        second = int(now)
        with self._lock:
            if not self._seconds or self._seconds[-1][0] != second:
                self._seconds.append((second, {}))
                while self._seconds and self._seconds[0][0] <= second - self.horizon_s:
                    self._seconds.popleft()
            bins = self._seconds[-1][1]
            counts = self._bucket_counts
            total = 0.0
            for ms in latencies_ms:
                ms = max(0.0, ms)
                total += ms
                counts[bisect_left(_BUCKETS_MS, ms)] += 1
                b = _bin(ms)
                bins[b] = bins.get(b, 0) + 1
            self._sum_s += total / 1000

    def recent(self, seconds: float = 60, now: float | None = None) -> tuple[int, float | None, float | None]:
        """(count, p50 ms, p99 ms) of the latencies observed in the last `seconds` (at most the horizon);
        percentiles are None when nothing was observed, and rounded up to the 5 % bin they fall in."""
        now = time.monotonic() if now is None else now
        since = now - min(seconds, self.horizon_s)
        merged: dict[int, int] = {}
        with self._lock:
            for second, bins in self._seconds:
                if second + 1 > since:
                    for b, n in bins.items():
                        merged[b] = merged.get(b, 0) + n
        count = sum(merged.values())
        if count == 0:
            return 0, None, None
        return count, _percentile(merged, count, 0.50), _percentile(merged, count, 0.99)

    @property
    def count(self) -> int:
        """Latencies observed since start (the histogram's count)."""
        with self._lock:
            return sum(self._bucket_counts)

    def histogram(self) -> HistogramMetricFamily:
        """`carechain_bridge_event_latency_seconds`, cumulative since start, as Prometheus reads a histogram."""
        with self._lock:
            counts, total = list(self._bucket_counts), self._sum_s
        family = HistogramMetricFamily("carechain_bridge_event_latency_seconds", "Device event time to durable "
                                       "commit (sign to receipt), per anchored event")
        cumulative = list(accumulate(counts))
        family.add_metric([], [(_le(b), n) for b, n in zip(LATENCY_BUCKETS_S, cumulative, strict=True)],
                          sum_value=total)
        return family


def _le(bound_s: float) -> str:
    return "+Inf" if math.isinf(bound_s) else repr(float(bound_s))


def _bin(ms: float) -> int:
    return 0 if ms <= 1.0 else math.ceil(math.log(ms) / _LOG_RATIO)


def _percentile(bins: Mapping[int, int], count: int, q: float) -> float:
    rank = max(1, math.ceil(q * count))
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return round(_BIN_RATIO ** b if b else 1.0, 3)
    raise AssertionError("unreachable: rank <= count")


class BridgeCollector(Collector):
    """Reads one live `Bridge` at every scrape (its counters are plain ints and Counters: reading them from the
    scrape thread is safe; a scrape may see one batch half-counted, never a broken number)."""

    def __init__(self, bridge: Bridge, clock: Callable[[], float] = time.time) -> None:
        self.bridge = bridge
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        stats = self.bridge.stats
        yield from self._ingest(stats)
        yield from self._log(stats)
        yield from self._miners(stats)
        yield from self._devices()
        yield from self._storage(stats)
        yield from self._access(stats)
        yield stats.latency.histogram()

    def _ingest(self, stats: Any) -> Iterator[Metric]:
        received = CounterMetricFamily("carechain_bridge_events_received", "Events taken off the broker and checked")
        received.add_metric([], stats.received)
        yield received
        by_reason = dict(stats.rejected)  # one copy (atomic): the sequencer adds reasons while we read
        events = CounterMetricFamily("carechain_bridge_events", "Events by outcome: anchored (new leaf), duplicate "
                                     "(re-acknowledged resend), rejected (refused with a reason)", labels=["outcome"])
        events.add_metric(["anchored"], stats.anchored)
        events.add_metric(["duplicate"], stats.duplicates)
        events.add_metric(["rejected"], sum(by_reason.values()))
        yield events
        rejected = CounterMetricFamily("carechain_bridge_events_rejected", "Refused events by reason",
                                       labels=["reason"])
        for reason, n in sorted(by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield _counter("carechain_bridge_receipts_withheld", "Refusals of unregistered ids not receipted (over the "
                       "unregistered-receipt budget)", stats.unreceipted)
        yield _counter("carechain_bridge_batches", "Batches committed (one transaction each)", stats.batches)
        yield _counter("carechain_bridge_storage_errors", "Ledger writes that failed (disk full, I/O, database down) "
                       "and were retried", stats.storage_errors)
        leader = GaugeMetricFamily("carechain_bridge_leader", "1 while this bridge holds the leader duties "
                                   "(checkpoints, finality), 0 on an ingest host")
        leader.add_metric([], 1 if self.bridge.leading.is_set() else 0)
        yield leader
        connected = GaugeMetricFamily("carechain_bridge_broker_connected", "1 while connected to the MQTT broker")
        connected.add_metric([], 1 if self.bridge.connected.is_set() else 0)
        yield connected

    def _log(self, stats: Any) -> Iterator[Metric]:
        yield _gauge("carechain_bridge_tree_size", "Leaves in the log", stats.tree_size)
        yield _counter("carechain_bridge_checkpoints_issued", "Checkpoints this bridge signed since it started",
                       stats.checkpoints_issued)
        yield _counter("carechain_bridge_final_checkpoints", "Checkpoints that became final (cosigned by a "
                       "majority of the active miners) since start", stats.final_checkpoints)
        if stats.checkpoint_size >= 0:
            yield _gauge("carechain_bridge_checkpoint_size", "Tree size of the latest checkpoint this bridge issued",
                         stats.checkpoint_size)
        if stats.checkpoint_ms is not None:
            yield _gauge("carechain_bridge_checkpoint_age_seconds", "Seconds since this bridge issued its latest "
                         "checkpoint (grows on an idle log too: alert with tree_size > checkpoint_size)",
                         max(0.0, self._clock() - stats.checkpoint_ms / 1000))
        final = self.bridge.final_size()
        if final >= 0:
            yield _gauge("carechain_bridge_final_size", "Tree size of the latest final checkpoint", final)
            yield _gauge("carechain_bridge_finality_lag", "Leaves not yet covered by a final checkpoint "
                         "(tree size - final size)", max(0, stats.tree_size - final))

    def _miners(self, stats: Any) -> Iterator[Metric]:
        finality = self.bridge.finality
        policy = finality.policy if finality is not None else None
        if policy is None:
            return
        active = GaugeMetricFamily("carechain_bridge_active_miners", "Miners whose cosignatures count (the ledger's "
                                   "active set, or bridge.miners without contracts)")
        active.add_metric([], len(policy.cosigners))
        yield active
        threshold = GaugeMetricFamily("carechain_bridge_finality_threshold", "Cosignatures that make a checkpoint "
                                      "final")
        threshold.add_metric([], policy.threshold)
        yield threshold
        lag = GaugeMetricFamily("carechain_bridge_cosignature_lag", "Leaves between the tree size and the largest "
                                "checkpoint this miner cosigned since the bridge started (the whole tree when it "
                                "has cosigned none)", labels=["miner"])
        cosigned = dict(stats.cosigned)
        for cosigner in policy.cosigners[:MAX_MINER_SERIES]:
            miner = device_id_for(cosigner.public_key)
            lag.add_metric([miner], max(0, stats.tree_size - cosigned.get(miner, 0)))
        yield lag

    def _devices(self) -> Iterator[Metric]:
        # The devices' own status reports (outbox depth), when this bridge receives them.
        status = getattr(self.bridge, "device_status", None)
        if status is None:
            return
        reports = status.snapshot()
        depths = [int(r.outbox_depth) for r in reports.values() if r.outbox_depth is not None]
        yield _gauge("carechain_bridge_devices_reporting", "Devices whose status report the bridge holds",
                     len(reports))
        yield _gauge("carechain_bridge_device_outbox_depth_sum", "Events waiting in the devices' outboxes, summed "
                     "over the devices' latest reports", sum(depths))
        yield _gauge("carechain_bridge_device_outbox_depth_max", "The deepest device outbox in the latest reports",
                     max(depths, default=0))
        reported = [int(r.reported_ms) for r in reports.values() if r.reported_ms is not None]
        if reported:
            yield _gauge("carechain_bridge_device_report_age_seconds_max", "Age of the oldest latest status report "
                         "(a device that stopped reporting)", max(0.0, self._clock() - min(reported) / 1000))

    def _storage(self, stats: Any) -> Iterator[Metric]:
        archive = CounterMetricFamily("carechain_bridge_archive", "Archiver steps: epochs planned, archives "
                                      "uploaded, committed on the ledger, pruned here, failures", labels=["step"])
        for step, n in sorted(dict(stats.archive).items()):
            archive.add_metric([step], n)
        yield archive
        archiver = self.bridge.archiver
        fetcher = getattr(archiver, "fetcher", None) if archiver is not None else None
        fetched = getattr(fetcher, "stats", None)
        if fetched is not None:
            reads = CounterMetricFamily("carechain_bridge_archive_reads", "Archived ciphertexts read back from the "
                                        "storage miners: fetched, unavailable, mismatch (failed its anchored hash)",
                                        labels=["outcome"])
            for outcome, n in sorted(dict(fetched).items()):
                reads.add_metric([outcome], n)
            yield reads
        anchors = CounterMetricFamily("carechain_bridge_anchors", "Checkpoint roots anchored on the external chain, "
                                      "by step", labels=["step"])
        for step, n in sorted(dict(stats.anchors).items()):
            anchors.add_metric([step], n)
        yield anchors

    def _access(self, stats: Any) -> Iterator[Metric]:
        records = CounterMetricFamily("carechain_bridge_record_requests", "Sealed-record requests: answered, "
                                      "pages sent, refusals by reason", labels=["outcome"])
        for outcome, n in sorted(dict(stats.records).items()):
            records.add_metric([outcome], n)
        yield records
        evidence = CounterMetricFamily("carechain_bridge_access_evidence", "Requesters' evidence against miners "
                                       "(access.fault): appended, refusals", labels=["outcome"])
        for outcome, n in sorted(dict(stats.evidence).items()):
            evidence.add_metric([str(outcome)], n)
        yield evidence


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def bridge_registry(bridge: Bridge) -> CollectorRegistry:
    """A registry of its own holding this bridge's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(bridge))
    return registry


def bridge_metrics_app(bridge: Bridge) -> Callable[..., Any]:
    """The ASGI app serving this bridge's metrics in the Prometheus text format (mount it at /metrics)."""
    return make_asgi_app(bridge_registry(bridge))
