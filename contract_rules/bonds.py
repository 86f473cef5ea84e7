"""Bond rules (v1): pharmacies, insurers and miners lock tokens to be admitted; proven violations slash them.

A party posts its bond with `bond.post`: the tokens move from "<role>:<party id>" to "bond:<party id>" and the
`bonds` record keeps the amount (always equal to that account's balance). A party is *admitted* while it is
registered, its bond less what it is unbonding is at least `MIN_BOND[role]`, and it is not suspended.

Getting tokens back takes two steps: `bond.unbond` names an amount, which stays slashable until `UNBONDING_MS`
of attested time (the bridge's `clock.attest`, never a wall clock) have passed; `bond.withdraw` then moves it
back. So a party cannot dodge a slash for a violation already on the log by pulling its bond first.

Slashing is a rule effect, not an accusation: the rule that proves an offence (a refused or void sale, a bad
capsule fragment, a failed audit, an unanswered retrieval, a fork cosignature) calls `slash` with the leaf
index of its evidence, and every miner recomputes the same effects. The schedule is `SLASH`; a slash moves
min(SLASH[offence], bond left) from "bond:<id>" to "pool:miners" and appends [evidence index, offence] to the
record. A bond that falls below the minimum suspends the party until it posts enough again; a fork cosignature
takes the whole bond and suspends the miner for good. A party without a bond record (e.g. a pharmacy of a
ledger from before bonds) still gets the offence recorded, in table `offences`.

`miner.fork` is handled here too: two log-signed notes of one tree size with different roots, each carrying a
valid cosignature of the same registered miner, slash that miner for "fork_cosignature".
"""

from __future__ import annotations

from typing import Any

from carechain.checkpoint import Checkpoint, CheckpointError, NoteError, NoteSignature, key_hash, parse_note
from carechain.cosignature import CosignatureError, Cosigner, cosignature_timestamp
from carechain.identity import SIGNATURE_SIZE, verify_signature
from contract_rules.clock import attested_ms
from contract_rules.runtime import Accept, Effect, Outcome, Put, Reject, State, Transfer, Tx
from contract_rules.transactions import (
    BOND_POST,
    BOND_UNBOND,
    BOND_WITHDRAW,
    MINER_FORK,
    BondPost,
    BondUnbond,
    BondWithdraw,
    MinerFork,
    parse,
)

NAME = "bonds"
VERSION = 1
POOL = "pool:miners"  # where slashed tokens go: they pay the miners who re-check everything
UNBONDING_MS = 7 * 86_400_000  # a week of attested time between asking for a bond back and getting it
# The least bond, in minor units, that admits a party of each role.
MIN_BOND: dict[str, int] = {"pharmacy": 50_000, "insurer": 100_000, "miner": 20_000}
FORFEIT_ALL = 2**62  # more than any bond: the offence takes everything
# Offence → minor units taken from the bond (never more than is left).
SLASH: dict[str, int] = {
    "refused_sale": 5_000,  # a sale the rules refuse (Rx-only without a valid Rx, time skew, ...)
    "void_sale": 10_000,  # a sale the bridge appended although the rules refuse it
    "bad_capsule_fragment": 10_000,  # a miner's signed capsule fragment that fails verification
    "failed_audit": 2_000,  # a storage miner that could not prove it holds its shares
    "unanswered_retrieval": 1_000,  # a storage miner that did not answer a signed retrieval request
    "fork_cosignature": FORFEIT_ALL,  # a miner that cosigned two different trees of one size
}
SUSPEND_AT_ONCE = frozenset({"fork_cosignature"})  # offences that suspend for good, whatever is left


def apply(state: State, tx: Tx) -> Outcome:
    """The rule-module interface (see `runtime.RuleModule`): read `state`, return effects or a reason."""
    if tx.type == BOND_POST:
        return _post(state, tx)
    if tx.type == BOND_UNBOND:
        return _unbond(state, tx)
    if tx.type == BOND_WITHDRAW:
        return _withdraw(state, tx)
    if tx.type == MINER_FORK:
        return _fork(state, tx)
    return Reject("not_a_bond_entry")


