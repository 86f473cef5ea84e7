"""Owner-authorized access to sealed records: the messages and the sealing the rules, miners, bridge and clients
share (docs/protocol.md, "Protocol v2: sealed readings"; docs/access.md for the protocol).

Sans-IO: no clock, no disk, no network. `seal_to_miner` draws its ephemeral key inside libsodium (a sealed
box is randomized by construction); everything else is a pure function of its arguments.

- key fragments travel in the owner's `access.grant`, each sealed to the Ed25519 key of the miner chosen
  for it (`seal_to_miner`, `open_sealed_kfrag`), miners chosen by `choose_miners` from a final checkpoint's
  seed so neither the bridge nor one miner can pick them;
- a miner answers with a signed `CapsuleFragments` message carrying the inclusion proof of the grant;
- the requester asks the bridge for ciphertexts with a signed `RecordsRequest` and gets `RecordsPage`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import nacl.bindings
import nacl.exceptions
import nacl.public
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from carechain import cbor, envelope, merkle, seed
from carechain.errors import FixedReasonError
from carechain.identity import PUBLIC_KEY_SIZE, Identity, device_id_for
from carechain.sealed import MAX_CIPHERTEXT_BYTES

__all__ = ["ACCESS_SEED_PURPOSE", "MAX_CAPSULE_FRAGMENTS_BYTES", "MAX_FRAGS_PER_MESSAGE", "MAX_RECORDS_PAGE_BYTES",
           "AccessMessageError", "CapsuleFragments", "Fragment", "GrantProof", "Record", "RecordsPage",
           "RecordsRequest", "choose_miners", "decode_records_page", "encode_records_page", "open_sealed_kfrag",
           "parse_capsule_fragments", "parse_records_request", "parse_signed_records_page", "record_size",
           "request_hash", "seal_to_miner", "sign_capsule_fragments", "sign_records_page", "sign_records_request",
           "signer_of"]

ACCESS_SEED_PURPOSE = "access.miners"
MESSAGE_VERSION = 1
MAX_SEALED_KFRAG_BYTES = 2048  # a kfrag (~310 bytes in umbral-pre 0.11) plus the 48-byte sealed-box overhead
MAX_CAPSULE_FRAGMENTS_BYTES = 1024 * 1024
MAX_FRAGS_PER_MESSAGE = 2048  # a miner splits a larger grant into several messages
MAX_CFRAG_BYTES = 1024
MAX_CHECKPOINT_CHARS = 16 * 1024  # a checkpoint note with its bridge signature and miners' cosignature lines
MAX_RECORDS_PAGE_BYTES = 900_000  # below mosquitto's and the bridge's packet limits, with room for the topic
SIGNED_PAGE_OVERHEAD = 256  # the COSE_Sign1 around a page: headers, the bridge's kid, the signature
MAX_RECORDS_REQUEST_BYTES = 512
MAX_EVENT_BYTES = envelope.MAX_ENVELOPE_BYTES
MAX_REGISTRATION_BYTES = 4096
MAX_PAGE = 2**31 - 1
_ID = r"^[a-z2-7]{1,64}$"
_SEALED_BOX_OVERHEAD = 48  # ephemeral X25519 key (32) + Poly1305 tag (16)

Index = Annotated[int, Field(ge=0, le=2**63 - 1)]
PartyId = Annotated[str, Field(pattern=_ID)]
_strict = ConfigDict(extra="forbid", frozen=True, strict=True)


class AccessMessageError(FixedReasonError):
    """An access message (capsule fragments, records request or page) that is malformed, too large, or not
    signed by whom it must be."""

    REASON = "bad_access_message"


# -- key fragments sealed to miners -------------------------------------------------------------------


def seal_to_miner(miner_ed25519_pk: bytes, kfrag: bytes) -> bytes:
    """`kfrag` in a libsodium sealed box to the X25519 form of the miner's Ed25519 key: only that miner opens it."""
    if len(miner_ed25519_pk) != PUBLIC_KEY_SIZE:
        raise ValueError(f"a miner's Ed25519 key has {PUBLIC_KEY_SIZE} bytes, got {len(miner_ed25519_pk)}")
    if not kfrag or len(kfrag) > MAX_SEALED_KFRAG_BYTES - _SEALED_BOX_OVERHEAD:
        raise ValueError(f"a key fragment has 1 to {MAX_SEALED_KFRAG_BYTES - _SEALED_BOX_OVERHEAD} bytes, "
                         f"got {len(kfrag)}")
    return _seal_to_ed25519(miner_ed25519_pk, kfrag)


