"""Miner benchmark: what judging a checkpoint and restarting cost a miner, by log size, under today's rules.

  judge_ms    a checkpoint of 100 new leaves, the mix of a deployment today, judged by `ContractWitness` on a
              contract state of N leaves (median of `--rounds` checkpoints). Per checkpoint: the bridge's
              `clock.attest`; 60 sealed v2 readings (anchored as ciphertext hashes); 24 sales that pass the
              formulary, each paid with the patient's wallet signature (`pay_with_wallet`): 8 Rx sales citing an
              anchored Rx and 8 flu shots claimed from her insurer, 8 OTC analgesics paid in tokens; 13 token
              transfers; one sale the rules refuse recorded by the bridge as `sale.refused`, and one appended as
              is, which the witness records as void (both slash the pharmacy's bond). All signed, all run through
              the rules. The witness keeps an undo journal, not a copy of the state, so this must not grow with N.
  restart_s   a miner restarted at a 1,000,000-leaf log: restore its contract snapshot from the file and
              replay the cosigned leaves after it — `chain_miner.snapshots.SNAPSHOT_EVERY` of them, the
              worst case (it stopped just before taking the next snapshot, and without saving at stop).
              Fetching those leaves from the log is not counted (network).
  rules       the rule versions measured: the newest shipped (`contract_rules.builtin_hashes()`), what a new
              deployment's genesis pins.

The N-leaf states are built synthetically, not by replaying N signed entries: a few hundred real entries
(authority and formulary, pharmacies, insurer and miners with their bonds, 40 patients with wearables and
consented policies, terminals, prescriptions, attested time) through the runtime, then the contract tables
filled in the proportions of a log of N leaves of the checkpoint's mix (`PER_THOUSAND`): patients, their
devices, balances and policies, the pharmacies', insurers' and miners' parties and bonds, `seen`, payment and
transfer nonces, claims, prescriptions, epoch keys, voids; a 20,000-item formulary; `results` for every leaf.

Timings are one run on this machine; judge_ms should stay flat across N, restart_s grows with the tables.

    python bench/miner.py [--sizes 10000,100000,1000000,10000000] [--restart-size 1000000] [--rounds 5] [--json]
    python bench/miner.py --quick [--json]     # sizes 10k and 100k, a 100k-leaf restart, 3 rounds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from carechain import envelope  # noqa: E402
from carechain.entries import ENTRY_REGISTER, Entry, Registration, event_entry  # noqa: E402
from carechain.events import Purchase, make_payload, make_sealed_payload  # noqa: E402
from carechain.identity import Identity  # noqa: E402
from carechain.merkle import extend_frontier, frontier_root, leaf_hash  # noqa: E402
from chain_miner.snapshots import SNAPSHOT_EVERY, MinerSnapshots  # noqa: E402
from chain_miner.witness import WitnessState  # noqa: E402
from contract_rules import ContractWitness, Genesis, Runtime, builtin_hashes  # noqa: E402
from contract_rules import transactions as ce  # noqa: E402
from contract_rules.bonds import MIN_BOND  # noqa: E402
from contract_rules.runtime import OK, Results  # noqa: E402
from simulators.pharmacy_terminal import pay_with_wallet  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 100_000)
CHECKPOINT = 100  # leaves per judged checkpoint
RX_SALES = 8  # Rx sales per checkpoint: each fills one prescription anchored at setup
VOID_REASON = "rx_missing"  # the one void leaf of each checkpoint: an Rx-only sale without an Rx
T0 = int(datetime.datetime(2026, 11, 16, tzinfo=datetime.UTC).timestamp() * 1000)
DAY, HOUR = 86_400_000, 3_600_000
AMOXICILLIN, FLU_SHOT, ANALGESIC = "70882-114-20", "49281-0621-15", "70000-0036-1"
SEALED = ("heart_rate", "spo2", "activity", "temperature", "blood_pressure", "heart_rate")  # heart rate: 1 in 3
FORMULARY_ITEMS = 20_000  # a national drug formulary's order of magnitude (not scaled with N)
PHARMACY_BOND = 20 * MIN_BOND["pharmacy"]  # covers the slashes of a restart tail's refused sales
PATIENT_FUNDS = 10**8
# Filler rows per 1,000 leaves of history, in the checkpoint's proportions (plus what a log accumulates).
PER_THOUSAND: dict[str, float] = {
    "seen": 260,  # every clear event: 24 sales + 2 refused per 100 leaves, epoch keys
    "payment_nonces": 240,  # one per wallet-paid sale
    "claims": 160,  # the insurance-paid ones
    "nonces": 130,  # token transfers
    "rx": 30,  # prescriptions (filled about three times each)
    "epochs": 10,  # one epoch key per device and hour
    "void": 10,  # refused sales appended as is
    "activity": 20,  # v1 daily activity, before readings were sealed
    "weekly_activity": 2,
    "patients": 5,  # patient parties (50,000 at 10M leaves), each with a balance, and:
    "devices": 10,  # two wearables per patient
    "policies": 4,  # four in five patients insured
    "pharmacies": 0.02,  # with a bond, a terminal, a violation count
    "prescribers": 0.05,
    "insurers": 0.002,
    "miners": 0.005,  # registered miners (`miner_ids`), bonded
}


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(4, "big") * 8)


# One letter per kind of filler id, so that no two filler rows of `parties` or `devices` share a key.
FILLER_PREFIX = {"patient": "a", "pharmacies": "b", "prescribers": "c", "insurers": "e", "miners": "f",
                 "device": "g", "terminal": "h"}


def filler_id(kind: str, k: int) -> str:
    """A 16-character party or device id for filler row `k` (digits: never a real, base32 id)."""
    return f"{FILLER_PREFIX[kind]}{k:015d}"


class Log:
    """Signed, realistic entries for today's rules, from the parties one deployment has."""

    def __init__(self, patients: int = 40, pharmacies: int = 4) -> None:
        self.operator, self.authority, self.prescriber, self.insurer = ident(1), ident(2), ident(3), ident(4)
        self.pharmacies = [ident(10 + i) for i in range(pharmacies)]
        self.terminals = [ident(100 + i) for i in range(pharmacies)]
        self.miners = [ident(200 + i) for i in range(3)]
        self.patients = [ident(1000 + i) for i in range(patients)]
        self.wearables = [ident(5000 + i) for i in range(patients)]
        allocations = {f"insurer:{self.insurer.device_id}": 10**12, "pool:miners": 10**9}
        allocations |= {f"pharmacy:{p.device_id}": PHARMACY_BOND for p in self.pharmacies}
        allocations |= {f"miner:{m.device_id}": MIN_BOND["miner"] for m in self.miners}
        allocations |= {f"patient:{p.device_id}": PATIENT_FUNDS for p in self.patients}
        self.genesis = Genesis(operators={self.operator.device_id: self.operator.public_key},
                               allocations=allocations, contracts=builtin_hashes())
        self.seq: dict[str, int] = {}
        self.nonce = 0
        self.rx: list[tuple[str, Identity]] = []  # (rx_ref, patient), in anchoring order
        self.policies: dict[str, dict[str, Any]] = {}  # patient id → ledger record, for insurance claims

    def setup(self) -> list[Entry]:
        """Parties, formulary, bonds, devices, consented policies, the time: what the judged entries need."""
        parties = [("authority", self.authority), ("prescriber", self.prescriber), ("insurer", self.insurer),
                   *(("pharmacy", p) for p in self.pharmacies), *(("miner", m) for m in self.miners),
                   *(("patient", p) for p in self.patients)]
        out = [ce.signed(self.operator, ce.PARTY_REGISTER, ce.PartyRegistration(role=role, pk=who.public_key,
                                                                                name=role, ts=T0))
               for role, who in parties]
        out.append(ce.formulary_set_entry(self.authority, ce.FormularySet(items=[
            ce.FormularyItem(item=f"ndc:{AMOXICILLIN}", rx_only=True, schedule=0, max_quantity=10),
            ce.FormularyItem(item=f"ndc:{FLU_SHOT}", rx_only=False, schedule=0, max_quantity=20),
            ce.FormularyItem(item=f"ndc:{ANALGESIC}", rx_only=False, schedule=0, max_quantity=20)], ts=T0)))
        bonded = [*((p, PHARMACY_BOND) for p in self.pharmacies), (self.insurer, 10 * MIN_BOND["insurer"]),
                  *((m, MIN_BOND["miner"]) for m in self.miners)]
        for who, amount in bonded:
            out.append(ce.signed(who, ce.BOND_POST, ce.BondPost(amount=amount, nonce=self._next_nonce(), ts=T0)))
        devices = [(t, "pharmacy_terminal", p.device_id) for t, p in zip(self.terminals, self.pharmacies, strict=True)]
        devices += [(w, "heart_rate_band", p.device_id) for w, p in zip(self.wearables, self.patients, strict=True)]
        for dev, profile, owner in devices:
            reg = Registration(dev=dev.device_id, pk=dev.public_key, profile=profile, owner=owner, site="s", ts=T0)
            out.append(Entry(ENTRY_REGISTER, envelope.sign(self.operator, reg.model_dump())))
        coverage = [ce.CappedCoverage(category="immunization", bp=10_000, caps={f"ndc:{FLU_SHOT}": 2_500}),
                    ce.CappedCoverage(category="generic", bp=8_000, caps={f"ndc:{AMOXICILLIN}": 1_000})]
        for patient in self.patients:
            offer = ce.PolicyOffer(policy_id=f"pol-{patient.device_id}", patient=patient.device_id,
                                   coverage=coverage, wellness=ce.Wellness(min_active_minutes=150, rebate_minor=2_500),
                                   ts=T0)
            consent = ce.sign_policy_consent(patient, self.insurer.device_id, offer)
            out.append(ce.signed(self.insurer, ce.POLICY_REGISTER, ce.consented_policy(offer, consent)))
        out.append(ce.clock_attest_entry(self.operator, T0))
        return out

    def prescriptions(self, n: int) -> list[Entry]:
        out = []
        for _ in range(n):
            patient = self.patients[len(self.rx) % len(self.patients)]
            rx = ce.Prescription(prescriber=self.prescriber.device_id, patient_token=patient.device_id,
                                 drug_code=AMOXICILLIN, code_system="ndc", quantity=1, refills=0,
                                 expires_ms=T0 + 300 * DAY, controlled=False, issued_ms=T0,
                                 nonce=len(self.rx).to_bytes(16, "big"))
            out.append(ce.signed(self.prescriber, ce.RX_ANCHOR, ce.rx_anchor_for(rx, T0)))
            self.rx.append((rx.rx_ref(), patient))
        return out

    def _next_nonce(self) -> int:
        self.nonce += 1
        return self.nonce

    def _event(self, dev: Identity, payload_of: Callable[[int], dict[str, Any]]) -> Entry:
        seq = self.seq.get(dev.device_id, 0)
        self.seq[dev.device_id] = seq + 1
        return event_entry(envelope.sign(dev, payload_of(seq)))

    def sealed_reading(self, wearable: Identity, kind: str, ts: int) -> Entry:
        """A v2 reading: only the hash of its ciphertext (and its epoch) is signed and anchored."""
        def payload(seq: int) -> dict[str, Any]:
            ct_hash = hashlib.sha256(f"{wearable.device_id}:{seq}".encode()).digest()
            return make_sealed_payload(wearable.device_id, seq, ts, kind, ts // HOUR, ct_hash)
        return self._event(wearable, payload)

    def sale(self, k: int, item: str, ts: int, *, method: str, quantity: int = 1,
             rx: tuple[str, Identity] | None = None, wallet: bool = True) -> Entry:
        """Terminal `k`'s sale for a patient, paid with her wallet's signature unless `wallet` is False."""
        terminal = self.terminals[k % len(self.terminals)]
        patient = rx[1] if rx is not None else self.patients[k % len(self.patients)]
        body = Purchase(item_code=item, code_system="ndc", rx_only=rx is not None, quantity=quantity,
                        price_minor=1_250 * quantity, currency="USD", patient_token=patient.device_id,
                        payment_method=method, rx_ref=rx[0] if rx is not None else None)
        if wallet:
            body = pay_with_wallet(body, terminal.device_id, patient, self.policies.get(patient.device_id),
                                   nonce=self._next_nonce())
        return self._event(terminal, lambda seq: make_payload(terminal.device_id, seq, ts, "purchase", body, v=2))

    def checkpoint(self, round_: int) -> list[Entry]:
        """The 100 leaves of checkpoint `round_` (see the module docstring); Rx sales fill its 8 prescriptions."""
        ts = T0 + DAY + round_ * 60_000
        out = [ce.clock_attest_entry(self.operator, ts)]
        wearables = self.wearables
        out += [self.sealed_reading(wearables[(round_ * 60 + i) % len(wearables)], SEALED[i % len(SEALED)], ts)
                for i in range(60)]
        out += [self.sale(i, AMOXICILLIN, ts, method="insurance", rx=rx)
                for i, rx in enumerate(self.rx[round_ * RX_SALES:(round_ + 1) * RX_SALES])]
        out += [self.sale(round_ + i, FLU_SHOT, ts, method="insurance") for i in range(8)]
        out += [self.sale(round_ + i, ANALGESIC, ts, method="card") for i in range(8)]  # → "token", her wallet pays
        for i in range(13):
            sender = self.patients[(round_ * 13 + i) % len(self.patients)]
            to = ("pool:miners" if i % 5 == 4 else
                  f"patient:{self.patients[(round_ * 13 + i + 1) % len(self.patients)].device_id}")
            transfer = ce.TokenTransfer(to=to, amount=500, nonce=self._next_nonce())
            out.append(ce.signed(sender, ce.TOKEN_TRANSFER, transfer))
        over_limit = self.sale(round_, ANALGESIC, ts, method="cash", quantity=25, wallet=False)
        out.append(ce.signed(self.operator, ce.SALE_REFUSED, ce.SaleRefusal(
            event=over_limit.cose, reason="formulary_quantity_exceeded", ts=ts)))
        out.append(self.sale(round_ + 1, AMOXICILLIN, ts, method="card", wallet=False))  # Rx-only, no Rx: void
        assert len(out) == CHECKPOINT
        return out


def synthetic_witness(log: Log, size: int, rx_needed: int) -> ContractWitness:
    """A miner's ContractWitness at a log of `size` leaves (see the module docstring)."""
    runtime = Runtime(log.genesis)
    for entry in [*log.setup(), *log.prescriptions(rx_needed)]:
        result = runtime.apply(entry)
        assert result == OK, f"the benchmark's setup entries must all be accepted: {entry.type} {result}"
    state = runtime.state
    log.policies = {p.device_id: state.tables["policies"][p.device_id] for p in log.patients}
    real = state.size
    assert size > real
    filler = size - real
    tables = state.tables

    def rows(kind: str) -> range:
        return range(int(filler * PER_THOUSAND[kind] / 1000))

    def put(table: str, key: str, value: object) -> None:
        tables.setdefault(table, {})[key] = value

    # Values are shared between filler rows of a table, shaped as the rules write them: what is measured is
    # the cost of lookups in tables of this many keys, and a snapshot encodes each row's value in full either way.
    pk, pre = bytes(range(32)), bytes(33)
    patients = [filler_id("patient", k) for k in rows("patients")]
    patient = {"role": "patient", "pk": pk, "name": "patient", "at": 0, "pre_pk": pre, "pre_vk": pre}
    capped = log.policies[log.patients[0].device_id]
    for pid in patients:
        put("parties", pid, patient)
        state.balances[f"patient:{pid}"] = 1_000
    for k in rows("policies"):
        put("policies", patients[k], {**capped, "policy_id": f"pol-{patients[k]}"})
    for role, kind in (("pharmacy", "pharmacies"), ("prescriber", "prescribers"), ("insurer", "insurers"),
                       ("miner", "miners")):
        record = {"role": role, "pk": pk, "name": role, "at": 0}
        bonded = MIN_BOND.get(role, 0)
        bond = {"role": role, "amount": bonded, "unbonding": 0, "release_ms": None,
                "suspended_at": None, "offences": [[0, "refused_sale"]]}
        for k in rows(kind):
            pid = filler_id(kind, k)
            put("parties", pid, record)
            if role in MIN_BOND:
                put("bonds", pid, bond)
                state.balances[f"bond:{pid}"] = bonded
                state.balances[f"{role}:{pid}"] = 10**6
            if role == "miner":
                put("miner_ids", pid, 0)
            if role == "pharmacy":
                put("violations", f"pharmacy:{pid}", 1)
                put("devices", filler_id("terminal", k), {"pk": pk, "profile": "pharmacy_terminal", "owner": pid,
                                                          "at": 0, "revoked_at": None})
    n_patients = max(len(patients), 1)
    for k in rows("devices"):
        put("devices", filler_id("device", k), {"pk": pk, "profile": "heart_rate_band",
                                                "owner": patients[k % n_patients] if patients else "x",
                                                "at": 0, "revoked_at": None})
    epoch = {"owner": "x", "capsule": bytes(98), "key_ct": bytes(60), "epoch_ms": HOUR, "index": 0}
    for k in rows("epochs"):
        put("epochs", f"{filler_id('device', k)}:{k}", epoch)
    for k in rows("seen"):
        put("seen", f"{filler_id('device', k % 100_000)}:{k}", k)
    for k in rows("payment_nonces"):
        put("payment_nonces", f"{filler_id('patient', k % n_patients)}:{k}", k)
    for k in rows("nonces"):
        put("nonces", f"{filler_id('patient', k % n_patients)}:{k}", k)
    claim = {"policy_id": "pol-x", "patient": "x", "item": f"ndc:{FLU_SHOT}", "category": "immunization",
             "price": 2_500, "insurer_share": 2_500, "patient_paid": 0, "copay": 0}
    for k in rows("claims"):
        put("claims", str(real + k), claim)
    rx = {**state.tables["rx"][log.rx[0][0]], "fills": 1, "sales": [0]}
    for k in rows("rx"):
        put("rx", f"{k:064x}", rx)
    void = {"reason": VOID_REASON, "type": "event", "signer": filler_id("terminal", 0)}
    for k in rows("void"):
        put("void", str(real + k), void)
    for k in rows("activity"):
        put("activity", f"{filler_id('patient', k % n_patients)}:2026-{1 + k // n_patients % 12:02d}-01", [30, 0])
    for k in rows("weekly_activity"):
        put("weekly_activity", f"{filler_id('patient', k % n_patients)}:2025-W{1 + k // n_patients % 52:02d}", [150, 0])
    item = {"rx_only": True, "schedule": 0, "max_quantity": 10, "authority": log.authority.device_id, "at": 0}
    for k in range(FORMULARY_ITEMS):
        put("formulary", f"ndc:{k // 10_000:05d}-{k % 10_000:04d}-01", item)
    refused = {index: outcome for index, outcome in state.results.refused()}
    refused.update({real + k: VOID_REASON for k in rows("void")})
    state.results = Results(size, refused)  # every other filler leaf "ok"
    state.size = size
    witness = ContractWitness(log.genesis)
    witness.runtime.state = state
    return witness


def rule_versions(witness: ContractWitness) -> dict[str, int]:
    """Contract name → the version in force at the state's next leaf."""
    return {name: history[-1][1] for name, history in sorted(witness.state.versions.items())}


def judge(witness: ContractWitness, leaves: list[bytes]) -> float:
    """Milliseconds to judge one checkpoint's leaves; it must be accepted with exactly its one void."""
    old = witness.size
    t0 = time.perf_counter()
    violation = witness(old, old + len(leaves), leaves)
    elapsed = (time.perf_counter() - t0) * 1000
    reasons = [v.rule for v in witness.voids]
    assert violation is None and reasons == [VOID_REASON], (violation, reasons)
    return elapsed


def judge_ms(size: int, rounds: int) -> tuple[float, dict[str, int]]:
    """Median milliseconds to judge one 100-leaf checkpoint on a `size`-leaf state, and the rules run."""
    log = Log()
    witness = synthetic_witness(log, size, rounds * RX_SALES)
    batches = [[e.encode() for e in log.checkpoint(r)] for r in range(rounds)]
    gc.collect()
    timings = [judge(witness, leaves) for leaves in batches]
    return round(statistics.median(timings), 2), rule_versions(witness)


def restart_s(size: int, every: int) -> dict[str, object]:
    """Save a snapshot of a `size`-leaf state, then time a restart: restore it and replay `every` leaves."""
    log = Log()
    rounds = every // CHECKPOINT
    witness = synthetic_witness(log, size, rounds * RX_SALES)
    tail = [e.encode() for r in range(rounds) for e in log.checkpoint(r)]
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
    assert replayed is not None and len(replayed.entries) == len(tail)
    assert [v.rule for v in restarted.voids] == [VOID_REASON] * rounds, restarted.voids[:3]
    return {"restart_s": round(total_s, 2), "restore_s": round(restore_s, 2), "tail_leaves": len(tail),
            "snapshot_save_s": round(save_s, 2), "snapshot_mb": round(snapshot_bytes / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="log sizes for judge_ms, comma-separated "
                                                  f"(default {','.join(map(str, SIZES))})")
    ap.add_argument("--restart-size", type=int, default=None, help="log size of the restart (default 1000000)")
    ap.add_argument("--rounds", type=int, default=None, help="checkpoints judged per size (median; default 5)")
    ap.add_argument("--quick", action="store_true", help="sizes 10k and 100k, a 100k-leaf restart, 3 rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(QUICK_SIZES if args.quick else SIZES)
    restart_size = args.restart_size or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 5)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    judged: dict[str, float] = {}
    rules: dict[str, int] = {}
    for size in sizes:
        say(f"judging {CHECKPOINT}-leaf checkpoints on a {size:,}-leaf state…")
        judged[str(size)], rules = judge_ms(size, rounds)
        say(f"  {judged[str(size)]} ms")
        gc.collect()
    say(f"restarting from a {restart_size:,}-leaf snapshot + {SNAPSHOT_EVERY:,} leaves…")
    restart = restart_s(restart_size, SNAPSHOT_EVERY)
    result = {"judge_ms": judged, "checkpoint_leaves": CHECKPOINT, "rules": rules, "restart_size": restart_size,
              **restart}
    if args.json:
        print(json.dumps(result))
    else:
        say(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
