"""Topic names: only well-formed device ids, nothing smuggled after them."""

from __future__ import annotations

import pytest

from carechain import topics


def test_event_topic_round_trip() -> None:
    assert topics.device_of_event_topic(topics.events("abc234")) == "abc234"


def test_receipt_topic_round_trip_and_nothing_else_is_one() -> None:
    assert topics.device_of_receipt_topic(topics.receipts("abc234")) == "abc234"
    for topic in ("cc/v1/dev/abc/ev", "cc/v1/dev/abc/rcpt\n", "cc/v1/dev/ABC/rcpt", "cc/v1/dev/a/b/rcpt",
                  "cc/v2/dev/abc/rcpt", "cc/v1/dev/abc/status"):
        assert topics.device_of_receipt_topic(topic) is None


@pytest.mark.parametrize("topic", [
    "cc/v1/dev/abc/ev\n", "cc/v1/dev/abc\n/ev", "cc/v1/dev/ABC/ev", "cc/v1/dev/a/b/ev", "cc/v1/dev//ev",
    "cc/v2/dev/abc/ev", "cc/v1/dev/abc/rcpt", "xcc/v1/dev/abc/ev",
])
def test_anything_else_is_not_an_event_topic(topic: str) -> None:
    assert topics.device_of_event_topic(topic) is None


@pytest.mark.parametrize("device_id", ["abc\n", "", "a" * 65, "abc/def", "abc+", "ab1"])
def test_topic_builders_refuse_malformed_device_ids(device_id: str) -> None:
    with pytest.raises(ValueError):
        topics.events(device_id)
    with pytest.raises(ValueError):
        topics.receipts(device_id)
