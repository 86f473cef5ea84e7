"""Contribution audits, sans-IO: a sampled contributor's disclosure, and an aggregator's verdict on it
(docs/market.md, "Audits").

A study's audit sample (`study.sample`, drawn from a final checkpoint's seed) names contributions whose owners
must show that what they shared is what their readings give. The owner discloses (`study.disclose`, a logged
access: the entry lists the (device, epoch) data keys it gives and to whom): `seal_disclosure` puts her
commitment's salt, those data keys and the cited readings' ciphertexts in one deterministic-CBOR plaintext,

    {"salt": 16 bytes, "keys": [[dev, epoch, 32-byte data key], ...], "records": [[leaf index, ciphertext], ...]}

encrypted with ChaCha20-Poly1305 under a fresh 32-byte key (the 12-byte nonce prepended; associated data
DISCLOSURE_DOMAIN ‖ study id ‖ contribution leaf as 8 bytes big-endian, so a blob cannot be replayed for
another contribution), and seals that key to each aggregator's Ed25519 key (as shares are sealed). The
ciphertexts travel in the blob, so an auditor needs nothing from the bridge; each is still checked against the
device-signed envelope's `ct` hash.

The aggregators open the sampled share vectors to each other in one MPC (`chain_miner.aggregator --audit`)
and each judges each contribution on its own (`judge`): the opened vector must open the commitment with the
disclosed salt; every cited leaf must be an event of a device registered to the owner at that leaf
(`cited_leaves`, the walk of `carechain.record_check.DeviceOwners`), of the study's kind, in its period and
before the contribution; every cited reading must open (`carechain.record_check.open_record`, with the
disclosed keys of the epochs the entry lists); and the measure of those readings, as a contribution vector,
must equal the opened vector.

No clock or randomness here: the disclosure key and nonce are the caller's (`record_access.contributing`
draws them), so sealing is deterministic but for the sealed boxes' ephemeral keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from carechain import cbor, envelope, market, measures, sealed
from carechain.access import _SEALED_BOX_OVERHEAD, _open_sealed_box, _seal_to_ed25519
from carechain.entries import ENTRY_EVENT, Entry, EntryError
from carechain.errors import FixedReasonError
from carechain.identity import Identity
from carechain.record_check import DeviceOwners, Epoch, RecordRejected, open_record

__all__ = ["DISCLOSURE_DOMAIN", "MAX_DISCLOSED_EPOCHS", "MAX_DISCLOSED_RECORDS", "MAX_DISCLOSURE_BLOB",
           "MAX_SEALED_DISCLOSURE_KEY", "MISMATCH_REASONS", "CitedLeaf", "Disclosure", "DisclosureError", "Verdict",
           "cited_leaves", "contribution_vector", "judge", "open_disclosure", "seal_disclosure"]

DISCLOSURE_DOMAIN = b"carechain/market/disclosure/v1\x00"
DISCLOSURE_KEY_BYTES = 32
DISCLOSURE_NONCE_BYTES = 12
MAX_DISCLOSURE_BLOB = 524_288  # the blob's bytes on the ledger: nonce ‖ ciphertext ‖ tag
MAX_SEALED_DISCLOSURE_KEY = 256  # one sealed disclosure key (80 bytes: 32 + the sealed box's 48)
MAX_DISCLOSED_EPOCHS = 4096
MAX_DISCLOSED_RECORDS = 4096  # = contract_rules.transactions.MAX_CONTRIBUTION_LEAVES
_AEAD_TAG_BYTES = 16

# Why a contribution does not match, checked in this order (the first that fails is the reason).
MISMATCH_REASONS = ("disclosure_does_not_open", "commitment_mismatch", "leaf_not_hers", "leaf_out_of_study",
                    "reading_does_not_open", "value_mismatch")


class DisclosureError(FixedReasonError):
    """A disclosure that cannot be sealed or opened: its key is not sealed to this aggregator or was altered,
    the blob was altered or belongs to another contribution, or its plaintext is not the documented CBOR."""

    REASON = "bad_disclosure"


@dataclass(frozen=True)
class Disclosure:
    """What an owner discloses for one contribution: the salt that opens her commitment, the data keys of the
    epochs her cited readings are in, and those readings' ciphertexts by leaf index."""

    salt: bytes
    data_keys: dict[Epoch, bytes]
    records: dict[int, bytes]


