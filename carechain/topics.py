"""MQTT topic names of wire protocol v1. The version is in the topic so bridges can serve several."""

from __future__ import annotations

import re

PREFIX = "cc/v1"
EVENTS_WILDCARD = f"{PREFIX}/dev/+/ev"
STATUS_WILDCARD = f"{PREFIX}/dev/+/status"  # device → bridge, QoS 0: outbox depth and battery (carechain.device_status)
CHECKPOINT = f"{PREFIX}/log/checkpoint"
FINAL_CHECKPOINT = f"{PREFIX}/log/final"  # retained: the latest checkpoint with its t-of-n miner cosignatures
MINER_REQUEST_WILDCARD = f"{PREFIX}/miner/+/req"
MINER_COSIG_WILDCARD = f"{PREFIX}/miner/+/cosig"
MINER_EVIDENCE_WILDCARD = f"{PREFIX}/miner/+/evidence"
MINER_HELLO_WILDCARD = f"{PREFIX}/miner/+/hello"
MINER_STUDY_WILDCARD = f"{PREFIX}/miner/+/study"
_DEVICE_ID = re.compile(r"[a-z2-7]{1,64}")  # always fullmatch: `$` would accept a trailing newline
_EVENT_TOPIC = re.compile(rf"{PREFIX}/dev/([^/]+)/ev")
_STATUS_TOPIC = re.compile(rf"{PREFIX}/dev/([^/]+)/status")
_RECEIPT_TOPIC = re.compile(rf"{PREFIX}/dev/([^/]+)/rcpt")
_MINER_TOPIC = re.compile(rf"{PREFIX}/miner/([^/]+)/(req|resp|cosig|evidence|hello|study)")


def events(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/ev"


def receipts(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/rcpt"


def device_of_event_topic(topic: str) -> str | None:
    """The device id named by an event topic, or None when the topic is not one."""
    m = _EVENT_TOPIC.fullmatch(topic)
    return m.group(1) if m and _DEVICE_ID.fullmatch(m.group(1)) else None


def device_of_receipt_topic(topic: str) -> str | None:
    """The device id named by a receipt topic, or None when the topic is not one."""
    m = _RECEIPT_TOPIC.fullmatch(topic)
    return m.group(1) if m and _DEVICE_ID.fullmatch(m.group(1)) else None


def status(device_id: str) -> str:
    """Device → bridge (QoS 0, not retained): the device's signed status report, never a reading."""
    return f"{PREFIX}/dev/{_checked(device_id)}/status"


def device_of_status_topic(topic: str) -> str | None:
    """The device id named by a status topic, or None when the topic is not one."""
    m = _STATUS_TOPIC.fullmatch(topic)
    return m.group(1) if m and _DEVICE_ID.fullmatch(m.group(1)) else None


def miner_request(miner_id: str) -> str:
    """Miner → bridge: proof requests (docs/miners.md)."""
    return f"{PREFIX}/miner/{_checked(miner_id)}/req"


def miner_response(miner_id: str) -> str:
    """Bridge → miner: proofs and entries."""
    return f"{PREFIX}/miner/{_checked(miner_id)}/resp"


def miner_cosignature(miner_id: str) -> str:
    """Miner → all (retained): its latest cosignature."""
    return f"{PREFIX}/miner/{_checked(miner_id)}/cosig"


def miner_evidence(miner_id: str) -> str:
    """Miner → all (retained): evidence of a log's misbehaviour."""
    return f"{PREFIX}/miner/{_checked(miner_id)}/evidence"


def miner_hello(miner_id: str) -> str:
    """Miner → all (retained): its signed announcement, for discovery; its last will empties it, so a miner
    that dies disappears without saying goodbye."""
    return f"{PREFIX}/miner/{_checked(miner_id)}/hello"


def miner_study(miner_id: str) -> str:
    """Miner → bridge: its signed study and trial entries (study.result/sample/audit from its aggregator login;
    trial.commit/reveal/recover/unblind_key from its own session) — docs/market.md, docs/trials.md."""
    return f"{PREFIX}/miner/{_checked(miner_id)}/study"


def miner_of_topic(topic: str) -> tuple[str, str] | None:
    """(miner id, kind) of a miner topic, kind one of req/resp/cosig/evidence/hello/study; None when it is not
    one."""
    return _id_and_kind(_MINER_TOPIC, topic)


def _id_and_kind(pattern: re.Pattern[str], topic: str) -> tuple[str, str] | None:
    m = pattern.fullmatch(topic)
    return (m.group(1), m.group(2)) if m and _DEVICE_ID.fullmatch(m.group(1)) else None


def _checked(device_id: str) -> str:
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"{device_id!r} is not a device or miner id (lowercase base32, as Identity.device_id)")
    return device_id


# -- storage miners (issue 7; chain_miner/storage_server.py) ---------------------------------------------
STORE_REQUEST_WILDCARD = f"{PREFIX}/store/+/req"
STORE_RESPONSE_WILDCARD = f"{PREFIX}/store/+/resp"
STORE_HELLO_WILDCARD = f"{PREFIX}/store/+/hello"
_STORE_TOPIC = re.compile(rf"{PREFIX}/store/([^/]+)/(req|resp|hello)")


def store_request(miner_id: str) -> str:
    """Owner → storage miner: store, fetch, audit or delete shares (CBOR, with a correlation id)."""
    return f"{PREFIX}/store/{_checked(miner_id)}/req"


def store_response(miner_id: str) -> str:
    """Storage miner → owners: answers, carrying the request's correlation id."""
    return f"{PREFIX}/store/{_checked(miner_id)}/resp"


def store_hello(miner_id: str) -> str:
    """Storage miner → all (retained): its announcement, for discovery; emptied when it stops."""
    return f"{PREFIX}/store/{_checked(miner_id)}/hello"


def store_miner_of_topic(topic: str) -> tuple[str, str] | None:
    """(miner id, kind) of a storage topic, kind one of req/resp/hello; None when it is not one."""
    return _id_and_kind(_STORE_TOPIC, topic)


# -- private records (issue 13; docs/protocol.md "Protocol v2: sealed readings") -------------------------
ACCESS_RECORDS = f"{PREFIX}/access/records"  # requesters → bridge: signed RecordsRequest
ACCESS_EVIDENCE = f"{PREFIX}/access/evidence"  # anyone → all: a miner's capsule fragments that do not verify
_PARTY_INBOX = re.compile(rf"{PREFIX}/party/([^/]+)/inbox")


def party_inbox(party_id: str) -> str:
    """→ one party: miners' capsule fragments and the bridge's record pages (the broker ACL lets only that
    party subscribe)."""
    return f"{PREFIX}/party/{_checked(party_id)}/inbox"


def party_of_inbox_topic(topic: str) -> str | None:
    """The party id named by an inbox topic, or None when the topic is not one."""
    m = _PARTY_INBOX.fullmatch(topic)
    return m.group(1) if m and _DEVICE_ID.fullmatch(m.group(1)) else None
