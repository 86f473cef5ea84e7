"""The bridge's /metrics over a real broker: counters equal the bridge's JSON and the ledger, rejections by reason,
one latency observation per anchored event, a miner's cosignature lag and the finality lag; the sample Grafana
dashboard asks only for metrics a real scrape has."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from carechain import envelope, topics
from carechain.config import BridgeConfig, Limits, MinerKey
from carechain.events import make_payload
from carechain.health_http import HealthServer
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.ledger.store import Ledger
from chain_bridge.metrics import LatencyWindow, bridge_metrics_app, bridge_registry
from chain_miner.service import WitnessMiner
from tests.test_pipeline import register

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "docs" / "grafana" / "carechain.json"
GOOD_EVENTS = 6


@dataclass
class Status:
    """What chain_bridge.device_status reports per device (the fields the collector reads)."""

    device_id: str
    outbox_depth: int
    battery_pct: int | None
    reported_ms: int


class StatusBoard:
    def __init__(self, reports: dict[str, Status]) -> None:
        self.reports = reports

    def snapshot(self) -> dict[str, Status]:
        return dict(self.reports)


def wait_for(cond: Callable[[], bool], what: Callable[[], str] | str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from a Prometheus text page, parsed by prometheus_client's parser."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {samples.get(name)}"
    return matches[0]


@pytest.fixture
def world(tmp_path: Path, broker) -> Iterator[tuple[Bridge, WitnessMiner, HealthServer]]:
    log_key, miner_key = Identity.generate(), Identity.generate()
    cfg = BridgeConfig(data_dir=tmp_path / "bridge", checkpoint_interval_s=0.2, limits=Limits(max_event_bytes=2048),
                       miners=[MinerKey(name=f"carechain.miner/{miner_key.device_id}",
                                        public_key=miner_key.public_key.hex())], finality_threshold=1)
    bridge = Bridge(cfg, broker.config, log_key, Ledger(tmp_path / "bridge" / "ledger.db"),
                    client_id=f"bridge-{tmp_path.name}")
    miner = WitnessMiner(tmp_path / "miner", broker.config, log_key.public_key, miner_key, request_timeout_s=5)
    server = HealthServer("127.0.0.1", 0, bridge_registry(bridge), lambda: (True, "bridge"))
    bridge.start()
    try:
        assert bridge.wait_ready(30)
        miner.start()
        assert miner.connected.wait(30)
        server.start()
        yield bridge, miner, server
    finally:
        server.stop()
        miner.stop()
        bridge.stop()


def send_events(bridge: Bridge, broker) -> None:
    device, rogue = Identity.generate(), Identity.generate()
    register(bridge.ledger, [device])
    now = int(time.time() * 1000)
    events = [envelope.sign(device, make_payload(device.device_id, seq, now - 1500, "heart_rate", {"bpm": 60 + seq}))
              for seq in range(GOOD_EVENTS)]
    forged = envelope.sign(rogue, make_payload(device.device_id, GOOD_EVENTS, now, "heart_rate", {"bpm": 71}),
                           kid=device.device_id)
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        for raw in [*events, forged, events[0], b"\xde\xad\xbe\xef"]:  # + a bad signature, a resend, garbage
            pub.publish(topics.events(device.device_id), raw, qos=1).wait_for_publish(5)
    finally:
        pub.disconnect()
        pub.loop_stop()
    wait_for(lambda: bridge.stats.anchored == GOOD_EVENTS and bridge.stats.duplicates == 1
             and sum(bridge.stats.rejected.values()) == 2, lambda: json.dumps(bridge.stats.as_dict()))


def test_bridge_metrics_match_its_counters_the_ledger_and_the_miners_cosignatures(world, broker) -> None:
    bridge, miner, server = world
    send_events(bridge, broker)
    url = f"http://{server.address}/metrics"
    # The miner cosigns the checkpoint covering everything: its lag, and the finality lag, drop to 0.
    wait_for(lambda: bridge.final_size() == bridge.ledger.size == bridge.stats.checkpoint_size,
             lambda: f"final {bridge.final_size()} of {bridge.ledger.size}")
    wait_for(lambda: value(scrape(url), "carechain_bridge_cosignature_lag", miner=miner.id) == 0,
             "the miner's cosignature lag to reach 0")
    samples = scrape(url)
    stats = bridge.stats.as_dict()
    reader = Ledger(bridge.ledger.path)
    try:
        events_in_ledger, tree_size = reader.count_events(), reader.size
    finally:
        reader.close()

    assert value(samples, "carechain_bridge_events_total", outcome="anchored") == stats["anchored"] == \
        events_in_ledger == GOOD_EVENTS
    assert value(samples, "carechain_bridge_events_total", outcome="duplicate") == stats["duplicates"] == 1
    assert value(samples, "carechain_bridge_events_total", outcome="rejected") == stats["rejected"] == 2
    assert value(samples, "carechain_bridge_events_rejected_total", reason="bad_signature") == 1
    assert value(samples, "carechain_bridge_events_rejected_total", reason="malformed") == 1
    assert value(samples, "carechain_bridge_events_received_total") == stats["received"] == GOOD_EVENTS + 3
    assert value(samples, "carechain_bridge_tree_size") == tree_size
    assert value(samples, "carechain_bridge_finality_lag") == 0
    assert value(samples, "carechain_bridge_final_size") == tree_size
    assert value(samples, "carechain_bridge_active_miners") == 1
    assert value(samples, "carechain_bridge_checkpoint_age_seconds") >= 0
    # One latency observation per anchored event, never for a duplicate or a refusal; each event was signed
    # 1.5 s before it was sent, so none of them can land in a bucket below 1 s.
    assert value(samples, "carechain_bridge_event_latency_seconds_count") == GOOD_EVENTS
    assert value(samples, "carechain_bridge_event_latency_seconds_bucket", le="1.0") == 0
    count, p50, p99 = bridge.stats.latency.recent(60)
    assert count == GOOD_EVENTS and p50 is not None and p99 is not None and 1500 <= p50 <= p99
    assert stats["latency_ms_last_60s"]["count"] == GOOD_EVENTS

    # The same registry through the ASGI app the console mounts at /metrics.
    async def via_asgi() -> str:
        transport = httpx.ASGITransport(app=bridge_metrics_app(bridge))
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
            resp = await client.get("/metrics")
            assert resp.status_code == 200
            return resp.text

    text = asyncio.run(via_asgi())
    assert f'carechain_bridge_events_total{{outcome="anchored"}} {float(GOOD_EVENTS)}' in text


def test_device_outboxes_are_exported_as_sum_and_max_and_the_dashboard_asks_for_scraped_metrics(world, broker) -> None:
    bridge, _miner, server = world
    now = int(time.time() * 1000)
    bridge.device_status = StatusBoard({
        f"dev{i}": Status(f"dev{i}", depth, 80, now - 1000 * i) for i, depth in enumerate([3, 40, 0, 7])})
    send_events(bridge, broker)
    wait_for(lambda: bridge.final_size() == bridge.ledger.size, "a final checkpoint over the events")
    samples = scrape(f"http://{server.address}/metrics")
    assert value(samples, "carechain_bridge_device_outbox_depth_sum") == 50
    assert value(samples, "carechain_bridge_device_outbox_depth_max") == 40
    assert value(samples, "carechain_bridge_devices_reporting") == 4
    assert 3 <= value(samples, "carechain_bridge_device_report_age_seconds_max") < 3600
    assert not any("dev1" in str(labels) for series in samples.values() for labels, _ in series)  # no per-device

    with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=10) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    known = {f.name for f in families} | {f"{f.name}_total" for f in families if f.type == "counter"} | \
        {s.name for f in families for s in f.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels, "the dashboard has no panels"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            names = set(re.findall(r"\bcarechain_[a-z0-9_]+", expr))
            assert names, f"{panel['title']}: {expr}"
            missing = sorted(n for n in names if n not in known)
            assert not missing, f"panel {panel['title']!r} asks for {missing}, which no scrape has"


def test_the_latency_window_counts_exactly_and_forgets_what_is_older_than_asked() -> None:
    window = LatencyWindow(horizon_s=300)
    window.observe_many([10.0] * 98 + [2000.0, 5000.0], now=1000.2)
    window.observe_many([-50.0], now=1100.0)  # a device clock ahead of ours counts as 0 ms
    assert window.recent(60, now=1100.5) == (1, 1.0, 1.0)
    count, p50, p99 = window.recent(300, now=1100.5)
    assert count == 101 and p50 is not None and p99 is not None
    assert 10 <= p50 <= 10.5 and 2000 <= p99 <= 2100  # within the 5 % bins
    assert window.recent(60, now=2000) == (0, None, None)
    assert window.count == 101
