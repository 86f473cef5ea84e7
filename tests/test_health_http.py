"""/metrics, /healthz and /readyz of the agent and the miner (carechain.health_http), over real HTTP and a real
broker: readiness follows the broker link (503 → 200), the counters are the processes' own, and anything but a
small GET of the three paths is refused."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from carechain import topics
from carechain.health_http import HealthServer, ListenError
from carechain.identity import Identity
from carechain.transport import connect_client
from chain_bridge.ledger.store import Ledger
from chain_miner.metrics import miner_ready, miner_registry
from chain_miner.service import WitnessMiner
from edge_agent.agent import Agent, AgentDevice
from edge_agent.metrics import agent_ready, agent_registry
from edge_agent.outbox import Outbox
from tests.test_pipeline import register

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(url: str) -> dict[str, float]:
    """Unlabelled samples and `name{label=value}` ones, by name."""
    status, text = get(url)
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def raw_request(address: str, data: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(4096)


def test_the_endpoint_serves_three_paths_and_refuses_the_rest() -> None:
    registry = CollectorRegistry()
    Counter("carechain_test_things", "things", registry=registry).inc(3)
    answer: list[object] = [(False, "the test says so")]

    def ready() -> tuple[bool, str]:
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]  # type: ignore[return-value]

    server = HealthServer("127.0.0.1", 0, registry, ready)
    server.start()
    try:
        base = f"http://{server.address}"
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "not ready: the test says so\n")
        answer[0] = (True, "the test says so")
        assert get(f"{base}/readyz") == (200, "ready: the test says so\n")
        assert metrics(f"{base}/metrics")["carechain_test_things_total"] == 3
        assert get(f"{base}/metrics/../etc/passwd")[0] == 404
        assert get(f"{base}/")[0] == 404
        assert raw_request(server.address, b"POST /metrics HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi").startswith(
            b"HTTP/1.0 405")
        assert raw_request(server.address, b"GET /" + b"a" * 5000 + b" HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 414")
        assert raw_request(server.address, b"GET /healthz HTTP/1.0\r\nContent-Length: 9\r\n\r\n").startswith(
            b"HTTP/1.0 413")
        # A readiness check that raises is "not ready", never a 500 that a probe might read as up.
        answer[0] = RuntimeError("broken")
        status, body = get(f"{base}/readyz")
        assert status == 503 and "broken" in body
        # A second endpoint on the same port: the error names the address and what to do.
        with pytest.raises(ListenError, match=rf"cannot listen on 127\.0\.0\.1:{server.port}: .*metrics_listen"):
            HealthServer("127.0.0.1", server.port, registry, lambda: (True, "")).start()
    finally:
        server.stop()


def test_agent_endpoint_is_ready_once_its_devices_are_connected_and_counts_what_it_signed(tmp_path: Path,
                                                                                          broker) -> None:
    device = Identity.generate()
    agent = Agent([AgentDevice(device, None)], Outbox(tmp_path / "agent" / "outbox.db"), broker.config,
                  Identity.generate().public_key, client_id=f"agent-{tmp_path.name}", protocol=1)
    for bpm in (60, 61, 62):
        agent.record(device.device_id, [("heart_rate", {"bpm": bpm})])
    server = HealthServer("127.0.0.1", 0, agent_registry(agent), lambda: agent_ready(agent))
    server.start()
    base = f"http://{server.address}"
    try:
        status, body = get(f"{base}/readyz")
        assert status == 503 and "1 of 1 device link(s) down" in body
        before = metrics(f"{base}/metrics")
        assert before["carechain_agent_events_signed_total"] == 3
        assert before["carechain_agent_outbox_depth"] == 3  # read through the collector's own connection
        assert before[f"carechain_agent_link_up{{device={device.device_id}}}"] == 0

        async def run_until_ready() -> tuple[int, dict[str, float]]:
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            deadline = time.monotonic() + 30
            while device.device_id not in agent.connected or agent.stats.sent < 3:
                assert time.monotonic() < deadline, "the agent did not connect"
                await asyncio.sleep(0.05)
            # The HTTP thread answers while the loop runs; ask it from a thread so the loop keeps turning.
            status, _ = await asyncio.to_thread(get, f"{base}/readyz")
            scraped = await asyncio.to_thread(metrics, f"{base}/metrics")
            stop.set()
            await task
            return status, scraped

        status, during = asyncio.run(run_until_ready())
        assert status == 200
        assert during[f"carechain_agent_link_up{{device={device.device_id}}}"] == 1
        assert during["carechain_agent_events_sent_total"] >= 3  # nobody receipts them here: all still queued
        assert during["carechain_agent_outbox_depth"] == 3
    finally:
        server.stop()
        agent.outbox.close()


def test_miner_endpoint_is_ready_once_connected_and_shows_its_lag_behind_a_signed_checkpoint(tmp_path: Path,
                                                                                             broker) -> None:
    log_key = Identity.generate()
    miner = WitnessMiner(tmp_path / "miner", broker.config, log_key.public_key, Identity.generate(),
                         request_timeout_s=0.5)
    server = HealthServer("127.0.0.1", 0, miner_registry(miner), lambda: miner_ready(miner))
    server.start()
    base = f"http://{server.address}"
    ledger = Ledger(tmp_path / "log" / "ledger.db")
    try:
        status, body = get(f"{base}/readyz")
        assert status == 503 and "not running" in body
        miner.start()
        wait_for(lambda: get(f"{base}/readyz")[0] == 200, "the miner to be ready")
        assert metrics(f"{base}/metrics")["carechain_miner_lag"] == 0
        # A checkpoint the log key signed, over a log nobody serves proofs for: the miner hears of it at once,
        # cannot cosign it, and shows how far behind it is.
        register(ledger, [Identity.generate() for _ in range(5)])
        note = ledger.issue_checkpoint(log_key, f"carechain.log/{log_key.device_id}")
        forged = ledger.issue_checkpoint(Identity.generate(), "someone.else/log")
        connected = threading.Event()
        client = connect_client(broker.config, f"log-{tmp_path.name}", connected=connected)
        try:
            assert connected.wait(30)
            client.publish(topics.CHECKPOINT, forged.encode(), qos=1).wait_for_publish(5)
            client.publish(topics.CHECKPOINT, note.encode(), qos=1).wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()
        wait_for(lambda: metrics(f"{base}/metrics")["carechain_miner_log_size"] == 5, "the miner to hear of size 5")
        wait_for(lambda: metrics(f"{base}/metrics")["carechain_miner_fetch_problems_total{kind=no_response}"] >= 1,
                 "the miner to give up on the unanswered proof")
        scraped = metrics(f"{base}/metrics")
        assert scraped["carechain_miner_lag"] == 5 and scraped["carechain_miner_cosigned_size"] == 0
        assert scraped["carechain_miner_checkpoints_cosigned_total"] == 0
        assert scraped["carechain_miner_broker_connected"] == 1
    finally:
        server.stop()
        miner.stop()
        ledger.close()


def test_storage_server_metrics_count_shares_held_and_requests_by_operation(tmp_path: Path) -> None:
    from chain_miner.metrics import storage_registry
    from chain_miner.storage_server import ShareStore, StorageServer

    server = StorageServer(Identity.generate(), ShareStore(tmp_path / "shares"))
    ref = {"dataset": "ds1", "segment": 0, "version": 1}
    for share in (0, 1):
        assert server.handle({"op": "put", **ref, "share": share, "data": b"x" * 100})["ok"]  # type: ignore[index]
    assert not server.handle({"op": "nonsense"})["ok"]  # type: ignore[index]
    health = HealthServer("127.0.0.1", 0, storage_registry(server), lambda: (True, "serving"))
    health.start()
    try:
        scraped = metrics(f"http://{health.address}/metrics")
    finally:
        health.stop()
    assert scraped["carechain_storage_shares_held"] == 2
    assert scraped["carechain_storage_requests_total{op=put}"] == 2
    assert scraped["carechain_storage_requests_total{op=errors}"] == 1