# -- the API other rules use ---------------------------------------------------------------------------

def bond_account(party_id: str) -> str:
    return f"bond:{party_id}"


def bond_of(state: State, party_id: str) -> dict[str, Any] | None:
    """The `bonds` record of a party, or None if it never posted one."""
    record: dict[str, Any] | None = state.table("bonds").get(party_id)
    return record


def is_admitted(state: State, party_id: str) -> bool:
    """Registered, bonded at least `MIN_BOND[role]` (not counting what it is unbonding), not suspended."""
    party = state.table("parties").get(party_id)
    if party is None:
        return False
    record = bond_of(state, party_id)
    minimum = MIN_BOND.get(party["role"], 0)
    if record is None:
        return minimum == 0
    return record["suspended_at"] is None and record["amount"] - record["unbonding"] >= minimum


def slash(state: State, party_id: str, offence: str, evidence_index: int) -> tuple[Effect, ...]:
    """The effects of slashing `party_id` for `offence`, proven by the leaf at `evidence_index`.

    Call it at most once per party per entry: it reads the record as the state holds it before the entry.
    """
    if offence not in SLASH:
        raise ValueError(f"unknown offence {offence!r}; offences: {', '.join(SLASH)}")
    record = bond_of(state, party_id)
    if record is None:
        past = state.table("offences").get(party_id, [])
        return (Put("offences", party_id, [*past, [evidence_index, offence]]),)
    taken = min(SLASH[offence], record["amount"])
    left = record["amount"] - taken
    suspended = record["suspended_at"]
    if suspended is None and (offence in SUSPEND_AT_ONCE or left < MIN_BOND.get(record["role"], 0)):
        suspended = evidence_index
    updated = {**record, "amount": left, "unbonding": min(record["unbonding"], left), "suspended_at": suspended,
               "offences": [*record["offences"], [evidence_index, offence]]}
    put = Put("bonds", party_id, updated)
    if not taken:
        return (put,)
    return (Transfer(bond_account(party_id), POOL, taken, f"slash:{offence}:{evidence_index}"), put)


def suspended_for_good(record: dict[str, Any]) -> bool:
    """Whether an offence in the record suspends for good (posting more does not lift it)."""
    return any(offence in SUSPEND_AT_ONCE for _, offence in record["offences"])


# -- bond entries --------------------------------------------------------------------------------------

def _nonce(state: State, tx: Tx, nonce: int) -> tuple[str, Reject | None]:
    key = f"{tx.signer}:bond:{nonce}"
    return key, Reject("nonce_reused") if key in state.table("nonces") else None


def _post(state: State, tx: Tx) -> Outcome:
    p = parse(BondPost, tx.payload)
    if p is None:
        return Reject("bad_payload")
    if tx.role not in MIN_BOND:
        return Reject("role_has_no_bond")
    key, reused = _nonce(state, tx, p.nonce)
    if reused:
        return reused
    own = f"{tx.role}:{tx.signer}"
    if state.balance(own) < p.amount:
        return Reject("insufficient_funds")
    record = bond_of(state, tx.signer) or {"role": tx.role, "amount": 0, "unbonding": 0, "release_ms": None,
                                           "suspended_at": None, "offences": []}
    amount = record["amount"] + p.amount
    suspended = record["suspended_at"]
    # A bond slashed below the minimum is reinstated by posting enough again; a fork suspends for good.
    if suspended is not None and not suspended_for_good(record) and amount - record["unbonding"] >= MIN_BOND[tx.role]:
        suspended = None
    updated = {**record, "amount": amount, "suspended_at": suspended}
    return Accept((Transfer(own, bond_account(tx.signer), p.amount, f"bond:{tx.index}"),
                   Put("bonds", tx.signer, updated), Put("nonces", key, tx.index)))


