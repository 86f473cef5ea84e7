"""A study's aggregators publish their results over their own logins on a mosquitto locked down by
`carechain bridge acl`: the bridge receives and appends them, an aggregator login writes only its own miner's
study topic, and the miner service, logged in as that miner, keeps its session while its aggregator publishes.

The broker ties client ids to logins (`use_username_as_clientid`), so a second session on the miner's own
login would knock the running miner off; that is why each miner has a third login, for its aggregator.
Denied publishes are checked by non-delivery with a positive control sent after them (tests/test_broker_acl.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_contracts_market import MarketWorld
from test_study_intake import into_ledger, run_study_from_ledger, study_world

from carechain import topics
from carechain.config import BridgeConfig, BrokerConfig
from carechain.credentials import load_mqtt_credentials
from carechain.identity import Identity
from chain_bridge.bridge import Bridge
from chain_bridge.broker.acl import aggregator_user, miner_user
from chain_bridge.contract_gate import ContractGate
from chain_bridge.ledger.store import Ledger
from chain_miner.aggregator import publish_entries
from contract_rules import market as rules
from contract_rules.replay import replay_leaves
from simulators.mosquitto import REPO, mosquitto_binary
from simulators.mpc_parties import tls_work_dirs
from simulators.ports import free_ports
from tests.locked_broker import BRIDGE, Conn, LockedBroker, login, start_locked_broker, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]
DEADLINE_S = 60.0  # a bound so a broken run fails instead of hanging; nothing asserts on timing


@dataclass
class Market:
    world: MarketWorld
    locked: LockedBroker
    bridge: Bridge
    aggregators: list[str]  # the study's aggregator (miner) ids, in the study's order

    def aggregator_file(self, miner: str) -> Path:
        return self.locked.access.aggregator_credentials[miner]

    def miner_service(self, miner: str) -> Conn:
        """A session on the miner's own login, as its running miner service holds one."""
        password = load_mqtt_credentials(self.locked.access.miner_credentials[miner]).password
        conn = login(self.locked.port, miner_user(miner), password, client_id=miner_user(miner))
        assert conn.accepted, conn.rc
        return conn

    def results(self, n: int) -> dict[str, int]:
        """The bridge's study-intake counters once it has decided `n` results."""
        stats = self.bridge.stats.studies
        assert wait_until(lambda: sum(stats.values()) >= n, DEADLINE_S), dict(stats)
        return {k: v for k, v in stats.items() if v}


@pytest.fixture
def market(tmp_path: Path) -> Iterator[Market]:
    """Study "hr-1" on a ledger whose miners are registered parties, the broker files `carechain bridge acl`
    writes from it, mosquitto enforcing them, and the bridge (with the contract rules) on its own login."""
    w, _honest, _huge = study_world()
    into_ledger(w, tmp_path / "bridge" / "ledger.db").close()
    locked = start_locked_broker(tmp_path, [])
    cfg = BridgeConfig(data_dir=locked.data_dir, checkpoint_interval_s=0.3)
    bridge = Bridge(cfg, locked.config(BRIDGE), Identity.generate(), Ledger(locked.ledger.path), client_id=BRIDGE,
                    contracts=ContractGate(w.genesis, w.operator))
    try:
        bridge.start()
        assert bridge.wait_ready(30), "the bridge user could not subscribe"
        yield Market(w, locked, bridge, [a.device_id for a in w.aggregators()])
    finally:
        bridge.stop()
        locked.close()


def test_bridge_acl_gives_every_ledger_miner_an_aggregator_login(market: Market) -> None:
    access = market.locked.access
    assert sorted(access.aggregator_credentials) == sorted(m.device_id for m in market.world.miners)
    for miner, path in access.aggregator_credentials.items():
        login_ = load_mqtt_credentials(path)
        assert path == market.locked.out_dir / "aggregators" / f"{miner}.json"
        assert login_.username == aggregator_user(miner)
        assert login_.password != load_mqtt_credentials(access.miner_credentials[miner]).password


