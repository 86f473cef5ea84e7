"""The contract runtime: replay ledger entries through versioned rule modules into one state and its root.

Sans-IO and deterministic: the only inputs are the genesis, the entries in log order (their index is their
position) and the rule modules' code; no wall clock, no randomness, no floats, no iteration over anything
whose order depends on the process (every table is a dict filled in log order, and the root is taken over
deterministic CBOR, which sorts map keys). Two miners that replay the same log therefore reach the same
`State.root()`, byte for byte.

A rule module is plain Python with `NAME`, `VERSION` and `apply(state, tx) -> Accept | Reject`; it reads
the state and returns *effects*, which only this module applies. It is identified by the SHA-256 of its
source, so a `contract.upgrade` entry pins exactly which code runs from which log index onward.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from carechain import cbor, envelope
from carechain.entries import ENTRY_EVENT, ENTRY_REGISTER, ENTRY_REVOKE, Entry, Registration, Revocation
from carechain.events import SEALED_KINDS, EpochKey, EventPayload, PayloadError, validate_payload
from carechain.identity import device_id_for
from contract_rules import transactions as ce
from contract_rules.clock import CLOCK_TABLE, NOW, attested_ms

STATE_DOMAIN = b"carechain/contracts/state/v1\x00"
OK = "ok"
# The rule modules each entry type goes through, in this order; the core handles the rest itself.
ROUTES: dict[str, tuple[str, ...]] = {
    ce.TOKEN_TRANSFER: ("tokens",),
    ce.RX_ANCHOR: ("prescriptions",),
    ce.RX_REVOKE: ("prescriptions",),
    ce.POLICY_REGISTER: ("insurance",),
    ce.WELLNESS_SETTLE: ("insurance",),
    "event:purchase": ("prescriptions", "insurance"),
    "event:activity": ("insurance",),  # v1 only: a v2 reading of a sealed kind goes to no contract
    "event:weekly_activity": ("insurance",),
    ce.STORAGE_COMMIT: ("storage",),
    ce.STORAGE_AUDIT: ("storage",),
    ce.STORAGE_RETRIEVAL: ("storage",),
    ce.STORAGE_SETTLE: ("storage",),
    ce.CHECKPOINT_FINAL: ("storage",),
    ce.ACCESS_REQUEST: ("access",),
    ce.ACCESS_GRANT: ("access",),
    ce.ACCESS_REVOKE: ("access",),
    ce.ACCESS_FAULT: ("access",),
    ce.BOND_POST: ("bonds",),
    ce.BOND_UNBOND: ("bonds",),
    ce.BOND_WITHDRAW: ("bonds",),
    ce.MINER_FORK: ("bonds",),
    ce.FORMULARY_SET: ("formulary",),
    ce.CONSENT_GIVE: ("market",),
    ce.CONSENT_REVOKE: ("market",),
    ce.STUDY_POST: ("market",),
    ce.STUDY_CONTRIBUTE: ("market",),
    ce.STUDY_RESULT: ("market",),
    ce.STUDY_SAMPLE: ("market",),
    ce.STUDY_DISCLOSE: ("market",),
    ce.STUDY_AUDIT: ("market",),
    ce.STUDY_CLOSE: ("market",),
    ce.TRIAL_REGISTER: ("trials",),
    ce.TRIAL_COMMIT: ("trials",),
    ce.TRIAL_ENROLL: ("trials",),
    ce.TRIAL_DISPENSE: ("trials",),
    ce.TRIAL_WITHDRAW: ("trials",),
    ce.TRIAL_UNBLIND: ("trials",),
    ce.TRIAL_UNBLIND_KEY: ("trials",),
    ce.TRIAL_LOCK: ("trials",),
    ce.TRIAL_REVEAL: ("trials",),
    ce.TRIAL_RECOVER: ("trials",),
    ce.TRIAL_OUTCOME: ("trials",),
    ce.TRIAL_CERTIFY: ("trials",),
}
# Who may sign each entry type (a party role, "operator" from the genesis, or a registered "device").
SIGNERS: dict[str, frozenset[str]] = {
    ce.PARTY_REGISTER: frozenset({"operator"}),
    ce.CONTRACT_UPGRADE: frozenset({"operator"}),
    ce.SALE_REFUSED: frozenset({"operator"}),  # the bridge's key, listed among the genesis operators
    ENTRY_REGISTER: frozenset({"operator"}),
    ENTRY_REVOKE: frozenset({"operator"}),
    ce.TOKEN_TRANSFER: frozenset(ce.PARTY_ROLES),
    ce.RX_ANCHOR: frozenset({"prescriber"}),
    ce.RX_REVOKE: frozenset({"prescriber"}),
    ce.POLICY_REGISTER: frozenset({"insurer"}),
    ce.WELLNESS_SETTLE: frozenset({"insurer", "patient"}),  # insurance v3: the patient may settle her own week
    ce.STORAGE_COMMIT: frozenset({"key", "operator", *ce.PARTY_ROLES}),  # any key: see SELF_KEYED
    ce.STORAGE_AUDIT: frozenset({"operator", *ce.PARTY_ROLES}),  # storage v2: the rules recompute each verdict
    ce.STORAGE_RETRIEVAL: frozenset({"key", "operator", *ce.PARTY_ROLES}),  # the requester (maybe an owner key)
    ce.STORAGE_SETTLE: frozenset({"operator", *ce.PARTY_ROLES}),
    ce.CHECKPOINT_FINAL: frozenset({"operator"}),  # the bridge records final checkpoints it published
    ce.PROTOCOL_CUTOVER: frozenset({"operator"}),
    ce.ACCESS_REQUEST: frozenset(ce.PARTY_ROLES),  # the rule also wants a registered re-encryption key
    ce.ACCESS_GRANT: frozenset({"patient"}),
    ce.ACCESS_REVOKE: frozenset({"patient"}),
    ce.ACCESS_FAULT: frozenset(ce.PARTY_ROLES),
    ce.BOND_POST: frozenset(ce.BOND_ROLES),
    ce.BOND_UNBOND: frozenset(ce.BOND_ROLES),
    ce.BOND_WITHDRAW: frozenset(ce.BOND_ROLES),
    ce.MINER_FORK: frozenset({"operator", *ce.PARTY_ROLES}),
    ce.FORMULARY_SET: frozenset({"authority"}),
    ce.CONSENT_GIVE: frozenset({"patient"}),
    ce.CONSENT_REVOKE: frozenset({"patient"}),
    ce.STUDY_POST: frozenset({"researcher"}),
    ce.STUDY_CONTRIBUTE: frozenset({"patient"}),
    ce.STUDY_RESULT: frozenset({"miner"}),  # the rule also wants one of the study's aggregators
    ce.STUDY_SAMPLE: frozenset({"operator", *ce.PARTY_ROLES}),  # anyone: the rules fix which checkpoint
    ce.STUDY_DISCLOSE: frozenset({"patient"}),  # the rule also wants the sampled contribution's owner
    ce.STUDY_AUDIT: frozenset({"miner"}),  # the rule also wants one of the study's aggregators
    ce.STUDY_CLOSE: frozenset({"operator", *ce.PARTY_ROLES}),
    ce.TRIAL_REGISTER: frozenset({"sponsor"}),
    ce.TRIAL_COMMIT: frozenset({"sponsor", "miner"}),  # the rule also wants the trial's sponsor or a labeller
    ce.TRIAL_ENROLL: frozenset({"investigator"}),  # the rule also wants one the trial names
    ce.TRIAL_DISPENSE: frozenset({"pharmacy"}),
    ce.TRIAL_WITHDRAW: frozenset({"investigator", "patient"}),
    ce.TRIAL_UNBLIND: frozenset({"investigator"}),
    ce.TRIAL_UNBLIND_KEY: frozenset({"sponsor", "miner"}),
    ce.TRIAL_LOCK: frozenset({"sponsor"}),
    ce.TRIAL_REVEAL: frozenset({"sponsor", "miner"}),
    ce.TRIAL_RECOVER: frozenset({"sponsor", "miner"}),
    ce.TRIAL_OUTCOME: frozenset({"patient"}),
    ce.TRIAL_CERTIFY: frozenset({"operator", *ce.PARTY_ROLES}),  # anyone: the rules recompute the result
    ce.CLOCK_ATTEST: frozenset({"operator"}),  # the bridge attests the time rules judge on
    ENTRY_EVENT: frozenset({"device"}),
}
# Entry types any Ed25519 key may sign: the payload carries `pk`, whose id must be the signer's kid; an
# unregistered signer then acts with the role "key" (a patient committing its dataset's share roots).
SELF_KEYED = frozenset({ce.STORAGE_COMMIT, ce.STORAGE_RETRIEVAL})
# The rule modules shipped in this package, by module name: old versions stay, since deployed logs pin them.
BUILTIN = ("tokens", "prescriptions", "insurance", "insurance_v2", "storage", "access", "bonds", "insurance_v3",
           "access_v2", "prescriptions_v2", "formulary", "storage_v2", "market", "storage_v3", "trials")


# Contract entries carry evidence (signed audit answers, capsule fragments, checkpoint notes), so they may be
# larger than a device's event, whose limit the bridge enforces at ingest.
MAX_ENTRY_BYTES = 1024 * 1024


class MissingContractCode(RuntimeError):
    """The log pins code this replica does not hold: stop (never guess), fetch the code, replay again."""


# -- what rules see and return ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _CheckedEvent:
    """The fields `_outcome` routes on, of an event payload ingest has validated (`EventPayload`'s names)."""

    v: int
    dev: str
    seq: int
    kind: str


@dataclass(frozen=True)
class Tx:
    """One authenticated entry as a rule sees it."""

    index: int
    type: str  # entry type; events are "event:<kind>"
    signer: str  # party id, device id or operator kid
    role: str  # the signer's role: a party role, "device" or "operator"
    payload: Mapping[str, Any]  # for events: the validated wire payload {v, dev, seq, ts, kind, body}
    leaf: bytes = b""  # the entry's leaf bytes (what `access.request` is known by: its leaf hash)


@dataclass(frozen=True)
class Transfer:
    src: str
    dst: str
    amount: int
    memo: str = ""


@dataclass(frozen=True)
class Put:
    """Set `tables[table][key] = value` (a CBOR-able, float-free value)."""

    table: str
    key: str
    value: Any


@dataclass(frozen=True)
class Add:
    """Add `amount` to the integer counter `tables[table][key]` (missing counts as 0)."""

    table: str
    key: str
    amount: int


Effect = Transfer | Put | Add


@dataclass(frozen=True)
class Accept:
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True)
class Reject:
    """A refusal. Its `effects` record the refusal itself: a count against a pharmacy, or a slash of the
    offender's bond (Transfers included, applied all-or-none like an Accept's; see `Runtime.apply`)."""

    reason: str
    effects: tuple[Effect, ...] = ()