@dataclass(frozen=True)
class Verdict:
    """One aggregator's judgement of one contribution: "match" (reason "") or "mismatch" and the first
    check that failed (one of MISMATCH_REASONS)."""

    verdict: Literal["match", "mismatch"]
    reason: str = ""

    @classmethod
    def mismatch(cls, reason: str) -> Verdict:
        assert reason in MISMATCH_REASONS, reason
        return cls("mismatch", reason)


MATCH = Verdict("match")


def contribution_vector(query: Mapping[str, Any], value: int) -> list[int]:
    """The ints one contributor inputs (`carechain.market.contribution`), from her value clipped to the query's
    bounds (and a histogram's outer edges, so its edge bins are open-ended): an honest input is always valid,
    and no one contributor's reading moves the answer by more than the bounds allow."""
    q = market.Query.model_validate(dict(query))
    lo, hi = (q.lo, q.hi) if q.bins is None else (max(q.lo, q.bins[0]), min(q.hi, q.bins[-1]))
    return market.contribution(q, min(max(value, lo), hi))


# -- the disclosure ----------------------------------------------------------------------------------------


def _aad(study_id: str, contribution: int) -> bytes:
    return DISCLOSURE_DOMAIN + study_id.encode() + contribution.to_bytes(8, "big")


def seal_disclosure(aggregator_pks: Sequence[bytes], study_id: str, contribution: int, salt: bytes,
                    data_keys: Mapping[Epoch, bytes], records: Mapping[int, bytes], key: bytes,
                    nonce: bytes) -> tuple[list[bytes], bytes]:
    """The disclosure of `contribution` (its leaf index) for `study_id`: `key` sealed to each aggregator (in the
    study's order) and the blob. `key` (32 bytes) and `nonce` (12) must be fresh random bytes, never reused.
    DisclosureError when an input is malformed or the blob would exceed MAX_DISCLOSURE_BLOB."""
    if len(key) != DISCLOSURE_KEY_BYTES or len(nonce) != DISCLOSURE_NONCE_BYTES:
        raise DisclosureError(f"a disclosure key has {DISCLOSURE_KEY_BYTES} bytes and its nonce "
                              f"{DISCLOSURE_NONCE_BYTES}, got {len(key)} and {len(nonce)}")
    if not 0 <= contribution < 2**63:
        raise DisclosureError(f"contribution {contribution} is not a leaf index")
    if len(salt) != market.SALT_BYTES:
        raise DisclosureError(f"a commitment salt has {market.SALT_BYTES} bytes, got {len(salt)}")
    if not 1 <= len(data_keys) <= MAX_DISCLOSED_EPOCHS or len(records) > MAX_DISCLOSED_RECORDS:
        raise DisclosureError(f"a disclosure gives 1 to {MAX_DISCLOSED_EPOCHS} data keys and at most "
                              f"{MAX_DISCLOSED_RECORDS} records, not {len(data_keys)} and {len(records)}")
    if any(len(k) != sealed.DATA_KEY_SIZE for k in data_keys.values()):
        raise DisclosureError(f"a data key has {sealed.DATA_KEY_SIZE} bytes")
    plain = cbor.encode({"salt": bytes(salt),
                         "keys": [[dev, int(epoch), bytes(k)] for (dev, epoch), k in sorted(data_keys.items())],
                         "records": [[int(leaf), bytes(ct)] for leaf, ct in sorted(records.items())]})
    blob = bytes(nonce) + ChaCha20Poly1305(bytes(key)).encrypt(bytes(nonce), plain, _aad(study_id, contribution))
    if len(blob) > MAX_DISCLOSURE_BLOB:
        raise DisclosureError(f"the disclosure of contribution {contribution} takes {len(blob)} bytes, more than "
                              f"the {MAX_DISCLOSURE_BLOB} a study.disclose entry may carry")
    try:
        sealed_keys = [_seal_to_ed25519(pk, key) for pk in aggregator_pks]
    except ValueError as exc:
        raise DisclosureError(f"an aggregator's key: {exc}") from None
    return sealed_keys, blob


