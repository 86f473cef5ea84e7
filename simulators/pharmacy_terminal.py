"""A pharmacy payment terminal: rings up sales and sends each as a purchase event signed with its own key.

Each sale line (item code NDC/RxNorm/GTIN from the profile's catalogue, Rx-only flag, quantity, price in
minor units, a patient token, the payment method, and for Rx-only items the prescription reference) goes
through the same agent code as a health device: signed, stored in the terminal's outbox, sent over MQTT,
deleted on the bridge's receipt. The terminal is done when every sale is receipted.

With patient wallets (`--wallet KEY`, a registered patient's key file: the key file is the wallet), each sale is
rung up for one of those patients and carries her signed payment authorization: card sales become "token"
sales she pays in full from her account, insurance sales carry her signed claim (the share her policy's price
cap allows, from the ledger's policy record) so the insurer pays only with her consent.

    python -m simulators.pharmacy_terminal --key terminal.key --bridge-key HEX [--broker HOST:PORT] \\
        [--sales 20] [--data-dir DIR] [--seed 1] [--wallet alice.key ...]

(`carechain agent` with a `pharmacy_terminal` device in its config does the same as a long-running service.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from carechain.config import AgentConfig, BrokerConfig, Config, parse_address
from carechain.events import Purchase, authorize_payment
from carechain.identity import Identity, PublicKeyError, parse_public_key_hex
from carechain.profiles import load_profiles
from edge_agent.agent import AgentDevice
from edge_agent.assembly import assemble_agent
from edge_agent.sources.simulated import SimulatedDevice


def pay_with_wallet(sale: Purchase, terminal: str, wallet: Identity, policy: Mapping[str, Any] | None = None,
                    nonce: int | None = None) -> Purchase:
    """`sale` rung up for the wallet's owner, with her signed payment authorization.

    An insurance sale claims what her policy (its ledger record, `policies[<her party id>]`) covers for the
    item, capped as insurance v3 caps it, and the rest is her copay at the counter; any other sale is paid in
    full in tokens from her account.
    """
    from contract_rules.insurance_v3 import covered_share

    item = f"{sale.code_system}:{sale.item_code}"
    claim = 0
    if sale.payment_method == "insurance" and policy is not None:
        claim = covered_share(dict(policy), item, sale.quantity, sale.price_minor) or 0
    insured = sale.payment_method == "insurance"
    payment = authorize_payment(wallet, terminal, item, sale.quantity, sale.price_minor,
                                pay_minor=0 if insured else sale.price_minor, claim_minor=claim,
                                policy_id=str(policy["policy_id"]) if claim and policy else "",
                                nonce=secrets.randbits(63) if nonce is None else nonce)
    return sale.model_copy(update={"patient_token": wallet.device_id, "payment": payment,
                                   "payment_method": "insurance" if insured else "token"})


async def ring_up(terminal: Identity, broker: BrokerConfig, bridge_public_key: bytes, data_dir: Path,
                  sales: int, seed: int | str = 1, timeout_s: float = 60.0, *, wallets: Sequence[Identity] = (),
                  policies: Mapping[str, Mapping[str, Any]] | None = None,
                  wait_final: bool = False) -> dict[str, object]:
    """Sign `sales` purchase events, send them, wait for every receipt; returns a summary.

    With `wait_final` the terminal also waits (within `timeout_s`) until a final checkpoint covers every sale,
    as a pharmacy that hands an Rx drug over only once the sale cannot be undone would; `final` counts them.

    With `wallets`, the sales go round the wallets' owners, each paid with her signature (`pay_with_wallet`);
    `policies` (patient party id → ledger policy record) lets insurance sales claim their covered share.
    """
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
        for kind, reading in register.next_readings(now)[: sales - len(lines)]:
            body = reading
            if wallets and isinstance(reading, Purchase):
                wallet = wallets[len(lines) % len(wallets)]
                body = pay_with_wallet(reading, terminal.device_id, wallet, (policies or {}).get(wallet.device_id))
            line = body.model_dump(exclude_none=True)
            if "payment" in line:
                line["payment"]["sig"] = line["payment"]["sig"].hex()  # the summary is printed as JSON
            lines.append(line)
            agent.record(terminal.device_id, [(kind, body)], now)
        now = register.next_due_ms() or now + 1000
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + timeout_s
    while outbox.depth() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    while wait_final and outbox.awaiting_finality(terminal.device_id) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await task
    left = outbox.depth()
    not_final = outbox.awaiting_finality(terminal.device_id)
    assembled.close()
    return {"terminal": terminal.device_id, "sales": lines, "receipted": sales - left, "pending": left,
            "final": sales - left - not_final, "quarantined": agent.stats.quarantined}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key", type=Path, required=True, help="the terminal's key file (created if missing)")
    ap.add_argument("--bridge-key", required=True, help="the bridge's log public key (hex): receipts are "
                                                        "trusted only when it signed them")
    ap.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT")
    ap.add_argument("--sales", type=int, default=20)
    ap.add_argument("--data-dir", type=Path, default=Path("carechain-data/pharmacy-terminal"))
    ap.add_argument("--seed", default="1")
    ap.add_argument("--wallet", type=Path, action="append", default=[],
                    help="a registered patient's key file: sales are paid with her signature (repeatable)")
    ap.add_argument("--wait-final", action="store_true",
                    help="hand over only once a final checkpoint covers every sale (exit 1 if one is not final)")
    args = ap.parse_args()
    try:
        bridge_key = parse_public_key_hex(args.bridge_key, "--bridge-key")
    except PublicKeyError as exc:
        ap.error(str(exc))
    host, port = parse_address(args.broker)
    summary = asyncio.run(ring_up(Identity.load_or_create(args.key), BrokerConfig(host=host, port=port),
                                  bridge_key, args.data_dir, args.sales, args.seed,
                                  wallets=[Identity.load(path) for path in args.wallet],
                                  wait_final=args.wait_final))
    print(json.dumps(summary, indent=2))
    final_ok = not args.wait_final or summary["final"] == args.sales
    sys.exit(0 if summary["pending"] == 0 and summary["quarantined"] == 0 and final_ok else 1)


if __name__ == "__main__":
    main()
