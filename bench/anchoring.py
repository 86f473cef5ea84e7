"""Gas per anchor transaction on a real local node (anvil), and what the default cadence costs per day.

    python bench/anchoring.py [--anchors 20] [--origin-len 30] [--json]

Starts a private anvil (CARECHAIN_ANVIL: the binary or the npm prefix of @foundry-rs/anvil; else `anvil` on
PATH), sends `--anchors` anchors of log-signed checkpoints at sizes from 1 to 10^9 from a funded account,
reads each receipt's gasUsed, and prints the gas per anchor and per day at the default cadence of
`bridge.anchor` (docs/anchoring.md): one anchor per `every_minutes` (60) or per `every_checkpoints` (3600,
an hour of the default 1 s checkpoints) while the log grows, so at most 24 a day; with fees at a few
base-fee levels. anvil's hardfork (Prague or later) prices calldata with EIP-7623's floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain.anchor import anchor_of_note, calldata_gas, encode_calldata  # noqa: E402
from carechain.checkpoint import Checkpoint, sign_note  # noqa: E402
from carechain.config import AnchorConfig  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from chain_bridge.anchoring import EthereumChain, load_account  # noqa: E402
from tests.test_anchoring_anvil import Anvil, anvil_binary  # noqa: E402

GWEI = 10**9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    binary = anvil_binary()
    if binary is None:
        print("no anvil: npm install --prefix DIR @foundry-rs/anvil, then CARECHAIN_ANVIL=DIR", file=sys.stderr)
        return 2
    defaults = AnchorConfig()
    per_day = int(24 * 60 / defaults.every_minutes)  # every_checkpoints at 1 s checkpoints is also hourly
    with tempfile.TemporaryDirectory() as tmp, Anvil(binary, Path(tmp)) as node:
        account = load_account(AnchorConfig(), Path(tmp))
        node.fund(account.address)
        chain = EthereumChain.from_url(node.url)
        log_key = Identity.generate()
        origin = f"carechain.log/{log_key.device_id}"  # the default origin: 30 bytes
        gas, seconds, sizes = [], [], []
        for i in range(args.anchors):
            size = 10 ** (i * 9 // max(1, args.anchors - 1)) + i
            note = sign_note(Checkpoint(origin, size, os.urandom(32)).body(), origin, log_key.public_key,
                             log_key.sign)
            data = encode_calldata(anchor_of_note(note))
            started = time.perf_counter()
            sent = chain.send_anchor(account, data)
            deadline = started + 10
            while (mined := chain.mined(sent.tx_hash)) is None and time.perf_counter() < deadline:
                time.sleep(0.002)
            seconds.append(time.perf_counter() - started)
            assert mined is not None and mined.status == 1, "anchor transaction failed"
            assert mined.gas_used == calldata_gas(data)
            gas.append(mined.gas_used)
            sizes.append(len(data))
    mean = statistics.fmean(gas)
    result = {
        "node": "anvil " + Path(binary).name, "anchors": len(gas), "calldata_bytes": max(sizes),
        "gas_per_anchor": {"min": min(gas), "mean": round(mean), "max": max(gas)},
        "default_cadence": {"every_minutes": defaults.every_minutes, "every_checkpoints": defaults.every_checkpoints,
                            "anchors_per_day": per_day},
        "gas_per_day": round(mean * per_day),
        "eth_per_day": {f"{g} gwei": round(mean * per_day * g * GWEI / 10**18, 6) for g in (1, 10, 50)},
        "send_to_receipt_ms_p50": round(statistics.median(seconds) * 1000, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        eth = ", ".join(str(round(mean * per_day * g * GWEI / 10**18, 6)) for g in (1, 10, 50))
        print(f"{len(gas)} anchors on anvil, {max(sizes)} calldata bytes: gas per anchor min {min(gas)} "
              f"mean {round(mean)} max {max(gas)}")
        print(f"default cadence ({defaults.every_minutes:.0f} min / {defaults.every_checkpoints} checkpoints): "
              f"{per_day} anchors/day = {round(mean * per_day)} gas/day; ETH/day at 1/10/50 gwei: {eth}")
        print(f"send → receipt on anvil (p50): {result['send_to_receipt_ms_p50']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
