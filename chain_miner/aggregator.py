"""One aggregator of a data-market study: one MPyC party (docs/market.md, "The computation").

    python -m chain_miner.aggregator --study ID --index I --peers host:port,host:port,host:port \\
        --key miner.key --inputs inputs.json [--out result.json] [--ts MS]

The study's m aggregators each run this, party I at the I-th address of --peers (all on the same list, in
the study's aggregator order); MPyC connects them over TCP. Wave 1 reads the study and the contributions from
--inputs, a JSON file the caller writes:

    {"study": {"study_id", "query": {type, kind, lo, hi, bins?}, "epsilon_milli", "aggregators": [ids]},
     "contributions": [{"leaf": int, "min_cohort": int, "shares": [hex sealed row per aggregator]}]}

What the parties learn, in order, and nothing else:
1. which contributions some aggregator could not use (its share does not open or decode): the union is
   dropped as invalid;
2. which of the rest were shared inconsistently (not on one polynomial of degree (m-1)//2), from the shares
   of input + a jointly random mask: dropped as invalid;
3. one validity bit per remaining contribution, computed inside the MPC (count: the input is 1; value: lo ≤ v
   ≤ hi by two secure comparisons; histogram: every entry 0/1 and their sum 1, as one random linear
   combination that is zero exactly when valid, with coefficients drawn jointly after the inputs are fixed);
4. the aggregate over the cohort-rule's included set (`carechain.market.cohort`), with discrete-Laplace noise
   drawn inside the MPC when the study sets epsilon_milli (see `_noise`), or nothing when the set is empty.

It writes {"entry": hex of the signed `study.result` ledger entry, "payload": …, "stats": …} to --out or
stdout. Importing MPyC's runtime parses sys.argv, so `main` sets MPyC's options (-I, -P, --no-log) there
before the import.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carechain import market
from carechain.identity import Identity

HISTOGRAM_COEFF_DOMAIN = b"carechain/market/histogram-check/v1\x00"


def _own_rows(identity: Identity, index: int, query: market.Query,
              contributions: Sequence[dict[str, Any]]) -> dict[int, list[int] | None]:
    """This aggregator's row of shares per contribution leaf; None when it cannot be used."""
    rows: dict[int, list[int] | None] = {}
    for c in contributions:
        try:
            sealed = bytes.fromhex(c["shares"][index])
            rows[int(c["leaf"])] = market.decode_shares(market.open_share(identity, sealed), query.width)
        except (market.MarketShareError, ValueError, IndexError, KeyError, TypeError):
            rows[int(c["leaf"])] = None
    return rows


async def _compute(mpc: Any, query: market.Query, rows: dict[int, list[int] | None], mins: dict[int, int],
                   epsilon_milli: int) -> dict[str, Any]:
    await mpc.start()
    secint = mpc.SecInt(32)
    field = secint.field
    if field.modulus != market.FIELD_MODULUS:
        raise RuntimeError("MPyC's SecInt(32) field is not the one contributors share in")
    w = query.width

    # 1. the union of contributions some aggregator could not use
    local_bad = sorted(leaf for leaf, row in rows.items() if row is None)
    unusable = set().union(*(set(b) for b in await mpc.transfer(local_bad)))
    kept = sorted(leaf for leaf in rows if leaf not in unusable)

    # 2. consistency of every sharing, seen only through input + jointly random mask
    flat = [s for leaf in kept for s in rows[leaf] or []]
    masks = mpc._randoms(field, len(flat)) if flat else []
    masked = [(s + r.value) % market.FIELD_MODULUS for s, r in zip(flat, masks, strict=True)]
    everyone = await mpc.transfer(masked)
    t = market.threshold_for(len(mpc.parties))
    consistent = []
    for j, leaf in enumerate(kept):
        ok = all(market.shares_consistent([everyone[p][j * w + k] for p in range(len(mpc.parties))], t)
                 for k in range(w))
        if ok:
            consistent.append(leaf)

    # 3. validity bits inside the MPC, opened
    inputs = {leaf: [secint(field(s)) for s in rows[leaf] or []] for leaf in consistent}
    coeffs: list[int] = []
    if query.type == "histogram" and consistent:
        coeffs = _coefficients(int(await mpc.output(mpc._random(secint))) % market.FIELD_MODULUS, w + 1)
    checks = []
    for leaf in consistent:
        x = inputs[leaf]
        if query.type == "count":
            checks.append(mpc.is_zero_public(x[0] - 1))
        elif query.type == "histogram":
            defect = coeffs[0] * (mpc.sum(x) - 1)
            for k, b in enumerate(x):
                defect += coeffs[k + 1] * (b * (b - 1))
            checks.append(mpc.is_zero_public(defect))
        else:
            checks.append(mpc.output((x[0] >= query.lo) * (x[0] <= query.hi)))
    bits = [bool(b) for b in await mpc.gather(checks)] if checks else []
    valid = [leaf for leaf, ok in zip(consistent, bits, strict=True) if ok]

    # 4. the cohort rule, then the aggregate over the included set only
    included = market.cohort([(leaf, mins[leaf]) for leaf in valid])
    answer: dict[str, Any] | None = None
    if included:
        if query.type == "count":
            answer = {"count": len(included)}
        else:
            totals = [mpc.sum([inputs[leaf][k] for leaf in included]) for k in range(w)]
            if epsilon_milli > 0:
                thresholds = market.geometric_bit_thresholds(epsilon_milli, market.sensitivity(query))
                totals = [total + _noise(mpc, secint, thresholds) for total in totals]
            opened = [int(v) for v in await mpc.output(totals)]
            if query.type == "histogram":
                answer = {"histogram": opened}
            elif query.type == "sum":
                answer = {"sum": opened[0]}
            else:
                answer = {"sum": opened[0], "n": len(included)}
    sent = sum(p.protocol.nbytes_sent for p in mpc.parties if p.pid != mpc.pid)
    await mpc.shutdown()
    return {"valid": valid, "invalid": len(rows) - len(valid), "included": included, "answer": answer,
            "bytes_sent": sent}


