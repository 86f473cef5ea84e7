"""One aggregator of a data-market study: one MPyC party (docs/market.md, "The computation").

    python -m chain_miner.aggregator --study ID --index I --peers host:port,host:port,host:port \\
        --key miner.key --inputs inputs.json --mpc-tls DIR [--audit] [--out result.json] [--ts MS] \\
        [--publish --config carechain.toml [--credentials aggregators/<id>.json] [--tls-ca ca.crt]]

The study's m aggregators each run this, party I at the I-th address of --peers (all on the same list, in
the study's aggregator order); MPyC connects them over TCP with mutually authenticated TLS (--mpc-tls: each
party trusts exactly the study's aggregators' certificates, which their signed hellos announce;
chain_miner.mpc_tls); `--plaintext` instead is for parties that all run on one host. The study and its
contributions come from the ledger: `inputs_from_leaves` replays its leaves through the contract rules, so
only what they accepted counts (the study record, its aggregators, each contribution's consent minimum and
sealed shares); a caller with the leaves (a `chain_bridge.ledger.reader.LedgerReader`'s, or leaves fetched
from the log — this package may not import the bridge's) passes that document to `run`, and the command line
takes it as --inputs, a JSON file:

    {"study": {"study_id", "query": {type, kind, lo, hi, bins?}, "epsilon_milli", "aggregators": [ids]},
     "contributions": [{"leaf": int, "min_cohort": int, "shares": [hex sealed row per aggregator]}]}

What the parties learn, in order, and nothing else:
1. which contributions some aggregator could not use (its share does not open or decode): the union is
   dropped as invalid;
2. which of the rest were shared inconsistently (not on one polynomial of degree (m-1)//2), from the shares
   of input + a jointly random mask: dropped as invalid;
3. one validity bit per remaining contribution, computed inside the MPC and zero-tested as one random linear
   combination that is zero exactly when valid, with coefficients drawn jointly after the inputs are fixed
   (count: the input is 1; value: every input bit bᵢ is 0/1 — bᵢ(bᵢ − 1) = 0 — and Σ 2**i·bᵢ ≤ hi − lo by
   one secure (k+1)-bit comparison, exact because that sum is now an honest integer below 2**k; histogram: every
   entry 0/1 and their sum 1);
4. the aggregate over the cohort-rule's included set (`carechain.market.cohort`), with discrete-Laplace noise
   drawn inside the MPC when the study sets epsilon_milli (see `_noise`), or nothing when the set is empty.

It writes {"entry": hex of the signed `study.result` ledger entry, "payload": …, "stats": …} to --out or
stdout, and with --publish sends the entry to the bridge on its own miner topic `cc/v1/miner/<id>/study`
(`publish_entries`, the broker of --config's `broker` section). On a locked-down broker it logs in with
--credentials, the aggregator login `carechain bridge acl` wrote for this miner (`aggregators/<id>.json`,
user `carechain-aggregator-<id>`, the only login that may write that topic): the broker ties client ids to
logins, so the miner's own login would knock its running miner service off. The bridge's
`chain_bridge.study_intake` decides the result with the contract rules and appends it.

With --audit it audits instead (docs/market.md, "Audits"): --inputs is `audit_inputs_from_leaves`'s document
(the study's sampled contributions its owners disclosed, with their `study.disclose` keys and blobs and the
cited leaves as the ledger holds them). The parties input their share rows of those contributions and open
the vectors to each other only (`mpc.output` to all parties: the aggregators, whom the owners disclosed them
to; nobody else learns them); each then opens its own sealed disclosure key and judges every contribution on
its own (`carechain.contribution_audit.judge`), and writes {"entries": [hex of a signed `study.audit` per
judged contribution], "verdicts": [...], "skipped": [...], "stats": ...}; --publish sends every entry
(`publish_entries`), which the bridge's study intake checks with the rules like results.

Importing MPyC's runtime parses sys.argv, so `main` sets MPyC's options (-I, -P, --no-log) there before the
import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from carechain import contribution_audit, market
from carechain.config import BrokerConfig
from carechain.credentials import CredentialsError
from carechain.files import write_atomic
from carechain.identity import Identity
from contract_rules.runtime import Genesis, State

__all__ = ["OtherComputation", "audit_inputs_from_leaves", "inputs_from_leaves", "inputs_from_state", "job_fingerprint",
           "main", "publish_entries", "run", "run_audit"]

VALIDITY_COEFF_DOMAIN = b"carechain/market/validity-check/v1\x00"
# `carechain bridge acl`'s aggregator login per miner (chain_bridge.broker.acl.aggregator_user; parties do
# not import the bridge). Also the client id on a broker without logins.
AGGREGATOR_USER_PREFIX = "carechain-aggregator-"


def inputs_from_state(state: State, study_id: str) -> dict[str, Any]:
    """The aggregators' input document for `study_id` from a replayed contract state: the study record and,
    for every contribution the rules accepted, its leaf, its consent's `min_cohort` and its sealed shares.
    KeyError when the ledger holds no such study."""
    from contract_rules import market as market_rules  # noqa: PLC0415 - only the ledger path needs the rules

    study = market_rules.study_record(state, study_id)
    if study is None:
        raise KeyError(f"the ledger holds no study {study_id!r}")
    table = state.table(market_rules.CONTRIBUTIONS)
    contributions = []
    for leaf in study["contributions"]:
        c = table[str(leaf)]
        contributions.append({"leaf": int(leaf), "min_cohort": int(c["min_cohort"]),
                              "shares": [bytes(s).hex() for s in c["shares"]]})
    query = {k: v for k, v in study["query"].items() if v is not None}  # the record keeps bins: None
    return {"study": {"study_id": study_id, "query": query, "epsilon_milli": study["epsilon_milli"],
                      "aggregators": list(study["aggregators"]), "state": study["state"]},
            "contributions": contributions}


def inputs_from_leaves(genesis: Genesis, leaves: Iterable[bytes], study_id: str) -> dict[str, Any]:
    """`inputs_from_state` after replaying `leaves` (a whole log's, in order: a `LedgerReader`'s, or leaves
    fetched from the log) with `contract_rules.Replica` under `genesis`."""
    from contract_rules.replay import Replica  # noqa: PLC0415

    replica = Replica(genesis)
    replica.apply_leaves(leaves)
    return inputs_from_state(replica.state, study_id)


def audit_inputs_from_leaves(genesis: Genesis, leaves: Iterable[bytes], study_id: str) -> dict[str, Any]:
    """The aggregators' audit input document for `study_id`, from a whole log's `leaves` in order (replayed
    with `contract_rules.Replica` under `genesis`, so only what the rules accepted counts):

        {"study": {"study_id", "query", "from_ms", "to_ms", "aggregators": [ids]},
         "contributions": [{"leaf", "owner", "commitment", "leaves": [cited], "shares": [hex sealed row],
                            "epochs": [[dev, epoch]], "keys": [hex sealed disclosure key], "blob": hex}],
         "cited": {str(leaf): `CitedLeaf.to_json()`}}

    one contribution per sampled, disclosed one (the `study.disclose` entry's keys and blob), and every leaf
    they cite with the device registration in force there (`contribution_audit.cited_leaves`, the same walk
    the owner's agent makes). KeyError when the ledger holds no such study; ValueError when it is not sampled.
    """
    from carechain import envelope  # noqa: PLC0415
    from carechain.entries import Entry  # noqa: PLC0415
    from contract_rules import market as market_rules  # noqa: PLC0415
    from contract_rules import transactions as ce  # noqa: PLC0415
    from contract_rules.replay import Replica  # noqa: PLC0415

    leaves = list(leaves)
    replica = Replica(genesis)
    replica.apply_leaves(leaves)
    state = replica.state
    study = market_rules.study_record(state, study_id)
    if study is None:
        raise KeyError(f"the ledger holds no study {study_id!r}")
    audit = study.get("audit")
    if audit is None:
        raise ValueError(f"study {study_id} has no audit sample yet (no study.sample accepted)")
    table = state.table(market_rules.CONTRIBUTIONS)
    contributions = []
    for index in audit["sample"]:
        at = audit["disclosed"].get(str(index))
        if at is None:
            continue  # not disclosed (yet): nothing to audit
        c = table[str(index)]
        disclose = ce.StudyDisclose.model_validate(envelope.parse(Entry.decode(leaves[at]).cose).payload)
        contributions.append({"leaf": int(index), "owner": c["owner"], "commitment": c["commitment"],
                              "leaves": [int(leaf) for leaf in c["leaves"]],
                              "shares": [bytes(s).hex() for s in c["shares"]],
                              "epochs": [[e.dev, e.epoch] for e in disclose.epochs],
                              "keys": [k.hex() for k in disclose.keys], "blob": disclose.blob.hex()})
    wanted = {leaf for c in contributions for leaf in c["leaves"]}
    cited = contribution_audit.cited_leaves(enumerate(leaves), genesis.operators, wanted)
    query = {k: v for k, v in study["query"].items() if v is not None}
    return {"study": {"study_id": study_id, "query": query, "from_ms": study["from_ms"], "to_ms": study["to_ms"],
                      "aggregators": list(study["aggregators"])},
            "contributions": contributions, "cited": {str(leaf): c.to_json() for leaf, c in sorted(cited.items())}}


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


class OtherComputation(Exception):
    """A party that joined holds another computation (another study, kind or set of contributions)."""


def job_fingerprint(kind: str, study: dict[str, Any], leaves: Iterable[int]) -> str:
    """What every party of one computation holds alike: its kind, the study as the ledger fixes it and the
    contributions computed on (SHA-256 of their canonical JSON)."""
    import hashlib  # noqa: PLC0415

    doc = {"kind": kind, "study": study, "leaves": sorted(leaves)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _open_computation(mpc: Any, fingerprint: str, rows: dict[int, list[int] | None]
                            ) -> tuple[Any, list[int], set[int]]:
    """Start MPyC, check that every party computes the same job, and agree on the contributions some aggregator
    could not use: (the secure integer type, the leaves kept, the leaves dropped as unusable).

    Two studies' computations whose ports collide can meet (docs/market.md, known limit): without this check
    their parties would mix inputs and could open, and sign, an answer that belongs to neither."""
    await mpc.start()
    strangers = [pid for pid, theirs in enumerate(await mpc.transfer(fingerprint)) if theirs != fingerprint]
    if strangers:
        raise OtherComputation(f"party/parties {strangers} hold another computation (another study, kind or set "
                               f"of contributions): nothing computed")
    secint = mpc.SecInt(32)
    if secint.field.modulus != market.FIELD_MODULUS:
        raise RuntimeError("MPyC's SecInt(32) field is not the one contributors share in")
    local_bad = sorted(leaf for leaf, row in rows.items() if row is None)
    unusable = set().union(*(set(b) for b in await mpc.transfer(local_bad)))
    return secint, sorted(leaf for leaf in rows if leaf not in unusable), unusable


async def _compute(mpc: Any, fingerprint: str, query: market.Query, rows: dict[int, list[int] | None],
                   mins: dict[int, int], epsilon_milli: int) -> dict[str, Any]:
    # 1. the same job everywhere, and the union of contributions some aggregator could not use
    secint, kept, _unusable = await _open_computation(mpc, fingerprint, rows)
    field = secint.field
    w = query.width

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
    if query.type != "count" and consistent:
        coeffs = _coefficients(int(await mpc.output(mpc._random(secint))) % market.FIELD_MODULUS, w + 1)
    span = query.hi - query.lo
    offsets: dict[int, Any] = {}  # leaf → value − lo = Σ 2**i·bᵢ, for value queries
    checks = []
    for leaf in consistent:
        x = inputs[leaf]
        if query.type == "count":
            checks.append(mpc.is_zero_public(x[0] - 1))
            continue
        defect = secint(0)
        for k, b in enumerate(x):
            defect += coeffs[k + 1] * (b * (b - 1))
        if query.type == "histogram":
            defect += coeffs[0] * (mpc.sum(x) - 1)
        else:
            offsets[leaf] = mpc.sum([b * (1 << i) for i, b in enumerate(x)])
            if span < (1 << w) - 1:  # otherwise every k-bit offset is ≤ span: no comparison needed
                # [span − offset < 0] on (k+1)-bit numbers: exact, as |span − offset| < 2**k, and cheaper
                # than a full 32-bit comparison for the usual small k
                defect += coeffs[0] * mpc.sgn(span - offsets[leaf], l=w + 1, LT=True)
        checks.append(mpc.is_zero_public(defect))
    bits = [bool(b) for b in await mpc.gather(checks)] if checks else []
    valid = [leaf for leaf, ok in zip(consistent, bits, strict=True) if ok]

    # 4. the cohort rule, then the aggregate over the included set only
    included = market.cohort([(leaf, mins[leaf]) for leaf in valid])
    answer: dict[str, Any] | None = None
    if included:
        if query.type == "count":
            answer = {"count": len(included)}
        else:
            if query.type == "histogram":
                totals = [mpc.sum([inputs[leaf][k] for leaf in included]) for k in range(w)]
            else:
                totals = [mpc.sum([offsets[leaf] for leaf in included]) + query.lo * len(included)]
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
    return [int.from_bytes(hashlib.sha256(VALIDITY_COEFF_DOMAIN + seed + k.to_bytes(2, "big")).digest(), "big")
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


def run(args: argparse.Namespace, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run this aggregator's MPC party for `args.study` on `inputs` (the `inputs_from_leaves` document; read
    from --inputs when None); the signed result entry, its payload and stats."""
    started = time.perf_counter()
    spec: dict[str, Any] = json.loads(Path(args.inputs).read_text()) if inputs is None else inputs
    study = spec["study"]
    identity, peers = _this_party(args, study)
    query = market.Query.model_validate(study["query"])
    contributions = spec["contributions"]
    rows = _own_rows(identity, args.index, query, contributions)
    mins = {int(c["leaf"]): int(c["min_cohort"]) for c in contributions}
    if len(mins) != len(contributions):
        raise SystemExit("--inputs lists a contribution leaf twice")

    mpc = _mpyc_party(args, peers)

    fingerprint = job_fingerprint("result", study, mins)
    out = mpc.run(_compute(mpc, fingerprint, query, rows, mins, int(study.get("epsilon_milli", 0))))
    ts = args.ts if args.ts is not None else int(time.time() * 1000)
    payload = market.result_payload(study["study_id"], valid=out["valid"], invalid=out["invalid"],
                                    included=out["included"], answer=out["answer"],
                                    epsilon_milli=int(study.get("epsilon_milli", 0)), ts=ts)
    entry = market.result_entry(identity, payload)
    return {"entry": entry.encode().hex(), "payload": payload,
            "stats": {"bytes_sent": out["bytes_sent"], "seconds": time.perf_counter() - started,
                      "contributions": len(contributions)}}


async def _open_vectors(mpc: Any, fingerprint: str, rows: dict[int, list[int] | None]
                        ) -> tuple[dict[int, list[int]], list[int], int]:
    """Open the shared vectors of `rows` (leaf → this party's row) to the aggregators, and only to them; the
    leaves some aggregator could not use, which are not opened; the bytes this party sent."""
    secint, kept, unusable = await _open_computation(mpc, fingerprint, rows)
    field = secint.field
    shared = [secint(field(s)) for leaf in kept for s in rows[leaf] or []]
    opened = [int(v) for v in await mpc.output(shared)] if shared else []  # to every party: the aggregators
    vectors: dict[int, list[int]] = {}
    for leaf in kept:
        width = len(rows[leaf] or [])
        vectors[leaf], opened = [market.signed(v) for v in opened[:width]], opened[width:]
    sent = sum(p.protocol.nbytes_sent for p in mpc.parties if p.pid != mpc.pid)
    await mpc.shutdown()
    return vectors, sorted(unusable), sent


def run_audit(args: argparse.Namespace, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run this aggregator's party of the audit MPC for `args.study` on `inputs` (the
    `audit_inputs_from_leaves` document; read from --inputs when None): open the sampled vectors among the
    aggregators, judge each contribution on its own (`contribution_audit.judge`), and sign one `study.audit`
    entry per judged contribution. A contribution whose shares some aggregator could not use is not opened
    and gets no verdict ("skipped"; the rules accepted it, so it is not the contributor's fault)."""
    from contract_rules import transactions as ce  # noqa: PLC0415

    started = time.perf_counter()
    spec: dict[str, Any] = json.loads(Path(args.inputs).read_text()) if inputs is None else inputs
    study = spec["study"]
    identity, peers = _this_party(args, study)
    query = market.Query.model_validate(study["query"])
    contributions = sorted(spec["contributions"], key=lambda c: int(c["leaf"]))
    if len({int(c["leaf"]) for c in contributions}) != len(contributions):
        raise SystemExit("--inputs lists a contribution leaf twice")
    rows = _own_rows(identity, args.index, query, contributions)
    cited = {int(leaf): contribution_audit.CitedLeaf.from_json(doc) for leaf, doc in spec["cited"].items()}

    mpc = _mpyc_party(args, peers)

    vectors, skipped, sent = mpc.run(_open_vectors(mpc, job_fingerprint("audit", study, rows), rows))
    ts = args.ts if args.ts is not None else int(time.time() * 1000)
    entries, verdicts = [], []
    for c in contributions:
        leaf = int(c["leaf"])
        if leaf not in vectors:
            continue
        try:
            disclosure: contribution_audit.Disclosure | None = contribution_audit.open_disclosure(
                identity, bytes.fromhex(c["keys"][args.index]), bytes.fromhex(c["blob"]), study["study_id"], leaf)
        except (contribution_audit.DisclosureError, IndexError, ValueError):
            disclosure = None
        verdict = contribution_audit.judge(
            vectors[leaf], disclosure, owner=c["owner"], contribution=leaf, commitment=c["commitment"],
            leaves=c["leaves"], query=study["query"], from_ms=int(study["from_ms"]), to_ms=int(study["to_ms"]),
            cited=cited, epochs=[(dev, int(epoch)) for dev, epoch in c["epochs"]])
        entry = ce.study_audit_entry(identity, ce.StudyAudit(study_id=study["study_id"], contribution=leaf,
                                                             verdict=verdict.verdict, reason=verdict.reason, ts=ts))
        entries.append(entry.encode().hex())
        verdicts.append({"contribution": leaf, "verdict": verdict.verdict, "reason": verdict.reason})
    return {"entries": entries, "verdicts": verdicts, "skipped": skipped,
            "stats": {"bytes_sent": sent, "seconds": time.perf_counter() - started,
                      "contributions": len(contributions)}}


def _mpyc_party(args: argparse.Namespace, peers: list[str]) -> Any:
    """MPyC's runtime for party `args.index` of `peers`, over mutually authenticated TLS with the files in
    `args.mpc_tls`/.config (chain_miner.mpc_tls); in the clear only when `args.plaintext` says so."""
    tls = _channel(args)
    options = ["-I", str(args.index), "--no-log"] + [a for p in peers for a in ("-P", p)]
    if tls is not None:
        os.chdir(tls)  # MPyC reads its TLS files from .config of the working directory
        options.append("--ssl")
    sys.argv = [sys.argv[0], *options]
    from mpyc.runtime import mpc  # noqa: PLC0415 - reads sys.argv at import

    return mpc


def _channel(args: argparse.Namespace) -> Path | None:
    """The --mpc-tls directory, its files checked; None with --plaintext. SystemExit when neither is given."""
    tls: Path | None = getattr(args, "mpc_tls", None)
    if tls is None:
        if getattr(args, "plaintext", False):
            return None
        raise SystemExit("aggregator: the MPC channels carry shares: give --mpc-tls DIR (DIR/.config holds "
                         "party_<index>.crt and .key and mpyc_ca.crt, see chain_miner.mpc_tls), or --plaintext for "
                         "parties that all run on this one host")
    config = Path(tls) / ".config"
    needed = [config / f"party_{args.index}.crt", config / f"party_{args.index}.key", config / "mpyc_ca.crt"]
    absent = [str(f) for f in needed if not f.is_file()]
    if absent:
        raise SystemExit(f"aggregator: --mpc-tls {tls}: missing {', '.join(absent)}")
    return Path(tls)


def _this_party(args: argparse.Namespace, study: dict[str, Any]) -> tuple[Identity, list[str]]:
    """This aggregator's key and the peers' addresses, checked against the study: SystemExit when they do not
    fit (another study's inputs, a key that is not aggregator --index, one address per aggregator)."""
    if study["study_id"] != args.study:
        raise SystemExit(f"--inputs holds study {study['study_id']!r}, not {args.study!r}")
    peers = args.peers.split(",")
    identity = Identity.load(Path(args.key))
    aggregators = study["aggregators"]
    if len(aggregators) != len(peers) or aggregators[args.index] != identity.device_id:
        raise SystemExit(f"this key ({identity.device_id}) is not aggregator {args.index} of the study's "
                         f"{len(aggregators)}, or --peers does not list one address per aggregator")
    return identity, peers


def publish_entries(broker: BrokerConfig, miner_id: str, *entries: bytes, timeout: float = 30.0) -> None:
    """Send signed entries (a `study.result`, `study.audit`s) to the bridge on `miner_id`'s study topic, in order
    (QoS 1, each acknowledged by the broker); TimeoutError when the broker does not take one within `timeout`
    seconds.

    `broker` may name a `credentials_file` (the miner's aggregator login); the client id is the login's user
    name, which a broker with `use_username_as_clientid` imposes anyway, so this session never collides with
    the miner service's (`carechain-miner-<id>`). A CredentialsError when that file is missing or unsafe."""
    import threading  # noqa: PLC0415

    from carechain import topics  # noqa: PLC0415
    from carechain.credentials import resolve_broker_login  # noqa: PLC0415
    from carechain.entries import Entry  # noqa: PLC0415
    from carechain.transport import connect_client  # noqa: PLC0415

    broker = resolve_broker_login(broker)
    client_id = broker.username or f"{AGGREGATOR_USER_PREFIX}{miner_id}"
    connected = threading.Event()
    client = connect_client(broker, client_id, connected=connected)
    try:
        if not connected.wait(timeout):
            raise TimeoutError(f"broker {broker.host}:{broker.port} unreachable or refusing {client_id} "
                               f"(aggregator of miner {miner_id})")
        for entry in entries:
            info = client.publish(topics.miner_study(miner_id), entry, qos=1)
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise TimeoutError(f"broker {broker.host}:{broker.port} did not take the {Entry.decode(entry).type} "
                                   f"entry of aggregator {miner_id}")
    finally:
        client.disconnect()
        client.loop_stop()




def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chain_miner.aggregator", description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="the study id")
    parser.add_argument("--index", type=int, required=True, help="this aggregator's 0-based place in the study")
    parser.add_argument("--peers", required=True, help="host:port of every aggregator, in the study's order")
    parser.add_argument("--key", required=True, help="this miner's key file (signs the result or the verdicts)")
    parser.add_argument("--inputs", required=True,
                        help="JSON file with the study and its contributions (`inputs_from_leaves`'s document; "
                             "with --audit, `audit_inputs_from_leaves`'s)")
    parser.add_argument("--audit", action="store_true",
                        help="audit the study's sampled, disclosed contributions instead of computing its result")
    parser.add_argument("--out", help="write the result here instead of stdout")
    parser.add_argument("--ts", type=int, help="the result's ts in ms (default: now)")
    parser.add_argument("--publish", action="store_true", help="send the entry to the bridge over the broker")
    parser.add_argument("--config", help="carechain config file whose `broker` section --publish uses")
    parser.add_argument("--credentials", type=Path,
                        help="--publish logs in with this MQTT login file (0600): the aggregator login "
                             "`carechain bridge acl` wrote for this miner, aggregators/<miner_id>.json")
    parser.add_argument("--tls-ca", type=Path, help="--publish connects over TLS, trusting only this CA")
    parser.add_argument("--mpc-tls", type=Path, metavar="DIR",
                        help="the MPC runs over mutually authenticated TLS with the files in DIR/.config: "
                             "party_<index>.crt and .key (this party's) and mpyc_ca.crt (every aggregator's "
                             "certificate, the only ones trusted); a miner's study runner writes them")
    parser.add_argument("--plaintext", action="store_true",
                        help="run the MPC in the clear (shares readable on the wire): only for parties that all "
                             "run on this one host")
    args = parser.parse_args(argv)
    _channel(args)  # before any work: no computation in the clear unless told
    args.inputs, args.key = Path(args.inputs).resolve(), Path(args.key).resolve()  # --mpc-tls changes directory
    if args.out:
        args.out = str(Path(args.out).resolve())
    if args.config:
        args.config = str(Path(args.config).resolve())
    for name in ("credentials", "tls_ca"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    try:
        result = run_audit(args) if args.audit else run(args)
    except OtherComputation as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return 3
    entries = result["entries"] if args.audit else [result["entry"]]
    text = json.dumps(result, sort_keys=True)
    if args.out:  # signed entries and what the party learnt: private, like the miner's data dir
        write_atomic(Path(args.out), (text + "\n").encode())
    else:
        print(text)
    if args.publish:
        from carechain.config import load_config  # noqa: PLC0415

        broker = load_config(Path(args.config) if args.config else None).broker
        if args.credentials is not None:  # replaces the config's login: the miner's own would evict its service
            broker = broker.model_copy(update={"credentials_file": args.credentials, "username": None,
                                               "password": None})
        if args.tls_ca is not None:
            broker = broker.model_copy(update={"tls_ca": args.tls_ca})
        try:
            publish_entries(broker, Identity.load(Path(args.key)).device_id, *map(bytes.fromhex, entries))
        except CredentialsError as exc:
            print(f"aggregator: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