Outcome = Accept | Reject


# -- code and genesis --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleModule:
    name: str
    version: int
    code_hash: str  # SHA-256 of the module source, lowercase hex
    module: types.ModuleType

    def apply(self, state: State, tx: Tx) -> Outcome:
        outcome: Outcome = self.module.apply(state, tx)
        return outcome


def code_hash_of(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()


def load_rule_source(source: bytes, label: str = "<contract>") -> RuleModule:
    """Load a rule module from its source bytes (what a `contract.upgrade` pins by hash)."""
    code_hash = code_hash_of(source)
    module = types.ModuleType(f"carechain_contract_{code_hash[:16]}")
    module.__file__ = label
    sys.modules[module.__name__] = module  # dataclasses defined in the module need to find it
    exec(compile(source, label, "exec"), module.__dict__)  # the code is pinned by its hash on the ledger
    return RuleModule(module.NAME, module.VERSION, code_hash, module)


class CodeBook:
    """The rule modules this replica holds, by code hash."""

    def __init__(self, modules: Iterable[RuleModule] = ()) -> None:
        self._by_hash = {m.code_hash: m for m in modules}

    @classmethod
    def builtin(cls) -> CodeBook:
        return cls(_builtin_module(name) for name in BUILTIN)

    def add(self, module: RuleModule) -> None:
        self._by_hash[module.code_hash] = module

    def get(self, code_hash: str) -> RuleModule:
        try:
            return self._by_hash[code_hash]
        except KeyError:
            raise MissingContractCode(f"no contract code with hash {code_hash} on this replica; obtain the "
                                      "module source whose SHA-256 is that hash and add it to the CodeBook") from None


def _builtin_module(name: str) -> RuleModule:
    spec = importlib.util.find_spec(f"contract_rules.{name}")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_bytes()
    module = importlib.import_module(f"contract_rules.{name}")
    return RuleModule(module.NAME, module.VERSION, code_hash_of(source), module)


def builtin_hashes() -> dict[str, str]:
    """Contract name → code hash of the newest version of each contract shipped here (for a new genesis)."""
    newest: dict[str, RuleModule] = {}
    for module in map(_builtin_module, BUILTIN):
        if module.name not in newest or module.version > newest[module.name].version:
            newest[module.name] = module
    return {name: module.code_hash for name, module in newest.items()}


@dataclass(frozen=True)
class Genesis:
    """What every replica agrees on before index 0: operator keys, the token supply, the first code."""

    operators: Mapping[str, bytes]  # kid (device_id_for(pk)) → Ed25519 public key
    allocations: Mapping[str, int]  # account → minor units; the whole supply, fixed forever
    contracts: Mapping[str, str]  # contract name → code hash in force from index 0

    def to_cbor(self) -> bytes:
        return cbor.encode({"operators": dict(self.operators), "allocations": dict(self.allocations),
                            "contracts": dict(self.contracts)})

    @classmethod
    def from_cbor(cls, data: bytes) -> Genesis:
        raw = cbor.decode(data)
        return cls(raw["operators"], raw["allocations"], raw["contracts"])


# -- state -------------------------------------------------------------------------------------------

# Undo journal records: (kind, ...) with what the change replaced; `_ABSENT` marks a key that did not exist.
_J_BALANCE, _J_KEY, _J_TABLE, _J_VERSION, _J_RESULT = "balance", "key", "table", "version", "result"
_ABSENT = object()


class Results:
    """Each applied entry's outcome, by leaf index: how many there are, and the few that are not "ok".

    Reads like the list of `[index, outcome]` pairs it replaces (iteration, indexing, slices, equality), but holds
    only the refusals: a log of 100 M readings kept 100 M pairs (8.8 GB; 615 MB and 2.2 s to rebuild at every
    start at 5 M leaves), now a count. Iterating still walks every leaf: for tests and tools, not the hot path.
    """

    __slots__ = ("_refused", "_size")

    def __init__(self, size: int = 0, refused: Mapping[int, str] | None = None) -> None:
        self._size = size
        self._refused = dict(refused or {})

    def append(self, pair: list[Any]) -> None:
        """The outcome of leaf `index`, the next one applied (a reader that passes leaves over reads them as ok)."""
        index, outcome = pair
        if index < self._size:
            raise ValueError(f"the outcome of leaf {index} comes after that of leaf {self._size - 1}")
        if outcome != OK:
            self._refused[index] = outcome
        self._size = index + 1

    def pop(self) -> list[Any]:
        self._size -= 1
        return [self._size, self._refused.pop(self._size, OK)]

    def refused(self) -> list[list[Any]]:
        """The `[index, outcome]` pairs that are not "ok", in log order."""
        return [[i, self._refused[i]] for i in sorted(self._refused)]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[list[Any]]:
        return ([i, self._refused.get(i, OK)] for i in range(self._size))

    @overload
    def __getitem__(self, key: int) -> list[Any]: ...
    @overload
    def __getitem__(self, key: slice) -> list[list[Any]]: ...

    def __getitem__(self, key: int | slice) -> list[Any] | list[list[Any]]:
        if isinstance(key, slice):
            return [[i, self._refused.get(i, OK)] for i in range(*key.indices(self._size))]
        index = key + self._size if key < 0 else key
        if not 0 <= index < self._size:
            raise IndexError(f"no outcome for leaf {key} of {self._size}")
        return [index, self._refused.get(index, OK)]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Results):
            return self._size == other._size and self._refused == other._refused
        if isinstance(other, list):
            return len(other) == self._size and all(pair == mine for pair, mine in zip(other, self, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Results(size={self._size}, refused={self.refused()!r})"


@dataclass
class State:
    """Everything the contracts know. Tables are dicts with string keys and CBOR-able, float-free values."""

    operators: dict[str, bytes]
    balances: dict[str, int]
    supply: int
    # name → [[from_index, version, code_hash], ...], ascending from_index
    versions: dict[str, list[list[Any]]]
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: Results = field(default_factory=Results)  # [index, "ok" | reason] per entry
    size: int = 0
    # The undo journal, when a list: every change `Runtime.apply` makes is recorded in it (the value it
    # replaced) so `rollback()` can return to where the journal started. Not part of the state or its root.
    journal: list[tuple[Any, ...]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> State:
        for kid, public_key in genesis.operators.items():
            if device_id_for(public_key) != kid:
                raise ValueError(f"genesis operator {kid!r} is not the id of its public key")
        for account, amount in genesis.allocations.items():
            if type(amount) is not int or amount < 0:
                raise ValueError(f"genesis allocation for {account!r} must be a non-negative integer")
        balances = {a: n for a, n in sorted(genesis.allocations.items()) if n}
        return cls(operators=dict(genesis.operators), balances=balances, supply=sum(balances.values()),
                   versions={name: [[0, 0, h]] for name, h in sorted(genesis.contracts.items())})

    def table(self, name: str) -> dict[str, Any]:
        return self.tables.get(name, {})

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)

    def code_in_force(self, name: str, index: int) -> str:
        chosen: str | None = None
        for from_index, _version, code_hash in self.versions.get(name, []):
            if from_index <= index:
                chosen = code_hash
        if chosen is None:
            raise MissingContractCode(f"no version of contract {name!r} is in force at index {index}")
        return chosen

    def rollback(self) -> None:
        """Undo every change recorded in the journal, newest first; the journal is then empty.

        A miner judges a range of leaves this way without copying its state: the cost is that of the
        changes the range made, not of the state (`ContractWitness`).
        """
        journal = self.journal
        if journal is None:
            raise RuntimeError("State.rollback() without a journal: set state.journal = [] before applying")
        while journal:
            change = journal.pop()
            kind = change[0]
            if kind == _J_BALANCE:
                _, account, before = change
                if before is None:
                    self.balances.pop(account, None)
                else:
                    self.balances[account] = before
            elif kind == _J_KEY:
                _, table, key, before = change
                if before is _ABSENT:
                    del self.tables[table][key]
                else:
                    self.tables[table][key] = before
            elif kind == _J_TABLE:
                del self.tables[change[1]]
            elif kind == _J_VERSION:
                _, name, length = change
                if length:
                    del self.versions[name][length:]
                else:
                    del self.versions[name]
            elif kind == _J_RESULT:
                self.results.pop()
                self.size = change[1]

    def snapshot(self) -> dict[str, Any]:
        """The state as plain data; the outcomes as the refusals (every other leaf up to `size` is "ok")."""
        return {"operators": self.operators, "balances": self.balances, "supply": self.supply,
                "versions": self.versions, "tables": self.tables, "refused": self.results.refused(), "size": self.size}

    def root(self) -> bytes:
        """SHA-256 over the deterministic CBOR of the whole state: equal on every honest replica."""
        return hashlib.sha256(STATE_DOMAIN + cbor.encode(self.snapshot())).digest()


# -- the runtime -------------------------------------------------------------------------------------

class Runtime:
    """Applies entries one by one, in log order; `state.results` records each entry's outcome."""

    def __init__(self, genesis: Genesis, code: CodeBook | None = None) -> None:
        self.state = State.from_genesis(genesis)
        self.code = code or CodeBook.builtin()
        for name, history in self.state.versions.items():  # fail now, not at the first sale, if code is missing
            module = self.code.get(history[0][2])
            if module.name != name:
                raise ValueError(f"genesis names code {module.code_hash} {name!r}, but that module is {module.name!r}")
            history[0][1] = module.version

    def apply(self, entry: Entry, *, event_signature_checked: bool = False) -> str:
        """Apply the next entry; returns "ok" or the rejection reason. Raises MissingContractCode only.

        `event_signature_checked`: the caller vouches that this device event's signature was verified with the
        key registered for its device (the bridge replaying its own ledger, whose events its ingest verified);
        its envelope is taken as ingest parsed it (`envelope.parse_checked`); the signer's registration, role and
        payload are still checked here. Miners never pass it.

        An entry whose result is not "ok" is *void*: it changes nothing but what its Reject carries (a
        count, a slash of the offender's bond) and the record `void[index]` = {reason, type, signer}. An
        honest bridge never appends one (it appends only what `check` accepts), so a void leaf is evidence
        against the operator — and the log, and its miners, carry on past it.
        """
        state = self.state
        index = state.size
        outcome = self._outcome(index, entry, event_signature_checked)
        if isinstance(outcome, Accept):
            result = OK
            if not _apply_effects(state, outcome.effects):
                result = "insufficient_funds"
                outcome = Reject(result)  # the sale's effects do not apply, not even in part
        else:
            result = outcome.reason
        if result != OK:
            assert isinstance(outcome, Reject)
            if not _apply_effects(state, outcome.effects):  # a slash the bond cannot cover: still count it
                _apply_effects(state, [e for e in outcome.effects if not isinstance(e, Transfer)])
            _apply_effects(state, (Put("void", str(index), _void_record(entry, result)),))
        return self._close(index, result)

    def _close(self, index: int, result: str) -> str:
        """Record the result of the entry at `index`, the next leaf."""
        state = self.state
        if state.journal is not None:
            state.journal.append((_J_RESULT, index))
        state.results.append([index, result])
        state.size = index + 1
        return result

    def apply_ingested(self, dev: str, seq: int, kind: str, v: int, entry: Callable[[], Entry]) -> str:
        """`apply(entry(), event_signature_checked=True)` for a device event this bridge's ingest has just checked
        (payload validated, signature verified with the registered key) and appended, given the fields ingest
        read from it: when no contract reads its kind — most readings — the leaf is not decoded at all. A routed
        kind, an epoch key, a signer the state does not accept or a refusal take `apply` (same result)."""
        index = self.state.size
        signer = self._signer(ENTRY_EVENT, dev)
        outcome = (None if signer is None or signer[0] not in SIGNERS[ENTRY_EVENT]
                   else self._event_outcome(index, _CheckedEvent(v, dev, seq, kind)))
        if outcome is None or isinstance(outcome, Reject):  # a Reject is void: its record names the entry
            return self.apply(entry(), event_signature_checked=True)
        applied = _apply_effects(self.state, outcome.effects)
        assert applied, "a reading's effects are Puts, never transfers"
        return self._close(index, OK)

    def check(self, entry: Entry, *, event_signature_checked: bool = False) -> str:
        """The result `apply` would give the entry if appended next, without changing the state.

        What the bridge runs before appending: an entry that is not "ok" is refused back to its sender
        (a refused sale is recorded as a `sale.refused` entry instead, so it still counts).
        """
        outcome = self._outcome(self.state.size, entry, event_signature_checked)
        if isinstance(outcome, Reject):
            return outcome.reason
        return OK if _balances_after(self.state, outcome.effects) is not None else "insufficient_funds"

    def _outcome(self, index: int, entry: Entry, event_signature_checked: bool = False) -> Outcome:
        checked = event_signature_checked and entry.type == ENTRY_EVENT
        try:
            msg = (envelope.parse_checked(entry.cose) if checked
                   else envelope.parse(entry.cose, max_bytes=MAX_ENTRY_BYTES))
        except envelope.EnvelopeError as exc:
            return Reject(f"bad_envelope:{exc.reason}")
        signer = self._signer(entry.type, msg.kid)
        if signer is None and entry.type in SELF_KEYED:
            signer = _self_key(msg)
        if signer is None:
            revoked = entry.type == ENTRY_EVENT and msg.kid in self.state.table("devices")
            return Reject("device_revoked" if revoked else "unknown_signer")
        role, public_key = signer
        allowed = SIGNERS.get(entry.type)
        if allowed is None:
            return Reject("unknown_entry_type")
        if role not in allowed:
            return Reject("signer_not_allowed")
        if not checked and not msg.verify(public_key):
            return Reject("bad_signature")
        payload = msg.payload
        if not isinstance(payload, dict):
            return Reject("bad_payload")
        route_key = entry.type
        if entry.type == ENTRY_EVENT:
            event: _CheckedEvent | EventPayload
            if checked:  # ingest ran `validate_payload` on it before appending it: read the fields it checked
                event = _CheckedEvent(payload["v"], payload["dev"], payload["seq"], payload["kind"])
            else:
                try:
                    event = validate_payload(payload)
                except PayloadError as exc:
                    return Reject(f"bad_event:{exc.reason}")
            if event.dev != msg.kid:
                return Reject("event_device_mismatch")
            decided = self._event_outcome(index, event)
            if decided is not None:
                return decided
            if event.kind == "epoch_key":
                return self._epoch_key(index, payload)
            route_key = f"event:{event.kind}"
        core = _CORE.get(entry.type)
        if core is not None:
            return core(self, index, payload)
        names = ROUTES.get(route_key)
        if names is None:
            return Accept()  # anchored, but no contract reads it (e.g. a v1 heart-rate reading)
        return self._route(Tx(index, route_key, msg.kid, role, payload, entry.encode()), names)

    def _event_outcome(self, index: int, event: _CheckedEvent | EventPayload) -> Outcome | None:
        """A device event's outcome when its checked fields decide it (the sealed-reading rules, or anchored
        because no contract reads its kind), else None: an epoch key or a routed kind needs its payload."""
        sealed = self._sealed_outcome(index, event)
        if sealed is not None:
            return sealed
        if event.kind == "epoch_key" or f"event:{event.kind}" in ROUTES:
            return None
        return Accept()  # anchored, but no contract reads it (e.g. a v1 heart-rate reading)

    def _sealed_outcome(self, index: int, event: _CheckedEvent | EventPayload) -> Outcome | None:
        """What a health reading's kind decides by itself (None: routed like any other kind)."""
        if event.kind not in SEALED_KINDS:
            return None
        if event.v == 1:
            cutover = self.state.table("protocol").get("cutover")
            if cutover is not None and index >= cutover["retire_v1_after"]:
                return Reject("version_retired")
            return None
        if event.kind == "trial_measure":  # a trial outcome names its leaf: keep where it was anchored
            return Accept((Put("sealed_at", f"{event.dev}:{event.seq}", index),))
        return Accept()  # anchored as a ciphertext hash, which no contract can read

    def _route(self, tx: Tx, names: tuple[str, ...]) -> Outcome:
        """Run the rule modules in force at `tx.index`, in order; the first rejection decides."""
        index, payload = tx.index, tx.payload
        seen: tuple[Put, ...] = ()
        if tx.type.startswith("event:"):
            # The bridge already refuses a second leaf for one (device, seq); a miner must not trust that.
            key = f"{payload['dev']}:{payload['seq']}"
            if key in self.state.table("seen"):
                return Reject("duplicate_event")
            seen = (Put("seen", key, index),)
        effects: list[Effect] = []
        for name in names:
            if name not in self.state.versions:  # a genesis from before this contract existed
                return Reject("contract_not_in_genesis")
            if self.state.versions[name][0][0] > index:  # added by an upgrade that is not in force yet
                return Reject("contract_not_in_force")
            module = self.code.get(self.state.code_in_force(name, index))
            outcome = module.apply(self.state, tx)
            if isinstance(outcome, Reject):
                return Reject(outcome.reason, outcome.effects + seen)
            effects.extend(outcome.effects)
        return Accept((*effects, *seen))

    def _signer(self, entry_type: str, kid: str) -> tuple[str, bytes] | None:
        state = self.state
        if entry_type == ENTRY_EVENT:
            dev = state.table("devices").get(kid)
            if dev is None or dev["revoked_at"] is not None:
                return None
            return "device", dev["pk"]
        if kid in state.operators:
            return "operator", state.operators[kid]
        party = state.table("parties").get(kid)
        if party is None:
            return None
        return party["role"], party["pk"]

    # -- core entries (not upgradeable rule modules: they define who can act at all) ------------------

    def _party_register(self, index: int, payload: dict[str, Any]) -> Outcome:
        p = ce.parse(ce.PartyRegistration, payload)
        if p is None:
            return Reject("bad_payload")
        party_id = device_id_for(p.pk)
        if party_id in self.state.table("parties") or party_id in self.state.operators:
            return Reject("party_already_registered")
        if (p.pre_pk is None) != (p.pre_vk is None):
            return Reject("incomplete_pre_key")
        record: dict[str, Any] = {"role": p.role, "pk": p.pk, "name": p.name, "at": index}
        if p.pre_pk is not None:  # only then: parties registered before re-encryption keys keep their state
            record |= {"pre_pk": p.pre_pk, "pre_vk": p.pre_vk}
        if p.role == "miner":  # an index, so the miner set is found without scanning every patient's record
            return Accept((Put("parties", party_id, record), Put("miner_ids", party_id, index)))
        return Accept((Put("parties", party_id, record),))

    def _device_register(self, index: int, payload: dict[str, Any]) -> Outcome:
        try:
            reg = Registration.model_validate(payload)
        except ValueError:
            return Reject("bad_payload")
        if device_id_for(reg.pk) != reg.dev:
            return Reject("device_id_mismatch")
        if reg.dev in self.state.table("devices"):
            return Reject("device_already_registered")
        record = {"pk": reg.pk, "profile": reg.profile, "owner": reg.owner, "at": index, "revoked_at": None}
        return Accept((Put("devices", reg.dev, record),))

    def _device_revoke(self, index: int, payload: dict[str, Any]) -> Outcome:
        try:
            rev = Revocation.model_validate(payload)
        except ValueError:
            return Reject("bad_payload")
        record = self.state.table("devices").get(rev.dev)
        if record is None:
            return Reject("unknown_device")
        if record["revoked_at"] is not None:
            return Reject("device_already_revoked")
        return Accept((Put("devices", rev.dev, {**record, "revoked_at": index}),))

    def _sale_refused(self, index: int, payload: dict[str, Any]) -> Outcome:
        """A sale the bridge refused, recorded so it counts: it must be a genuine sale the rules refuse."""
        r = ce.parse(ce.SaleRefusal, payload)
        if r is None:
            return Reject("bad_payload")
        try:
            msg = envelope.parse(r.event)
            event = validate_payload(msg.payload)
        except (envelope.EnvelopeError, PayloadError):
            return Reject("refused_sale_malformed")
        signer = self._signer(ENTRY_EVENT, msg.kid)
        if signer is None or event.dev != msg.kid or not msg.verify(signer[1]):
            return Reject("refused_sale_not_signed_by_a_registered_device")
        if event.kind != "purchase":
            return Reject("refused_event_is_not_a_sale")
        route_key = "event:purchase"
        outcome = self._route(Tx(index, route_key, msg.kid, "device", msg.payload), ROUTES[route_key])
        if isinstance(outcome, Accept):
            if _balances_after(self.state, outcome.effects) is not None:
                return Reject("refused_a_valid_sale")
            outcome = Reject("insufficient_funds", tuple(e for e in outcome.effects
                                                         if isinstance(e, Put) and e.table == "seen"))
        if outcome.reason != r.reason:
            return Reject("refusal_reason_mismatch" if outcome.reason != "duplicate_event" else "duplicate_event")
        return Accept(outcome.effects)

    def _contract_upgrade(self, index: int, payload: dict[str, Any]) -> Outcome:
        up = ce.parse(ce.ContractUpgrade, payload)
        if up is None:
            return Reject("bad_payload")
        history = self.state.versions.get(up.name)
        if history is None and up.name not in ADDABLE:
            return Reject("unknown_contract")
        # The named checkpoint must lie beyond this entry: an upgrade can never reach back into history.
        if up.from_size <= index:
            return Reject("upgrade_is_retroactive")
        last_from, last_version, _ = history[-1] if history else (0, 0, "")
        if up.version <= last_version or up.from_size < last_from:
            return Reject("upgrade_not_newer")
        # Whether this replica holds the code is *not* checked here: that would make acceptance depend on
        # the replica. Replay raises MissingContractCode when the code is first needed.
        return Accept((Put("versions", up.name, [up.from_size, up.version, up.code_hash]),))

    def _protocol_cutover(self, index: int, payload: dict[str, Any]) -> Outcome:
        """Name the tree size from which v1 (plain-text) readings of sealed kinds are refused."""
        c = ce.parse(ce.ProtocolCutover, payload)
        if c is None:
            return Reject("bad_payload")
        if "cutover" in self.state.table("protocol"):
            return Reject("cutover_already_set")
        if c.retire_v1_after <= index:  # like an upgrade: never reach back into history
            return Reject("cutover_is_retroactive")
        return Accept((Put("protocol", "cutover", {"retire_v1_after": c.retire_v1_after, "at": index}),))

    def _clock_attest(self, index: int, payload: dict[str, Any]) -> Outcome:
        """The bridge's attested time (`contract_rules.clock`): time-based rules judge on it from here on."""
        a = ce.parse(ce.ClockAttest, payload)
        if a is None:
            return Reject("bad_payload")
        now = attested_ms(self.state)
        if now is not None and a.ms <= now:
            return Reject("clock_not_later")  # attested time only moves forward
        return Accept((Put(CLOCK_TABLE, NOW, {"ms": a.ms, "at": index}),))

    def _epoch_key(self, index: int, payload: dict[str, Any]) -> Outcome:
        """Anchor the capsule of one (device, epoch) data key, encapsulated to the device's registered owner."""
        key = f"{payload['dev']}:{payload['seq']}"
        if key in self.state.table("seen"):
            return Reject("duplicate_event")
        body = EpochKey.model_validate(payload["body"])  # validate_payload has checked it already
        device = self.state.table("devices")[payload["dev"]]
        owner = self.state.table("parties").get(body.owner)
        if device["owner"] != body.owner or owner is None or owner["role"] != "patient" or "pre_pk" not in owner:
            return Reject("unknown_owner")
        epoch_key = f"{payload['dev']}:{body.epoch}"
        if epoch_key in self.state.table("epochs"):
            return Reject("epoch_key_exists")
        record = {"owner": body.owner, "capsule": body.capsule, "key_ct": body.key_ct, "epoch_ms": body.epoch_ms,
                  "index": index}
        return Accept((Put("epochs", epoch_key, record), Put("seen", key, index)))


# A device event is no core entry: `Runtime._event_outcome` decides it from its fields or its route.
_CORE = {
    ce.PARTY_REGISTER: Runtime._party_register,
    ENTRY_REGISTER: Runtime._device_register,
    ENTRY_REVOKE: Runtime._device_revoke,
    ce.CONTRACT_UPGRADE: Runtime._contract_upgrade,
    ce.SALE_REFUSED: Runtime._sale_refused,
    ce.PROTOCOL_CUTOVER: Runtime._protocol_cutover,
    ce.CLOCK_ATTEST: Runtime._clock_attest,
}
assert ENTRY_EVENT not in _CORE
# Contracts a `contract.upgrade` may add to a ledger whose genesis predates them.
ADDABLE = frozenset({"access", "bonds", "formulary", "market", "trials"})


def _self_key(msg: envelope.Sign1) -> tuple[str, bytes] | None:
    """("key", pk) when the payload's `pk` is the key of the signer's kid (signature checked later)."""
    pk = msg.payload.get("pk") if isinstance(msg.payload, dict) else None
    if not isinstance(pk, bytes) or len(pk) != 32 or device_id_for(pk) != msg.kid:
        return None
    return "key", pk


def _void_record(entry: Entry, reason: str) -> dict[str, str]:
    """What `void[index]` says about a leaf the rules did not accept (the signer's kid if it has one)."""
    try:
        signer = envelope.parse(entry.cose, max_bytes=MAX_ENTRY_BYTES).kid
    except envelope.EnvelopeError:
        signer = ""
    return {"reason": reason, "type": entry.type, "signer": signer}


def _balances_after(state: State, effects: Iterable[Effect]) -> dict[str, int] | None:
    """The balances the transfers among `effects` would leave, or None if any is not positive and covered."""
    pending: dict[str, int] = {}
    for e in effects:
        if isinstance(e, Transfer):
            if type(e.amount) is not int or e.amount <= 0 or e.src == e.dst:
                return None
            src = pending.get(e.src, state.balance(e.src)) - e.amount
            if src < 0:
                return None
            pending[e.src] = src
            pending[e.dst] = pending.get(e.dst, state.balance(e.dst)) + e.amount
    return pending


def _apply_effects(state: State, effects: Iterable[Effect]) -> bool:
    """Apply all effects or none. Transfers must be positive and covered; False (nothing applied) if not.

    With `state.journal` a list, every value replaced is recorded there first (see `State.rollback`).
    """
    effects = list(effects)
    pending = _balances_after(state, effects)
    if pending is None:
        return False
    journal = state.journal
    for account, amount in pending.items():
        if journal is not None:
            journal.append((_J_BALANCE, account, state.balances.get(account)))
        if amount:
            state.balances[account] = amount
        else:
            state.balances.pop(account, None)
    for e in effects:
        if isinstance(e, Transfer):
            continue
        if isinstance(e, Put) and e.table == "versions":
            history = state.versions.setdefault(e.key, [])
            if journal is not None:
                journal.append((_J_VERSION, e.key, len(history)))
            history.append(e.value)
            continue
        table = state.tables.get(e.table)
        if table is None:
            table = state.tables[e.table] = {}
            if journal is not None:
                journal.append((_J_TABLE, e.table))
        if journal is not None:
            journal.append((_J_KEY, e.table, e.key, table.get(e.key, _ABSENT)))
        table[e.key] = e.value if isinstance(e, Put) else table.get(e.key, 0) + e.amount
    return True
