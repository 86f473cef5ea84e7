"""The miners' Prometheus metrics: collectors over a live `WitnessMiner` and a `StorageServer`, read at scrape time.

Served by `carechain.health_http.HealthServer` when `miner.metrics_listen` is set (docs/metrics.md lists every
metric). The miner's counters are one `Counter` of plain names (`WitnessMiner.stats`): the collector sorts them
into families by what they count; the names come from code (refusal reasons are a closed enum), never from a
peer, so the label sets stay small.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from chain_miner.service import WitnessMiner
    from chain_miner.storage_server import StorageServer

__all__ = ["StorageServerCollector", "WitnessCollector", "miner_ready", "miner_registry", "storage_registry"]

_REFUSED = "refused_"
_ACCESS = "access_"
_EVIDENCE = {"evidence_published": "published", "evidence_unsent": "unsent", "evidence_shrunk": "shrunk",
             "void_evidence": "void"}
_FETCH = {"no_response", "bad_response", "unsigned_response", "rate_limited", "pages", "tile_fetches",
          "tiles_unavailable", "tiles_refused", "no_replay", "bad_replay", "bad_leaves"}


class WitnessCollector(Collector):
    """Reads one running `WitnessMiner`: checkpoints judged, evidence, lag, re-encryptions, study and trial jobs."""

    def __init__(self, miner: WitnessMiner) -> None:
        self.miner = miner

    def collect(self) -> Iterator[Metric]:
        stats = dict(self.miner.stats)
        cosigned = CounterMetricFamily("carechain_miner_checkpoints_cosigned", "Checkpoints verified and cosigned")
        cosigned.add_metric([], stats.get("cosigned", 0))
        yield cosigned
        refused = CounterMetricFamily("carechain_miner_checkpoints_refused", "Checkpoints refused, by reason (fork, "
                                      "violation, bad proof, ...)", labels=["reason"])
        for name, n in sorted(stats.items()):
            if name.startswith(_REFUSED):
                refused.add_metric([name.removeprefix(_REFUSED)], n)
        yield refused
        evidence = CounterMetricFamily("carechain_miner_evidence", "Evidence against the log operator: published, "
                                       "unsent (too large; kept on disk), shrunk, void leaves reported",
                                       labels=["outcome"])
        for name, outcome in _EVIDENCE.items():
            evidence.add_metric([outcome], stats.get(name, 0))
        yield evidence
        fetch = CounterMetricFamily("carechain_miner_fetch_problems", "Proofs and entries the log or its tiles did "
                                    "not serve as asked, by kind", labels=["kind"])
        for name in sorted(_FETCH):
            fetch.add_metric([name], stats.get(name, 0))
        yield fetch
        access = CounterMetricFamily("carechain_miner_reencryptions", "Access grants served: released (re-encrypted "
                                     "for the requester), fragments, refusals by reason", labels=["outcome"])
        for name, n in sorted(stats.items()):
            if name.startswith(_ACCESS):
                access.add_metric([name.removeprefix(_ACCESS)], n)
        yield access
        yield from self._log()
        yield from _jobs("carechain_miner_study_jobs", "Study (MPC aggregation) work, by outcome",
                         self.miner.studies.stats if self.miner.studies is not None else None)
        yield from _jobs("carechain_miner_trial_jobs", "Trial labelling work, by outcome",
                         self.miner.trials.stats if self.miner.trials is not None else None)

    def _log(self) -> Iterator[Metric]:
        size = self.miner.witness.state.tree_size
        heard = max(self.miner.log_size, size)
        yield _gauge("carechain_miner_cosigned_size", "Tree size of the latest checkpoint this miner cosigned", size)
        yield _gauge("carechain_miner_log_size", "Largest tree size of a log-signed checkpoint this miner heard of",
                     heard)
        yield _gauge("carechain_miner_lag", "Leaves the log is ahead of what this miner cosigned", heard - size)
        yield _gauge("carechain_miner_broker_connected", "1 while connected to the MQTT broker",
                     1 if self.miner.connected.is_set() else 0)


class StorageServerCollector(Collector):
    """Reads one `StorageServer` (the storage miner process): shares held, requests answered, audits, errors."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        yield _gauge("carechain_storage_shares_held", "Shares stored on this miner's disk", self.server.store.count())
        requests = CounterMetricFamily("carechain_storage_requests", "Requests by operation (put, get, audit, "
                                       "delete) and errors (refused as malformed) or ignored", labels=["op"])
        for op, n in sorted(self.server.counters.items()):
            requests.add_metric([op], n)
        yield requests


def _jobs(name: str, doc: str, stats: Mapping[str, int] | None) -> Iterator[Metric]:
    if stats is None:
        return
    family = CounterMetricFamily(name, doc, labels=["outcome"])
    for outcome, n in sorted(dict(stats).items()):
        family.add_metric([outcome], n)
    yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def miner_ready(miner: WitnessMiner) -> tuple[bool, str]:
    """/readyz: ready while connected to the broker and judging checkpoints."""
    if not miner.alive():
        return False, "the checkpoint worker is not running"
    if not miner.connected.is_set():
        return False, f"not connected to broker {miner.broker.address}"
    return True, f"cosigned up to tree size {miner.witness.state.tree_size}"


def miner_registry(miner: WitnessMiner) -> CollectorRegistry:
    """A registry of its own holding this miner's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WitnessCollector(miner))
    return registry


def storage_registry(server: StorageServer) -> CollectorRegistry:
    """A registry of its own holding a storage server's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StorageServerCollector(server))
    return registry