def open_disclosure(identity: Identity, sealed_key: bytes, blob: bytes, study_id: str,
                    contribution: int) -> Disclosure:
    """The disclosure `seal_disclosure` made, opened with this aggregator's key (`sealed_key` is the one
    sealed to it); DisclosureError saying what did not open or parse."""
    if not _SEALED_BOX_OVERHEAD < len(sealed_key) <= MAX_SEALED_DISCLOSURE_KEY:
        raise DisclosureError(f"a sealed disclosure key has {_SEALED_BOX_OVERHEAD + 1} to "
                              f"{MAX_SEALED_DISCLOSURE_KEY} bytes, got {len(sealed_key)}")
    key = _open_sealed_box(identity, sealed_key)
    if key is None or len(key) != DISCLOSURE_KEY_BYTES:
        raise DisclosureError(f"the disclosure key of contribution {contribution} does not open with aggregator "
                              f"{identity.device_id}'s key (sealed to another key, or altered)")
    if not DISCLOSURE_NONCE_BYTES + _AEAD_TAG_BYTES <= len(blob) <= MAX_DISCLOSURE_BLOB:
        raise DisclosureError(f"a disclosure blob has {DISCLOSURE_NONCE_BYTES + _AEAD_TAG_BYTES} to "
                              f"{MAX_DISCLOSURE_BLOB} bytes, got {len(blob)}")
    try:
        nonce, sealed_plain = bytes(blob[:DISCLOSURE_NONCE_BYTES]), bytes(blob[DISCLOSURE_NONCE_BYTES:])
        plain = ChaCha20Poly1305(key).decrypt(nonce, sealed_plain, _aad(study_id, contribution))
    except InvalidTag:
        raise DisclosureError(f"the disclosure blob of contribution {contribution} does not decrypt: altered, or "
                              f"made for another study or contribution") from None
    return _parse_plaintext(plain, contribution)


def _parse_plaintext(plain: bytes, contribution: int) -> Disclosure:
    what = f"the disclosure of contribution {contribution}"
    try:
        doc = cbor.decode(plain, max_depth=4)
    except cbor.CBORError as exc:
        raise DisclosureError(f"{what} is not CBOR: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"salt", "keys", "records"} or cbor.encode(doc) != plain:
        raise DisclosureError(f"{what} is not the deterministic CBOR map of salt, keys and records")
    salt, keys, records = doc["salt"], doc["keys"], doc["records"]
    if not isinstance(salt, bytes) or len(salt) != market.SALT_BYTES:
        raise DisclosureError(f"{what}: the salt is {market.SALT_BYTES} bytes")
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_DISCLOSED_EPOCHS:
        raise DisclosureError(f"{what}: keys is a list of 1 to {MAX_DISCLOSED_EPOCHS} [dev, epoch, key]")
    if not isinstance(records, list) or len(records) > MAX_DISCLOSED_RECORDS:
        raise DisclosureError(f"{what}: records is a list of at most {MAX_DISCLOSED_RECORDS} [leaf, ciphertext]")
    data_keys: dict[Epoch, bytes] = {}
    for item in keys:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and type(item[1]) is int
                and item[1] >= 0 and isinstance(item[2], bytes) and len(item[2]) == sealed.DATA_KEY_SIZE):
            raise DisclosureError(f"{what}: a key is [device id, epoch ≥ 0, {sealed.DATA_KEY_SIZE}-byte data key]")
        if (item[0], item[1]) in data_keys:
            raise DisclosureError(f"{what}: epoch {item[1]} of {item[0]} is given twice")
        data_keys[(item[0], item[1])] = item[2]
    opened: dict[int, bytes] = {}
    for item in records:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] >= 0
                and isinstance(item[1], bytes)):
            raise DisclosureError(f"{what}: a record is [leaf index, ciphertext]")
        if item[0] in opened:
            raise DisclosureError(f"{what}: leaf {item[0]} is given twice")
        opened[item[0]] = item[1]
    return Disclosure(salt, data_keys, opened)


# -- the auditor's view of the cited leaves -------------------------------------------------------------------


