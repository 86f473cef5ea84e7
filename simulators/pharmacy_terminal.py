"""A pharmacy payment terminal: rings up sales and sends each as a purchase event signed with its own key.

Each sale line (item code NDC/RxNorm/GTIN from the profile's catalogue, Rx-only flag, quantity, price in
minor units, a patient token, the payment method, and for Rx-only items the prescription reference) goes
through the same agent code as a health device: signed, stored in the terminal's outbox, sent over MQTT,
deleted on the bridge's receipt. The terminal is done when every sale is receipted.

    python -m simulators.pharmacy_terminal --key terminal.key --bridge-key HEX [--broker HOST:PORT] \\
        [--sales 20] [--data-dir DIR] [--seed 1]

(`carechain agent` with a `pharmacy_terminal` device in its config does the same as a long-running service.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from carechain.config import AgentConfig, BrokerConfig, Config, parse_address
from carechain.identity import Identity, PublicKeyError, parse_public_key_hex
from carechain.profiles import load_profiles
from edge_agent.agent import AgentDevice
from edge_agent.assembly import assemble_agent
from edge_agent.sources.simulated import SimulatedDevice


async def ring_up(terminal: Identity, broker: BrokerConfig, bridge_public_key: bytes, data_dir: Path,
                  sales: int, seed: int | str = 1, timeout_s: float = 60.0) -> dict[str, object]:
    """Sign `sales` purchase events, send them, wait for every receipt; returns a summary."""
    profile = load_profiles()["pharmacy_terminal"]
    register = SimulatedDevice(profile, seed)
    cfg = Config(broker=broker, agent=AgentConfig(data_dir=data_dir, bridge_public_key=bridge_public_key.hex(),
                                                  resend_after_s=3.0))
    assembled = assemble_agent(cfg, devices=[AgentDevice(terminal, None)])
    agent, outbox = assembled.agent, assembled.outbox
    lines: list[dict[str, object]] = []
    # The day's sales so far, one sale line per purchase event, spaced as the profile samples them and
    # ending now (the bridge refuses device times in the future beyond its skew limit).
    now = int(time.time() * 1000) - int(sales * profile.interval_s("purchase") * 1000)
    while len(lines) < sales:
        for kind, body in register.next_readings(now)[: sales - len(lines)]:
            lines.append(body.model_dump(exclude_none=True))
            agent.record(terminal.device_id, [(kind, body)], now)
        now = register.next_due_ms() or now + 1000
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + timeout_s
    while outbox.depth() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await task
    left = outbox.depth()
    assembled.close()
    return {"terminal": terminal.device_id, "sales": lines, "receipted": sales - left, "pending": left,
            "quarantined": agent.stats.quarantined}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key", type=Path, required=True, help="the terminal's key file (created if missing)")
    ap.add_argument("--bridge-key", required=True, help="the bridge's log public key (hex): receipts are "
                                                        "trusted only when it signed them")
    ap.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT")
    ap.add_argument("--sales", type=int, default=20)
    ap.add_argument("--data-dir", type=Path, default=Path("carechain-data/pharmacy-terminal"))
    ap.add_argument("--seed", default="1")
    args = ap.parse_args()
    try:
        bridge_key = parse_public_key_hex(args.bridge_key, "--bridge-key")
    except PublicKeyError as exc:
        ap.error(str(exc))
    host, port = parse_address(args.broker)
    summary = asyncio.run(ring_up(Identity.load_or_create(args.key), BrokerConfig(host=host, port=port),
                                  bridge_key, args.data_dir, args.sales, args.seed))
    print(json.dumps(summary, indent=2))
    sys.exit(0 if summary["pending"] == 0 and summary["quarantined"] == 0 else 1)


if __name__ == "__main__":
    main()
