"""A pull from the JetStream work queue takes about one commit's worth of events, whatever the messages hold:
pulling `batch_max` *messages* of 64-event batch messages handed one ingest worker 64 commits' worth while the
others waited (bench/ingest.py: workers at 7 % and 62 % CPU, a multi-second p99). A real 3-node cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carechain import envelope, topics
from carechain.batch import encode_batch
from carechain.events import make_payload
from tests.test_nats_ingest import (  # noqa: F401 - `cluster` is the module's fixture
    DEVICES,
    _mqtt,
    cluster,
    password,
    pulling_source,
)

pytestmark = pytest.mark.integration


def test_a_pull_takes_about_batch_max_events_of_batch_messages_not_batch_max_messages(cluster, tmp_path: Path) -> None:
    ledger, source = pulling_source(cluster, tmp_path, batch_max=100)
    dev = DEVICES[5]
    device, _, _ = _mqtt(cluster.mqtt(1, dev.device_id, password(dev.device_id)), "pull-size")
    now = int(time.time() * 1000)
    try:
        for m in range(20):  # 20 batch messages of 64 events: 1,280 events
            events = [envelope.sign(dev, make_payload(dev.device_id, seq, now, "heart_rate", {"bpm": 70}))
                      for seq in range(m * 64, (m + 1) * 64)]
            device.publish(topics.events(dev.device_id), encode_batch(events), qos=1).wait_for_publish(10)
        pulls: list[int] = []
        deadline = time.monotonic() + 30
        while sum(pulls) < 1280 and time.monotonic() < deadline:
            verdicts = source.receive(0.5)
            if verdicts:
                pulls.append(len(verdicts))
                source.settle()
        assert sum(pulls) == 1280
        assert max(pulls) <= 128, pulls  # at most two 64-event messages for a batch_max of 100
        assert source.fetch_count() == 2  # learned: 100 events ÷ 64 per message
    finally:
        source.stop()
        device.disconnect()
        device.loop_stop()
        ledger.close()