def _seal_to_ed25519(ed25519_pk: bytes, data: bytes) -> bytes:
    """`data` in a libsodium sealed box to the X25519 form of an Ed25519 key (shared with carechain.market)."""
    try:
        x25519 = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(bytes(ed25519_pk))
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError) as exc:  # not a point on the curve
        raise ValueError(f"the miner's key is not a valid Ed25519 public key: {exc}") from None
    return bytes(nacl.public.SealedBox(nacl.public.PublicKey(x25519)).encrypt(bytes(data)))


def _open_sealed_box(identity: Identity, sealed: bytes) -> bytes | None:
    """What `_seal_to_ed25519` sealed to `identity`'s key; None when sealed to another key or altered."""
    try:
        return bytes(nacl.public.SealedBox(identity.sealed_box_private_key()).decrypt(bytes(sealed)))
    except nacl.exceptions.CryptoError:
        return None


def open_sealed_kfrag(miner: Identity, sealed: bytes) -> bytes:
    """The key fragment sealed to `miner`; AccessMessageError when it was sealed to another key or altered."""
    if not _SEALED_BOX_OVERHEAD < len(sealed) <= MAX_SEALED_KFRAG_BYTES:
        raise AccessMessageError(f"a sealed key fragment has {_SEALED_BOX_OVERHEAD + 1} to {MAX_SEALED_KFRAG_BYTES} "
                                 f"bytes, got {len(sealed)}")
    opened = _open_sealed_box(miner, sealed)
    if opened is None:
        raise AccessMessageError(f"the sealed key fragment does not open with miner {miner.device_id}'s key "
                                 "(sealed to another miner, or altered)")
    return opened


# -- choosing miners ------------------------------------------------------------------------------------


def choose_miners(seed_value: bytes, miners: Sequence[str], n: int, request_hash: bytes) -> list[str]:
    """`n` distinct miners for one access request, from a final checkpoint's seed (`carechain.seed`).

    A partial Fisher–Yates shuffle of the sorted miner ids, each draw `uniform_below(seed, "access.miners",
    remaining, request_hash, i)`: everybody (the owner, the rules, a miner) computes the same list, and
    nobody can steer it without grinding the cosigned checkpoint.
    """
    if len(set(miners)) != len(miners):
        raise ValueError("the registered miners must be distinct")
    if not 1 <= n <= len(miners):
        raise ValueError(f"cannot choose {n} distinct miners out of {len(miners)}")
    if len(request_hash) != merkle.HASH_SIZE:
        raise ValueError(f"a request hash has {merkle.HASH_SIZE} bytes, got {len(request_hash)}")
    pool = sorted(miners)
    for i in range(n):
        j = i + seed.uniform_below(seed_value, ACCESS_SEED_PURPOSE, len(pool) - i, request_hash, i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:n]


def request_hash(request_entry_leaf: bytes) -> bytes:
    """What names an access request: the RFC 9162 leaf hash of its `access.request` entry's bytes."""
    return merkle.leaf_hash(request_entry_leaf)


# -- capsule fragments (miner → requester) ----------------------------------------------------------------


class _Message(BaseModel):
    model_config = _strict


class GrantProof(_Message):
    """The inclusion proof of the grant leaf under a final checkpoint (the note with its cosignature lines)."""

    size: Index
    path: list[Annotated[bytes, Field(min_length=32, max_length=32)]] = Field(max_length=merkle.MAX_PROOF_LENGTH)
    checkpoint: str = Field(min_length=1, max_length=MAX_CHECKPOINT_CHARS)


class Fragment(_Message):
    """One capsule fragment: the re-encryption of the capsule of `dev`'s `epoch`. On the wire `[dev, epoch, cfrag]`."""

    dev: PartyId
    epoch: Index
    cfrag: bytes = Field(min_length=1, max_length=MAX_CFRAG_BYTES)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != 3:
                raise ValueError("a fragment is [dev, epoch, cfrag]")
            return {"dev": value[0], "epoch": value[1], "cfrag": value[2]}
        return value

    def to_wire(self) -> list[Any]:
        return [self.dev, self.epoch, self.cfrag]