def test_aggregators_publish_over_their_own_logins_and_the_bridge_appends_the_result(
        market: Market, tmp_path: Path) -> None:
    """The command line end to end: each aggregator's config names its miner's login, as a miner's does;
    --credentials replaces it with the aggregator login for --publish."""
    services = {m: market.miner_service(m) for m in market.aggregators}
    inputs, _ = run_study_from_ledger(tmp_path, market.world, market.locked.ledger.path)
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    peers = ",".join(f"127.0.0.1:{port}" for port in free_ports(len(market.aggregators)))
    work = tls_work_dirs(tmp_path, len(market.aggregators))
    procs = []
    try:
        for i, miner in enumerate(market.aggregators):
            config = tmp_path / f"miner{i}.yaml"
            config.write_text(json.dumps({"broker": {
                "host": market.locked.mosquitto.host, "port": market.locked.port,
                "credentials_file": str(market.locked.access.miner_credentials[miner])}}))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "chain_miner.aggregator", "--study", "hr-1", "--index", str(i),
                 "--peers", peers, "--key", str(tmp_path / f"aggregator{i}.key"), "--inputs",
                 str(tmp_path / "inputs.json"), "--out", str(tmp_path / f"published{i}.json"),
                 "--publish", "--config", str(config), "--credentials", str(market.aggregator_file(miner)),
                 "--mpc-tls", str(work[i])],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        for p in procs:
            output, _ = p.communicate(timeout=120)
            assert p.returncode == 0, output.decode(errors="replace")[-3000:]
        # two equal results of three decide the study; the third arrives after that
        assert market.results(3) == {"appended": 2, "study_already_decided": 1}
        for miner, service in services.items():  # no aggregator session took the miner's client id
            assert not service.dropped.is_set(), f"miner {miner} was knocked off"
            service.subscribe(topics.CHECKPOINT)  # and its session still answers
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for service in services.values():
            service.close()
    ledger = market.bridge.ledger  # the handle it appended through
    state = replay_leaves(market.world.genesis, (ledger.entry(i) for i in range(ledger.size))).state
    study = rules.study_record(state, "hr-1")
    assert study is not None and study["state"] == "answered"


def test_an_aggregator_login_writes_only_its_own_miners_study_topic(market: Market, tmp_path: Path) -> None:
    _, entries = run_study_from_ledger(tmp_path, market.world, market.locked.ledger.path)
    a, b = market.aggregators[0], market.aggregators[1]
    agg = login(market.locked.port, aggregator_user(a), load_mqtt_credentials(market.aggregator_file(a)).password)
    assert agg.accepted, agg.rc
    try:
        agg.publish(topics.miner_study(b), entries[1])  # b's own signed entry, on b's topic: refused for a
        agg.publish(topics.miner_study(a), entries[0])  # positive control, after them on the same connection
        assert market.results(1) == {"appended": 1}  # b's entry, had it passed, would have been appended first
    finally:
        agg.close()


def test_the_miners_own_login_would_knock_its_service_off(market: Market, tmp_path: Path) -> None:
    """Why the aggregator has its own login: with client ids tied to logins, publishing as the miner from
    another process evicts the miner service (which itself writes only its trial entries on that topic)."""
    _, entries = run_study_from_ledger(tmp_path, market.world, market.locked.ledger.path)
    a = market.aggregators[0]
    service = market.miner_service(a)
    try:
        # b's entry on a's topic: were it delivered, the bridge would count it first as not_the_topics_miner
        publish_entries(market.locked.config(miner_user(a)), a, entries[1], timeout=DEADLINE_S)
        assert wait_until(service.dropped.is_set, DEADLINE_S), "a second session on the miner's login did not evict"
    finally:
        service.close()
    service = market.miner_service(a)
    try:
        broker = BrokerConfig(host=market.locked.mosquitto.host, port=market.locked.port,
                              credentials_file=market.aggregator_file(a))
        publish_entries(broker, a, entries[0], timeout=DEADLINE_S)  # a's entry, over the aggregator login
        # b's entry over a's miner login reached the bridge, which refused it: signed by another miner
        assert market.results(2) == {"appended": 1, "not_the_topics_miner": 1}
        assert not service.dropped.is_set()
        service.subscribe(topics.CHECKPOINT)
    finally:
        service.close()
