"""Miner benchmark: what judging a checkpoint and restarting cost a miner, by log size.

  judge_ms    a checkpoint of 100 new, realistic leaves (sealed readings, activity readings, sales with and
              without a prescription, paid by card and by insurance, token transfers: all signed, all run
              through the rules) judged by `ContractWitness` on a contract state of N leaves. Median of
              `--rounds` checkpoints. The witness keeps an undo journal of what the range changed, not a
              copy of the state, so this must not grow with N.
  restart_s   a miner restarted at a 1,000,000-leaf log: restore its contract snapshot from the file and
              replay the cosigned leaves after it — `chain_miner.snapshots.SNAPSHOT_EVERY` of them, the
              worst case (it stopped just before taking the next snapshot, and without saving at stop).
              Fetching those leaves from the log is not counted (network).

The N-leaf states are built synthetically, not by replaying N signed entries: a few hundred real entries
(parties, terminals, wearables, policies, prescriptions) through the runtime, then contract tables filled in
the proportions of a log of N leaves — per 1,000 leaves: 700 `seen` events, 50 activity records, 20 claims,
10 prescriptions, 5 devices, 0.5 policies and balances, 0.2 parties — and `results` for every leaf. The
rules run are the first versions (tokens, prescriptions, insurance v2), which a pre-bond log pins.

Timings are one run on this machine; judge_ms should stay flat across N, restart_s grows with the tables.

    python bench/miner.py [--sizes 10000,100000,1000000,10000000] [--restart-size 1000000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import contract_rules  # noqa: E402
from carechain import envelope  # noqa: E402
from carechain.entries import ENTRY_REGISTER, Entry, Registration, event_entry  # noqa: E402
from carechain.events import Activity, Purchase, make_payload, make_sealed_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.merkle import extend_frontier, frontier_root, leaf_hash  # noqa: E402
from chain_miner.snapshots import SNAPSHOT_EVERY, MinerSnapshots  # noqa: E402
from chain_miner.witness import WitnessState  # noqa: E402
from contract_rules import ContractWitness, Genesis, Runtime  # noqa: E402
from contract_rules import transactions as ce  # noqa: E402
from contract_rules.runtime import OK, code_hash_of  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
CHECKPOINT = 100  # leaves per judged checkpoint
T0 = int(datetime.datetime(2026, 11, 16, tzinfo=datetime.UTC).timestamp() * 1000)
DAY = 86_400_000
RX_DRUG, FLU_SHOT = "70882-114-20", "49281-0621-15"
FIRST_RULES = (("tokens", "tokens"), ("prescriptions", "prescriptions"), ("insurance", "insurance_v2"),
               ("storage", "storage"), ("access", "access"))


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(4, "big") * 8)


class Log:
    """Signed, realistic entries for the rules, from the parties one deployment has."""

    def __init__(self, patients: int = 40, terminals: int = 4) -> None:
        rules = Path(contract_rules.__file__).parent
        self.operator, self.prescriber, self.pharmacy, self.insurer = ident(1), ident(2), ident(3), ident(4)
        self.terminals = [ident(100 + i) for i in range(terminals)]
        self.wearables = [ident(1000 + i) for i in range(patients)]
        self.patients = [f"pt-{i}" for i in range(patients)]
        self.genesis = Genesis(
            operators={self.operator.device_id: self.operator.public_key},
            allocations={f"insurer:{self.insurer.device_id}": 10**15, "pool:miners": 10**9},
            contracts={name: code_hash_of((rules / f"{module}.py").read_bytes()) for name, module in FIRST_RULES})
        self.seq: dict[str, int] = {}
        self.nonce = 0
        self.rx_refs: list[str] = []

    def setup(self) -> list[Entry]:
        """Parties, terminals, wearables and policies: what the judged entries need on the ledger."""
        out = [ce.signed(self.operator, ce.PARTY_REGISTER, ce.PartyRegistration(role=role, pk=who.public_key,
                                                                                name=role, ts=T0))
               for role, who in (("prescriber", self.prescriber), ("pharmacy", self.pharmacy),
                                 ("insurer", self.insurer))]
        devices = [(t, "pharmacy_terminal", self.pharmacy.device_id) for t in self.terminals]
        devices += [(w, "heart_rate_band", p) for w, p in zip(self.wearables, self.patients, strict=True)]
        for dev, profile, owner in devices:
            reg = Registration(dev=dev.device_id, pk=dev.public_key, profile=profile, owner=owner, site="s", ts=T0)
            out.append(Entry(ENTRY_REGISTER, envelope.sign(self.operator, reg.model_dump())))
        coverage = [ce.CoverageRule(category="immunization", bp=10_000, items=[f"ndc:{FLU_SHOT}"]),
                    ce.CoverageRule(category="generic", bp=8_000, items=[f"ndc:{RX_DRUG}"])]
        for patient in self.patients:
            out.append(ce.signed(self.insurer, ce.POLICY_REGISTER, ce.PolicyRegistration(
                policy_id=f"pol-{patient}", patient_token=patient, coverage=coverage,
                wellness=ce.Wellness(min_active_minutes=150, rebate_minor=2_500), ts=T0)))
        return out

    def prescriptions(self, n: int) -> list[Entry]:
        out = []
        for _ in range(n):
            patient = self.patients[len(self.rx_refs) % len(self.patients)]
            rx = ce.Prescription(prescriber=self.prescriber.device_id, patient_token=patient, drug_code=RX_DRUG,
                                 code_system="ndc", quantity=1, refills=0, expires_ms=T0 + 300 * DAY,
                                 controlled=False, issued_ms=T0, nonce=len(self.rx_refs).to_bytes(16, "big"))
            out.append(ce.signed(self.prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, T0)))
            self.rx_refs.append(rx.rx_ref())
        return out

    def event(self, dev: Identity, kind: str, body: object, ts: int, *, v: int = 2) -> Entry:
        seq = self.seq.get(dev.device_id, 0)
        self.seq[dev.device_id] = seq + 1
        if body is None:  # a sealed reading: only its ciphertext hash is on the ledger
            payload = make_sealed_payload(dev.device_id, seq, ts, kind, 0, seq.to_bytes(32, "big"))
        else:
            payload = make_payload(dev.device_id, seq, ts, kind, body, v=v)  # type: ignore[arg-type]
        return event_entry(envelope.sign(dev, payload))

    def checkpoint(self, round_: int, rx_refs: list[str]) -> list[Entry]:
        """100 leaves: 30 sealed readings, 20 activity readings, 10 Rx sales, 20 OTC sales, 20 transfers."""
        out: list[Entry] = []
        ts = T0 + DAY + round_ * 60_000
        for i in range(30):
            out.append(self.event(self.wearables[i % len(self.wearables)], "heart_rate", None, ts))
        for i in range(20):
            out.append(self.event(self.wearables[i % len(self.wearables)], "activity",
                                  Activity(steps=1_000, active_minutes=10 + i), ts, v=1))
        for i, rx_ref in enumerate(rx_refs):
            out.append(self._sale(i, RX_DRUG, True, rx_ref, "insurance", ts))
        for i in range(20):
            out.append(self._sale(i, FLU_SHOT, False, None, "insurance" if i % 2 else "card", ts))
        for _ in range(20):
            self.nonce += 1
            out.append(ce.signed(self.insurer, ce.TOKEN_TRANSFER,
                                 ce.TokenTransfer(to="pool:miners", amount=7, nonce=self.nonce)))
        return out

    def _sale(self, i: int, item: str, rx_only: bool, rx_ref: str | None, pay: str, ts: int) -> Entry:
        patient = self.patients[i % len(self.patients)] if rx_ref is None else \
            self.patients[self.rx_refs.index(rx_ref) % len(self.patients)]
        body = Purchase(item_code=item, code_system="ndc", rx_only=rx_only, quantity=1, price_minor=1_250,
                        currency="USD", patient_token=patient, payment_method=pay, rx_ref=rx_ref)
        return self.event(self.terminals[i % len(self.terminals)], "purchase", body, ts)


def synthetic_witness(log: Log, size: int, rx_needed: int) -> ContractWitness:
    """A miner's ContractWitness at a log of `size` leaves (see the module docstring)."""
    runtime = Runtime(log.genesis)
    for entry in [*log.setup(), *log.prescriptions(rx_needed)]:
        assert runtime.apply(entry) == OK, "the benchmark's setup entries must all be accepted"
    state = runtime.state
    real = state.size
    assert size > real
    filler = size - real
    tables = state.tables

    def fill(table: str, per_thousand: float, key: str, value: object) -> None:
        t = tables.setdefault(table, {})
        for k in range(int(filler * per_thousand / 1000)):
            t[key.format(k)] = value

    # Values shared between filler keys: what is measured is the cost of lookups in tables of this many
    # keys, and a snapshot encodes each key's value in full either way.
    fill("seen", 700, "f{:x}:0", 0)
    fill("activity", 50, "pt-f{}:2026-11-01", [30, 0])
    fill("claims", 20, "c{}", {"policy": "pol-x", "pharmacy": "pharmacy:x", "amount": 1_000, "item": f"ndc:{FLU_SHOT}"})
    fill("rx", 10, "{:064x}", {"prescriber": log.prescriber.device_id, "patient": "pt-x", "drug": f"ndc:{RX_DRUG}",
                               "quantity": 1, "refills": 0, "fills": 1, "expires_ms": T0, "revoked_at": None})
    fill("devices", 5, "fdev{:012d}", {"pk": bytes(32), "profile": "heart_rate_band", "owner": "pt-x", "at": 0,
                                       "revoked_at": None})
    fill("policies", 0.5, "pt-f{}", {"policy_id": "pol-x", "insurer": log.insurer.device_id, "coverage": [],
                                     "wellness": None, "at": 0})
    fill("parties", 0.2, "fparty{:010d}", {"role": "pharmacy", "pk": bytes(32), "name": "x", "at": 0})
    for k in range(int(filler * 0.5 / 1000)):
        state.balances[f"patient:f{k}"] = 1_000
    state.balances["pool:filler"] = 0
    state.balances.pop("pool:filler")
    state.results.extend([i, OK] for i in range(real, size))
    state.size = size
    witness = ContractWitness(log.genesis)
    witness.runtime.state = state
    return witness


