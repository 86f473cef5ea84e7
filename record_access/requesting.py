"""The requester's side of an access request: build and sign it, and carry it to the owner as a file.

A request is an `access.request` ledger entry signed by the requester (a registered party with a
re-encryption key). It travels to the owner unchanged, as a file or on the owner's inbox topic, and the
owner's `grant` appends exactly these bytes: the owner cannot invent a request, and the requester cannot
deny one. Pure: the nonce and the time are arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from carechain import envelope
from carechain.entries import ACCESS_REQUEST, Entry, EntryError
from carechain.identity import Identity, device_id_for, parse_public_key_hex
from contract_rules import transactions as ce

REQUEST_FILE_FORMAT = "carechain-access-request-v1"
MAX_REQUEST_FILE_BYTES = 64 * 1024


class RequestError(ValueError):
    """A request that cannot be used: the message says what is wrong with which input."""


@dataclass(frozen=True)
class SignedRequest:
    """An `access.request` entry, its verified payload and the requester's public key."""

    entry: Entry
    request: ce.AccessRequest
    requester_pk: bytes

    @property
    def requester(self) -> str:
        return device_id_for(self.requester_pk)

    def leaf(self) -> bytes:
        return self.entry.encode()

    def to_json(self) -> dict[str, Any]:
        return {"format": REQUEST_FILE_FORMAT, "leaf": self.leaf().hex(),
                "requester_public_key": self.requester_pk.hex()}


def build_request(requester: Identity, *, owner: str, devices: list[str], kinds: list[str], from_ms: int, to_ms: int,
                  purpose: str, expires_ms: int, nonce: int, ts: int) -> SignedRequest:
    """Sign an access request for the owner's records in [from_ms, to_ms) (empty devices/kinds = all)."""
    if to_ms < from_ms:
        raise RequestError(f"the time range is empty: to ({to_ms}) must be after from ({from_ms})")
    try:
        request = ce.AccessRequest(owner=owner, devices=devices, kinds=kinds, from_ms=from_ms, to_ms=to_ms,
                                   purpose=purpose, expires_ms=expires_ms, nonce=nonce, ts=ts)
    except ValueError as exc:
        raise RequestError(f"invalid access request: {_first_error(exc)}") from None
    entry = ce.access_request_entry(requester, request)
    return SignedRequest(entry, request, requester.public_key)


def parse_request_leaf(leaf: bytes, requester_pk: bytes | None = None) -> SignedRequest:
    """Decode and verify a request entry; with `requester_pk`, it must be that key's signature."""
    try:
        entry = Entry.decode(leaf, types=frozenset({ACCESS_REQUEST}))
        msg = envelope.parse(entry.cose)
    except (EntryError, envelope.EnvelopeError) as exc:
        raise RequestError(f"not an access.request entry: {exc}") from None
    if requester_pk is None:
        raise RequestError("the requester's public key is needed to check the request's signature")
    if device_id_for(requester_pk) != msg.kid:
        raise RequestError(f"the request is signed by {msg.kid}, not by the key given ({device_id_for(requester_pk)})")
    if not msg.verify(requester_pk):
        raise RequestError(f"the request's signature by {msg.kid} does not verify")
    try:
        request = ce.AccessRequest.model_validate(msg.payload)
    except ValueError as exc:
        raise RequestError(f"invalid access request: {_first_error(exc)}") from None
    return SignedRequest(entry, request, requester_pk)


def parse_request_file(data: bytes) -> SignedRequest:
    """A request file (`to_json`), checked: format, size, and the requester's signature over the entry."""
    if len(data) > MAX_REQUEST_FILE_BYTES:
        raise RequestError(f"a request file is at most {MAX_REQUEST_FILE_BYTES} bytes, got {len(data)}")
    try:
        raw = json.loads(data)
        if raw.get("format") != REQUEST_FILE_FORMAT:
            raise RequestError(f"not a carechain access request file (format {raw.get('format')!r})")
        leaf = bytes.fromhex(raw["leaf"])
        pk = parse_public_key_hex(raw["requester_public_key"], "requester_public_key")
    except RequestError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RequestError(f"not a carechain access request file: {exc!r:.120}") from None
    return parse_request_leaf(leaf, pk)


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
    return str(exc)
