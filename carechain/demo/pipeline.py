"""`carechain demo`: the whole flow on one machine — devices, agent, broker, bridge, ledger, proofs.

Registers one device per shipped profile (six BLE health devices and a pharmacy terminal), runs the
agent and the bridge for a few seconds, injects hostile traffic (a forged signature, a replay, a reused
seq, garbage and an oversized payload), drains the outbox, and verifies an inclusion proof end to end.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

DEMO_PROFILES = ("heart_rate_band", "thermometer", "blood_pressure_cuff", "pulse_oximeter",
                 "glucose_meter", "scale", "pharmacy_terminal")


def run_demo(*, broker: str | None, seconds: float, data_dir: Path | None, speedup: float,
             on_tick: Callable[[dict[str, Any]], None] | None = None, ble: bool = False,
             contracts: bool = True) -> dict[str, Any]:
    """Run the demo and return its summary (the `--json` object plus details).

    With `ble`, the six health devices are virtual BLE peripherals (bumble, simulators/ble) that the
    agent's unchanged bleak code scans, connects to and subscribes to; the pharmacy terminal still
    signs its purchases itself. With `contracts` (the default) the terminal rings up a scripted pharmacy
    day (carechain.demo.pharmacy_day) that the bridge's contract gate decides sale by sale.
    """
    from carechain import envelope, topics
    from carechain.config import BridgeConfig, BrokerConfig, parse_address
    from carechain.demo.pharmacy_day import ALICE, PharmacyDay
    from carechain.entries import ENTRY_EVENT, Entry
    from carechain.events import make_payload
    from carechain.identity import Identity
    from carechain.inventory import InventoryDevice
    from carechain.profiles import load_profiles
    from carechain.proofs import verify_inclusion_bundle
    from carechain.transport import connect_client
    from chain_bridge.bridge import Bridge
    from chain_bridge.contract_gate import ContractGate
    from chain_bridge.embedded_broker import EmbeddedBroker
    from chain_bridge.ledger.proofs import inclusion_bundle
    from chain_bridge.ledger.store import Ledger
    from chain_bridge.registry import ledger_path, log_key, operator_key, register_devices
    from edge_agent.agent import Agent, AgentDevice
    from edge_agent.outbox import Outbox
    from edge_agent.sources.simulated import SimulatedDevice

    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="carechain-demo-"))
    embedded = EmbeddedBroker().start() if broker is None else None
    host, port = (embedded.host, embedded.port) if embedded else parse_address(broker or "")
    broker_cfg = BrokerConfig(host=host, port=port)
    bridge_dir, agent_dir = root / "bridge", root / "agent"

    profiles = load_profiles()
    ledger = Ledger(ledger_path(bridge_dir))
    lk, operator = log_key(bridge_dir), operator_key(bridge_dir)
    identities = {name: Identity.load_or_create(agent_dir / "keys" / f"{name}.key") for name in DEMO_PROFILES}
    day = PharmacyDay(bridge_dir, agent_dir / "keys", ledger_path(bridge_dir)) if contracts else None
    owners = {"pharmacy_terminal": day.pharmacy.device_id if day else "pharmacy:demo",
              "heart_rate_band": ALICE if day else "patient:demo"}  # Alice's wearable earns her rebate
    known = ledger.devices()
    new = [InventoryDevice(name=name, profile=name, owner=owners.get(name, "patient:demo"), site="demo-ward",
                           public_key=ident.public_key, line=0)
           for name, ident in identities.items() if ident.device_id not in known]
    if new:
        register_devices(ledger, operator, new)
    if day:
        day.set_up(int(time.time() * 1000))

    bridge = Bridge(BridgeConfig(data_dir=bridge_dir, checkpoint_interval_s=1.0), broker_cfg, lk, ledger,
                    client_id=f"carechain-bridge-demo-{port}",
                    contracts=ContractGate(day.genesis, operator) if day else None)
    bridge.start()
    rng = random.Random(2026)
    over_ble = {name for name in identities if ble and profiles[name].transport == "ble"}
    scripted = {"pharmacy_terminal"} if day else set()  # the pharmacy day's sales, rung up below
    devices = [AgentDevice(ident, None if name in over_ble | scripted
                           else SimulatedDevice(profiles[name], random.Random(rng.random())))
               for name, ident in identities.items()]
    outbox = Outbox(agent_dir / "outbox.db")
    agent = Agent(devices, outbox, broker_cfg, lk.public_key, speedup=speedup, resend_after_s=3.0)
    hostile: dict[str, int] = {}

    def snapshot(phase: str) -> dict[str, Any]:
        return {"phase": phase, "signed": agent.stats.signed, "outbox": outbox.depth(), **bridge.stats.as_dict()}

    def inject_hostile() -> None:
        """Traffic an attacker or a broken device could send; each must be refused or deduplicated."""
        client = connect_client(broker_cfg, f"carechain-demo-intruder-{port}", connected=(ready := threading.Event()))
        ready.wait(10)
        victim = identities["heart_rate_band"]
        dev = victim.device_id
        now = int(time.time() * 1000)
        forged = envelope.sign(Identity.generate(), make_payload(dev, 10**6, now, "heart_rate", {"bpm": 180}),
                               kid=dev)
        first_idx = ledger_reader.event_index(dev, 0)
        replay = Entry.decode(ledger_reader.entry(first_idx)).cose if first_idx is not None else b""
        reused = envelope.sign(victim, make_payload(dev, 0, now, "heart_rate", {"bpm": 61}))
        msgs = {"forged_signature": forged, "replay": replay, "reused_seq": reused,
                "garbage": b"\xff\x00 not cbor", "oversized": b"\x00" * 64 * 1024}
        for name, payload in msgs.items():
            if payload:
                client.publish(topics.events(dev), payload, qos=1).wait_for_publish(5)
                hostile[name] = 1
        client.disconnect()
        client.loop_stop()

    def ring_up(sales: list[Any]) -> None:
        terminal = identities["pharmacy_terminal"].device_id
        for sale in sales:
            agent.record(terminal, [("purchase", sale)])

    async def produce(stop: asyncio.Event) -> None:
        start = time.monotonic()
        if day:
            wearable = identities["heart_rate_band"].device_id
            for ts, activity in day.last_week_activity():  # synced from the band's memory
                agent.record(wearable, [("activity", activity)], ts)
            ring_up(day.morning_sales(int(time.time() * 1000)))
        afternoon = day is not None
        while time.monotonic() - start < seconds:
            if afternoon and time.monotonic() - start > seconds / 2:
                afternoon = False
                ring_up(day.afternoon_sales(int(time.time() * 1000)))  # type: ignore[union-attr]
            await asyncio.sleep(0.2)
            if on_tick:
                on_tick(snapshot("running" + (" over BLE" if over_ble else "")))
        agent.stop_producing()
        stop.set()

    async def produce_over_ble() -> None:
        from edge_agent.sources.ble import BleSource, run_sources
        from simulators.ble import VirtualFleet

        names = [n for n in identities if n in over_ble]
        async with VirtualFleet([profiles[n] for n in names], seed=2026, autorun=True, speedup=speedup) as fleet:
            sources = [BleSource(profiles[n], partial(agent.record, identities[n].device_id),
                                 address=peripheral.address, backend=fleet.backend)
                       for n, peripheral in zip(names, fleet.peripherals, strict=True)]
            ble_stop = asyncio.Event()
            await asyncio.gather(run_sources(sources, ble_stop), produce(ble_stop))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await (produce_over_ble() if over_ble else produce(asyncio.Event()))
        await asyncio.to_thread(inject_hostile)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # drain: every signed event receipted and checkpointed
            latest = ledger_reader.latest_checkpoint()
            if outbox.depth() == 0 and latest and latest[0] >= bridge.stats.tree_size \
                    and bridge.stats.received >= agent.stats.sent + len(hostile):
                break
            await asyncio.sleep(0.2)
            if on_tick:
                on_tick(snapshot("draining"))
        stop.set()
        await task
        if day:
            day.settle_wellness(int(time.time() * 1000))  # last week is over: the insurer settles it

    ledger_reader = Ledger(ledger_path(bridge_dir))  # a second connection: the bridge thread owns its own
    try:
        asyncio.run(main())
    finally:
        bridge.stop()
        if embedded:
            embedded.stop()

    ledger_reader = Ledger(ledger_path(bridge_dir))
    proof: dict[str, Any] | None = None
    proof_verified = False
    hr = identities["heart_rate_band"]
    try:
        bundle = inclusion_bundle(ledger_reader, hr.device_id, 0, lk.public_key)
        verified = verify_inclusion_bundle(bundle, lk.public_key)
        event = envelope.parse(Entry.decode(__import__("base64").b64decode(bundle.entry)).cose)
        proof_verified = verified.device_id == hr.device_id and event.verify(hr.public_key)
        proof = {"device_id": hr.device_id, "seq": 0, "leaf_index": bundle.leaf_index,
                 "tree_size": bundle.tree_size, "root_hash": bundle.root_hash}
    except Exception as exc:  # reported in the summary, never hidden
        proof = {"error": str(exc)}
    stats = bridge.stats.as_dict()
    kinds: dict[str, int] = {}
    for i in range(ledger_reader.size):  # read back from the log itself: what was anchored, by kind
        entry = Entry.decode(ledger_reader.entry(i))
        if entry.type == ENTRY_EVENT:
            kind = envelope.parse(entry.cose).payload["kind"]
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "sent": agent.stats.signed,
        "anchored": stats["anchored"],
        "rejected": stats["rejected"],
        "duplicates": stats["duplicates"],
        "checkpoints": stats["checkpoints"],
        "proof_verified": proof_verified,
        "rejected_by_reason": stats["rejected_by_reason"],
        "outbox_left": outbox.depth(),
        "quarantined": outbox.quarantined(),
        "devices": {name: ident.device_id for name, ident in identities.items()},
        "tree_size": ledger_reader.size,
        "proof": proof,
        "data_dir": str(root),
        "broker": "embedded (amqtt)" if embedded else f"{host}:{port}",
        "ble": sorted(over_ble),
        "anchored_by_kind": kinds,
        "pharmacy": day.summary() if day else None,
    }
