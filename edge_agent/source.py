"""What a source of readings is: the `Reading` it yields and the `Source` protocol the agent samples.

A reading is a kind (`carechain.events` kind name, e.g. "heart_rate") and its body model. Simulated
devices, GATT parsers and the BLE source all produce this one type; the agent signs each into an event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from carechain.events import EventBody

Reading = tuple[str, EventBody]


class Source(Protocol):
    """Anything that yields readings for one device (simulated, pharmacy terminal), sans-IO: asked at a
    time, it returns the readings due then and says when the next one is due. (A BLE device pushes its
    readings instead: `edge_agent.sources.ble`.)"""

    def next_readings(self, now_ms: int) -> Sequence[Reading]: ...

    def next_due_ms(self) -> int | None: ...