def _unbond(state: State, tx: Tx) -> Outcome:
    u = parse(BondUnbond, tx.payload)
    if u is None:
        return Reject("bad_payload")
    key, reused = _nonce(state, tx, u.nonce)
    if reused:
        return reused
    record = bond_of(state, tx.signer)
    if record is None:
        return Reject("no_bond")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if record["unbonding"] + u.amount > record["amount"]:
        return Reject("unbond_exceeds_bond")
    # Asking again restarts the wait for the whole unbonding amount: no stale release time to exploit.
    updated = {**record, "unbonding": record["unbonding"] + u.amount, "release_ms": now + UNBONDING_MS}
    return Accept((Put("bonds", tx.signer, updated), Put("nonces", key, tx.index)))


def _withdraw(state: State, tx: Tx) -> Outcome:
    w = parse(BondWithdraw, tx.payload)
    if w is None:
        return Reject("bad_payload")
    key, reused = _nonce(state, tx, w.nonce)
    if reused:
        return reused
    record = bond_of(state, tx.signer)
    if record is None:
        return Reject("no_bond")
    if record["release_ms"] is None or record["unbonding"] == 0:
        return Reject("nothing_unbonding")
    now = attested_ms(state)
    if now is None:
        return Reject("no_attested_time")
    if now < record["release_ms"]:
        return Reject("bond_not_released")
    amount = min(record["unbonding"], record["amount"])
    updated = {**record, "amount": record["amount"] - amount, "unbonding": 0, "release_ms": None}
    effects: list[Effect] = [Put("bonds", tx.signer, updated), Put("nonces", key, tx.index)]
    if amount:
        effects.insert(0, Transfer(bond_account(tx.signer), f"{record['role']}:{tx.signer}", amount,
                                   f"unbond:{tx.index}"))
    return Accept(tuple(effects))


# -- miner.fork ----------------------------------------------------------------------------------------

def _fork(state: State, tx: Tx) -> Outcome:
    f = parse(MinerFork, tx.payload)
    if f is None:
        return Reject("bad_payload")
    party = state.table("parties").get(f.miner)
    if party is None or party["role"] != "miner":
        return Reject("unknown_miner")
    a = _cosigned_checkpoint(state, f.note_a, f.miner, party["pk"])
    if isinstance(a, str):
        return Reject(a)
    b = _cosigned_checkpoint(state, f.note_b, f.miner, party["pk"])
    if isinstance(b, str):
        return Reject(b)
    if a.origin != b.origin or a.tree_size != b.tree_size:
        return Reject("checkpoints_not_comparable")
    if a.root_hash == b.root_hash:
        return Reject("no_fork")
    key = f"{f.miner}:{a.tree_size}"
    if key in state.table("forks"):
        return Reject("fork_already_proven")
    record = {"miner": f.miner, "size": a.tree_size, "at": tx.index}
    return Accept((*slash(state, f.miner, "fork_cosignature", tx.index), Put("forks", key, record)))


def _cosigned_checkpoint(state: State, note: str, miner: str, miner_pk: bytes) -> Checkpoint | str:
    """The checkpoint of a note signed by a genesis operator (the log) and cosigned by `miner`, or a reason."""
    try:
        body, signatures = parse_note(note)
        checkpoint = Checkpoint.parse(body)
    except (NoteError, CheckpointError):
        return "bad_checkpoint_note"
    if not any(_log_signed(state, body, sig) for sig in signatures):
        return "checkpoint_not_signed_by_the_log"
    for sig in signatures:
        try:
            cosigner = Cosigner(sig.name, miner_pk)
        except CosignatureError:
            continue  # not a cosigner name
        if cosignature_timestamp(body, sig, cosigner) is not None:
            return checkpoint
    return "checkpoint_not_cosigned_by_the_miner"


def _log_signed(state: State, body: str, sig: NoteSignature) -> bool:
    message = body.encode()
    for public_key in state.operators.values():
        try:
            expected = key_hash(sig.name, public_key)
        except NoteError:
            return False
        if (sig.key_hash == expected and len(sig.signature) == SIGNATURE_SIZE
                and verify_signature(public_key, message, sig.signature)):
            return True
    return False
