"""MQTT topic names of wire protocol v1. The version is in the topic so bridges can serve several."""

from __future__ import annotations

import re

PREFIX = "cc/v1"
EVENTS_WILDCARD = f"{PREFIX}/dev/+/ev"
CHECKPOINT = f"{PREFIX}/log/checkpoint"
_DEVICE_ID = re.compile(r"[a-z2-7]{1,64}")  # always fullmatch: `$` would accept a trailing newline
_EVENT_TOPIC = re.compile(rf"{PREFIX}/dev/([^/]+)/ev")


def events(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/ev"


def receipts(device_id: str) -> str:
    return f"{PREFIX}/dev/{_checked(device_id)}/rcpt"


def device_of_event_topic(topic: str) -> str | None:
    """The device id named by an event topic, or None when the topic is not one."""
    m = _EVENT_TOPIC.fullmatch(topic)
    return m.group(1) if m and _DEVICE_ID.fullmatch(m.group(1)) else None


def _checked(device_id: str) -> str:
    if not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"{device_id!r} is not a device id (lowercase base32)")
    return device_id