def judge_ms(size: int, rounds: int) -> float:
    """Median milliseconds to judge one 100-leaf checkpoint on a `size`-leaf state."""
    log = Log()
    witness = synthetic_witness(log, size, rounds * 10)
    batches = [[e.encode() for e in log.checkpoint(r, log.rx_refs[r * 10:(r + 1) * 10])] for r in range(rounds)]
    timings = []
    gc.collect()
    for leaves in batches:
        old = witness.size
        t0 = time.perf_counter()
        violation = witness(old, old + len(leaves), leaves)
        timings.append((time.perf_counter() - t0) * 1000)
        assert violation is None and not witness.voids, (violation, witness.voids[:3])
    return round(statistics.median(timings), 2)


def restart_s(size: int, every: int) -> dict[str, object]:
    """Save a snapshot of a `size`-leaf state, then time a restart: restore it and replay `every` leaves."""
    log = Log()
    rounds = every // CHECKPOINT
    witness = synthetic_witness(log, size, rounds * 10)
    tail = [e.encode() for r in range(rounds) for e in log.checkpoint(r, log.rx_refs[r * 10:(r + 1) * 10])]
    # The snapshot's tree: the synthetic leaves are not real, so its frontier is made up (any hashes of the
    # right count); the cosigned root is that frontier extended by the tail, as the miner checks it.
    frontier = tuple(bytes([i + 1]) * 32 for i in range(bin(size).count("1")))
    at_snapshot = WitnessState("bench", size, frontier_root(frontier), None, frontier)
    grown = extend_frontier(size, frontier, [leaf_hash(e) for e in tail])
    cosigned = WitnessState("bench", size + len(tail), frontier_root(grown), None, grown)
    with tempfile.TemporaryDirectory(prefix="cc-bench-miner-") as tmp:
        t0 = time.perf_counter()
        assert MinerSnapshots(Path(tmp), witness, every=every).save(at_snapshot)
        save_s = time.perf_counter() - t0
        snapshot_bytes = (Path(tmp) / "contracts.snapshot").stat().st_size
        del witness
        gc.collect()
        t0 = time.perf_counter()
        restarted = ContractWitness(log.genesis)
        keeper = MinerSnapshots(Path(tmp), restarted, every=every)
        assert keeper.restore(cosigned) == size
        restore_s = time.perf_counter() - t0
        replayed = keeper.catch_up(cosigned, lambda old, new: tail[old - size:new - size])
        total_s = time.perf_counter() - t0
    assert replayed is not None and len(replayed.entries) == len(tail) and not restarted.voids
    return {"restart_s": round(total_s, 2), "restore_s": round(restore_s, 2), "tail_leaves": len(tail),
            "snapshot_save_s": round(save_s, 2), "snapshot_mb": round(snapshot_bytes / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="log sizes for judge_ms")
    ap.add_argument("--restart-size", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5, help="checkpoints judged per size (median reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    judge: dict[str, float] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        say(f"judging {CHECKPOINT}-leaf checkpoints on a {size:,}-leaf state…")
        judge[str(size)] = judge_ms(size, args.rounds)
        say(f"  {judge[str(size)]} ms")
        gc.collect()
    say(f"restarting from a {args.restart_size:,}-leaf snapshot + {SNAPSHOT_EVERY:,} leaves…")
    restart = restart_s(args.restart_size, SNAPSHOT_EVERY)
    result = {"judge_ms": judge, "checkpoint_leaves": CHECKPOINT, "restart_size": args.restart_size, **restart}
    if args.json:
        print(json.dumps(result))
    else:
        say(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