class CapsuleFragments(_Message):
    """A miner's capsule fragments for one access record (`access` = the grant's leaf index)."""

    v: Literal[1]
    access: Index
    miner: PartyId
    frags: list[Fragment] = Field(min_length=1, max_length=MAX_FRAGS_PER_MESSAGE)
    proof: GrantProof

    @model_validator(mode="after")
    def _one_fragment_per_epoch(self) -> CapsuleFragments:
        if len({(f.dev, f.epoch) for f in self.frags}) != len(self.frags):
            raise ValueError("two fragments for the same (dev, epoch)")
        return self

    def to_wire(self) -> dict[str, Any]:
        return {"v": self.v, "access": self.access, "miner": self.miner, "frags": [f.to_wire() for f in self.frags],
                "proof": self.proof.model_dump()}


def sign_capsule_fragments(miner: Identity, access: int, frags: Sequence[tuple[str, int, bytes]],
                           proof: GrantProof) -> bytes:
    """The COSE_Sign1 (kid = the miner's id) of a miner's capsule fragments for the grant at leaf `access`."""
    message = _validated(CapsuleFragments, {
        "v": MESSAGE_VERSION, "access": access, "miner": miner.device_id,
        "frags": [Fragment(dev=d, epoch=e, cfrag=c) for d, e, c in frags], "proof": proof})
    raw = envelope.sign(miner, message.to_wire())
    if len(raw) > MAX_CAPSULE_FRAGMENTS_BYTES:
        raise AccessMessageError(f"capsule fragments message of {len(raw)} bytes exceeds the limit of "
                                 f"{MAX_CAPSULE_FRAGMENTS_BYTES}; send fewer fragments per message")
    return raw


def parse_capsule_fragments(raw: bytes, miner_pk: bytes) -> CapsuleFragments:
    """A capsule-fragments message verified as signed by `miner_pk`, naming that miner. The fragments themselves
    are checked by `reencryption.verify_cfrag` against the anchored capsules."""
    sign1 = _verified(raw, miner_pk, MAX_CAPSULE_FRAGMENTS_BYTES, "capsule fragments")
    message = _validated(CapsuleFragments, sign1.payload)
    if message.miner != sign1.kid:
        raise AccessMessageError(f"capsule fragments name miner {message.miner} but are signed by {sign1.kid}")
    return message


def signer_of(raw: bytes) -> str:
    """The signer id (kid) an access message claims, to look up its key; nothing is verified yet."""
    try:
        return envelope.parse(raw, max_bytes=MAX_CAPSULE_FRAGMENTS_BYTES, max_depth=5).kid
    except envelope.EnvelopeError as exc:
        raise AccessMessageError(f"not a signed access message: {exc}") from None


# -- ciphertext pages (requester ↔ bridge) ----------------------------------------------------------------


class RecordsRequest(_Message):
    """A requester's signed ask for page `page` of the records of the access record at leaf `access`."""

    v: Literal[1]
    access: Index
    page: int = Field(ge=0, le=MAX_PAGE)


def sign_records_request(requester: Identity, access: int, page: int) -> bytes:
    """The COSE_Sign1 of a records request, signed by the requester named in the access record."""
    message = _validated(RecordsRequest, {"v": MESSAGE_VERSION, "access": access, "page": page})
    return envelope.sign(requester, message.model_dump())


def parse_records_request(raw: bytes, requester_pk: bytes) -> RecordsRequest:
    """A records request verified as signed by `requester_pk` (whose id is the kid: see `signer_of`)."""
    sign1 = _verified(raw, requester_pk, MAX_RECORDS_REQUEST_BYTES, "records request")
    return _validated(RecordsRequest, sign1.payload)


class Record(_Message):
    """One sealed reading: its leaf index, the device-signed COSE_Sign1 and the ciphertext it anchors the hash of.
    On the wire `[index, cose, ct]`."""

    index: Index
    cose: bytes = Field(min_length=1, max_length=MAX_EVENT_BYTES)
    ct: bytes = Field(min_length=1, max_length=MAX_CIPHERTEXT_BYTES)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != 3:
                raise ValueError("a record is [index, cose, ct]")
            return {"index": value[0], "cose": value[1], "ct": value[2]}
        return value

    def to_wire(self) -> list[Any]:
        return [self.index, self.cose, self.ct]