@dataclass(frozen=True)
class CitedLeaf:
    """A leaf a contribution cites, as the auditor's own walk of the ledger found it: its bytes, and if it is
    an event, the owner its device was registered to at that leaf and the device's key then (None: not an
    event, or a device no operator-signed registration holds there)."""

    entry: bytes
    device_owner: str | None = None
    device_pk: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        return {"entry": self.entry.hex(), "device_owner": self.device_owner,
                "device_pk": None if self.device_pk is None else self.device_pk.hex()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CitedLeaf:
        pk = doc.get("device_pk")
        return cls(bytes.fromhex(doc["entry"]), doc.get("device_owner"), None if pk is None else bytes.fromhex(pk))


def cited_leaves(leaves: Iterable[tuple[int, bytes]], operator_keys: Mapping[str, bytes],
                 wanted: Iterable[int]) -> dict[int, CitedLeaf]:
    """The `wanted` leaf indexes of `leaves` (index, bytes; ascending, from the first leaf) as `CitedLeaf`s,
    with the device registrations in force at each (`DeviceOwners`). Indexes beyond the leaves are absent."""
    want = set(wanted)
    owners = DeviceOwners(operator_keys)
    found: dict[int, CitedLeaf] = {}
    for index, leaf in leaves:
        try:
            entry = Entry.decode(leaf)
        except EntryError:
            if index in want:
                found[index] = CitedLeaf(bytes(leaf))
            continue
        if entry.type != ENTRY_EVENT:
            owners.apply(entry)
        if index not in want:
            continue
        held = None
        if entry.type == ENTRY_EVENT:
            try:
                held = owners.devices.get(envelope.parse(entry.cose).kid)
            except envelope.EnvelopeError:
                held = None
        found[index] = CitedLeaf(bytes(leaf), *(held if held is not None else (None, None)))
    return found


# -- the verdict ------------------------------------------------------------------------------------------


def judge(vector: Sequence[int], disclosure: Disclosure | None, *, owner: str, contribution: int, commitment: str,
          leaves: Sequence[int], query: Mapping[str, Any], from_ms: int, to_ms: int,
          cited: Mapping[int, CitedLeaf], epochs: Iterable[Epoch]) -> Verdict:
    """One aggregator's verdict on one sampled contribution.

    `vector` is the opened share vector (field elements or ints); `disclosure` what `open_disclosure` gave
    this aggregator (None when it did not open: the owner's fault, as she signed the entry that carries it);
    `owner`, `contribution` (its leaf), `commitment`, `leaves` (the readings it cites) from the contribution;
    `query`, `from_ms`, `to_ms` from the study; `cited` from `cited_leaves` on the auditor's own ledger;
    `epochs` the (device, epoch) pairs the `study.disclose` entry lists: only their keys are used, so what the
    access record says was disclosed is all the audit reads.
    """
    if disclosure is None:
        return Verdict.mismatch("disclosure_does_not_open")
    values = [market.signed(int(x)) for x in vector]
    if market.commitment(values, disclosure.salt) != commitment:
        return Verdict.mismatch("commitment_mismatch")
    kind = query["kind"]
    readings: list[tuple[int, bytes, bytes]] = []  # (leaf, cose, device pk)
    for leaf in leaves:
        held = cited.get(leaf)
        msg = _event_of(held)
        if held is None or msg is None or held.device_owner != owner or held.device_pk is None:
            return Verdict.mismatch("leaf_not_hers")
        ts = msg.payload.get("ts")
        if (msg.payload.get("kind") != kind or type(ts) is not int or not from_ms <= ts < to_ms
                or not 0 <= leaf < contribution):
            return Verdict.mismatch("leaf_out_of_study")
        readings.append((leaf, Entry.decode(held.entry).cose, held.device_pk))
    listed = set(epochs)
    keys = {epoch: key for epoch, key in disclosure.data_keys.items() if epoch in listed}
    opened: list[dict[str, Any]] = []
    for leaf, cose, pk in readings:
        ct = disclosure.records.get(leaf)
        if ct is None:
            return Verdict.mismatch("reading_does_not_open")
        try:
            reading = open_record(cose, ct, {envelope.parse(cose).kid: pk}, keys)
        except RecordRejected:
            return Verdict.mismatch("reading_does_not_open")
        opened.append({"index": leaf, **reading})
    try:
        value = measures.measure(query["type"], kind, opened, int(to_ms))
        expected = contribution_vector(query, value)
    except (measures.NoMeasure, ValueError):
        return Verdict.mismatch("value_mismatch")
    return MATCH if expected == values else Verdict.mismatch("value_mismatch")


def _event_of(held: CitedLeaf | None) -> envelope.Sign1 | None:
    if held is None:
        return None
    try:
        entry = Entry.decode(held.entry)
        return envelope.parse(entry.cose) if entry.type == ENTRY_EVENT else None
    except (EntryError, envelope.EnvelopeError):
        return None