def _coefficients(coin: int, n: int) -> list[int]:
    """n field coefficients expanded from the jointly opened coin (SHA-256 in counter mode)."""
    import hashlib  # noqa: PLC0415

    seed = coin.to_bytes(8, "big")
    return [int.from_bytes(hashlib.sha256(HISTOGRAM_COEFF_DOMAIN + seed + k.to_bytes(2, "big")).digest(), "big")
            % market.FIELD_MODULUS for k in range(n)]


def _noise(mpc: Any, secint: Any, thresholds: list[int]) -> Any:
    """Discrete-Laplace noise G1 - G2 as a secint, from jointly random secret bits: each binary digit j of a
    geometric G is [u_j < c_j] for a fresh uniform 30-bit secret u_j (market.geometric_bit_thresholds)."""
    def geometric() -> Any:
        g = secint(0)
        for j, c in enumerate(thresholds):
            if c == 0:
                continue  # digit j is 1 with probability < 2**-31: dropped (within the stated rounding)
            bits = mpc.random_bits(secint, market.NOISE_RANDOM_BITS)
            u = mpc.sum([b * (1 << i) for i, b in enumerate(bits)])
            g += (u < c) * (1 << j)
        return g

    return geometric() - geometric()


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    spec = json.loads(Path(args.inputs).read_text())
    study = spec["study"]
    if study["study_id"] != args.study:
        raise SystemExit(f"--inputs holds study {study['study_id']!r}, not {args.study!r}")
    query = market.Query.model_validate(study["query"])
    peers = args.peers.split(",")
    identity = Identity.load(Path(args.key))
    aggregators = study["aggregators"]
    if len(aggregators) != len(peers) or aggregators[args.index] != identity.device_id:
        raise SystemExit(f"this key ({identity.device_id}) is not aggregator {args.index} of the study's "
                         f"{len(aggregators)}, or --peers does not list one address per aggregator")
    contributions = spec["contributions"]
    rows = _own_rows(identity, args.index, query, contributions)
    mins = {int(c["leaf"]): int(c["min_cohort"]) for c in contributions}
    if len(mins) != len(contributions):
        raise SystemExit("--inputs lists a contribution leaf twice")

    sys.argv = [sys.argv[0], "-I", str(args.index), "--no-log"] + [a for p in peers for a in ("-P", p)]
    from mpyc.runtime import mpc  # noqa: PLC0415 - reads sys.argv at import

    out = mpc.run(_compute(mpc, query, rows, mins, int(study.get("epsilon_milli", 0))))
    ts = args.ts if args.ts is not None else int(time.time() * 1000)
    payload = market.result_payload(study["study_id"], valid=out["valid"], invalid=out["invalid"],
                                    included=out["included"], answer=out["answer"],
                                    epsilon_milli=int(study.get("epsilon_milli", 0)), ts=ts)
    entry = market.result_entry(identity, payload)
    return {"entry": entry.encode().hex(), "payload": payload,
            "stats": {"bytes_sent": out["bytes_sent"], "seconds": time.perf_counter() - started,
                      "contributions": len(contributions)}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chain_miner.aggregator", description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="the study id")
    parser.add_argument("--index", type=int, required=True, help="this aggregator's 0-based place in the study")
    parser.add_argument("--peers", required=True, help="host:port of every aggregator, in the study's order")
    parser.add_argument("--key", required=True, help="this miner's key file (signs the result)")
    parser.add_argument("--inputs", required=True, help="JSON file with the study and its contributions")
    parser.add_argument("--out", help="write the result here instead of stdout")
    parser.add_argument("--ts", type=int, help="the result's ts in ms (default: now)")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