class RecordsPage(_Message):
    """One page of the records of an access record (bridge → requester's inbox), signed by the bridge
    (`sign_records_page`); every part also verifies on its own — events by their devices' signatures,
    registrations against the log, ciphertexts by the hash their signed event carries."""

    v: Literal[1]
    access: Index
    page: int = Field(ge=0, le=MAX_PAGE)
    pages: int = Field(ge=1, le=MAX_PAGE + 1)  # how many pages the answer has: a requester asks for the rest at once
    last: bool
    epochs: list[Annotated[bytes, Field(min_length=1, max_length=MAX_EVENT_BYTES)]]  # COSE of epoch_key events
    registrations: list[Annotated[bytes, Field(min_length=1, max_length=MAX_REGISTRATION_BYTES)]]  # entry leaves
    records: list[Record]

    @model_validator(mode="after")
    def _page_in_range(self) -> RecordsPage:
        if self.page >= self.pages or self.last != (self.page == self.pages - 1):
            raise ValueError(f"page {self.page} (last: {self.last}) does not fit an answer of {self.pages} pages")
        return self

    def to_wire(self) -> dict[str, Any]:
        return {"v": self.v, "access": self.access, "page": self.page, "pages": self.pages, "last": self.last,
                "epochs": list(self.epochs), "registrations": list(self.registrations),
                "records": [r.to_wire() for r in self.records]}


def record_size(index: int, cose: bytes, ct: bytes) -> int:
    """The bytes one record adds to an encoded page, so the bridge fills a page up to MAX_RECORDS_PAGE_BYTES."""
    return len(cbor.encode([index, cose, ct]))


def encode_records_page(page: RecordsPage) -> bytes:
    """Deterministic CBOR of a page; AccessMessageError if it exceeds MAX_RECORDS_PAGE_BYTES."""
    raw = cbor.encode(page.to_wire())
    if len(raw) > MAX_RECORDS_PAGE_BYTES:
        raise AccessMessageError(f"records page of {len(raw)} bytes exceeds the limit of {MAX_RECORDS_PAGE_BYTES}")
    return raw


def sign_records_page(bridge: Identity, page: RecordsPage) -> bytes:
    """A page as the bridge sends it: signed by its log key. Anyone may write to a requester's inbox, so only
    the bridge's signature says a page — and which page is the last — is the bridge's answer."""
    encode_records_page(page)  # the size limit
    return envelope.sign(bridge, page.to_wire())


def parse_signed_records_page(raw: bytes, bridge_keys: Mapping[str, bytes]) -> RecordsPage:
    """A page from untrusted bytes, signed by one of `bridge_keys` (kid → public key: the genesis operators)."""
    try:
        msg = envelope.parse(raw, max_bytes=MAX_RECORDS_PAGE_BYTES + SIGNED_PAGE_OVERHEAD, max_depth=3)
    except envelope.EnvelopeError as exc:
        raise AccessMessageError(f"records page is not a signed message: {exc}") from None
    key = bridge_keys.get(msg.kid)
    if key is None or not msg.verify(key):
        raise AccessMessageError(f"records page is not signed by the bridge (signer {msg.kid!r})")
    return decode_records_page(msg.payload_bytes)


def decode_records_page(raw: bytes) -> RecordsPage:
    """A page from untrusted bytes: size-bounded, strict deterministic CBOR, exactly the page's fields."""
    if len(raw) > MAX_RECORDS_PAGE_BYTES:
        raise AccessMessageError(f"records page of {len(raw)} bytes exceeds the limit of {MAX_RECORDS_PAGE_BYTES}")
    try:
        value = cbor.decode(raw, max_depth=3)
    except cbor.CBORError as exc:
        raise AccessMessageError(f"records page is not valid CBOR: {exc}") from None
    page = _validated(RecordsPage, value)
    if cbor.encode(page.to_wire()) != raw:
        raise AccessMessageError("records page is not deterministically encoded")
    return page


# -- shared checks -----------------------------------------------------------------------------------------

_Model = TypeVar("_Model", bound=BaseModel)


def _verified(raw: bytes, public_key: bytes, max_bytes: int, what: str) -> envelope.Sign1:
    try:
        sign1 = envelope.parse(raw, max_bytes=max_bytes, max_depth=5)
    except envelope.EnvelopeError as exc:
        raise AccessMessageError(f"{what}: not a valid COSE_Sign1: {exc}") from None
    if len(public_key) != PUBLIC_KEY_SIZE or sign1.kid != device_id_for(public_key):
        raise AccessMessageError(f"{what}: signed as {sign1.kid}, not by the expected key")
    if not sign1.verify(public_key):
        raise AccessMessageError(f"{what}: the signature of {sign1.kid} does not verify")
    return sign1


def _validated(model: type[_Model], value: Any) -> _Model:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        raise AccessMessageError(f"{model.__name__}: {loc}: {err['msg']}") from None

