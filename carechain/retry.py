"""When to try again after a connection attempt fails or a link drops: the one retry policy.

Both reconnect loops use it: a BLE device's session (scan → connect → subscribe → stream, in
`edge_agent.sources.ble`) and every MQTT client (`carechain.transport`, whose delays replace paho's
own backoff, which has no jitter: a fleet would reconnect in lockstep after a broker restart).

Sans-IO, like bleak-retry-connector's backoff but for the whole session, not just the connect call:
the caller reports what happened with the time it happened, and asks how long to wait. Delays grow
exponentially with consecutive failures, capped, with jitter so that many devices that lost the same
adapter (or clients that lost the same broker) do not all reconnect in the same instant. A link that stayed up
for `stable_s` counts as a success and resets the count; one that drops at once counts as a failure, so
a device that accepts and immediately drops connections cannot make the agent spin.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReconnectPolicy:
    """Backoff settings; the defaults suit a Pi with a handful of BLE health devices."""

    initial_s: float = 0.5  # first wait after a failure
    factor: float = 2.0  # each further consecutive failure multiplies the wait
    max_s: float = 60.0  # never wait longer than this
    jitter: float = 0.2  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]
    stable_s: float = 10.0  # a link up at least this long resets the backoff

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s):
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        if self.factor < 1:
            raise ValueError(f"factor must be at least 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.stable_s < 0:
            raise ValueError(f"stable_s must not be negative, got {self.stable_s}")


# MQTT clients: a broker restart is seen by every client at once, so the first retry waits about a second
# (jittered) and a broker that stays down is tried every ~30 s.
MQTT_RECONNECT = ReconnectPolicy(initial_s=1.0, max_s=30.0)


@dataclass
class Backoff:
    """The retry state of one link (a BLE device, an MQTT client) under a `ReconnectPolicy`."""

    policy: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0  # consecutive failures so far
    _up_since: float | None = None

    def connected(self, now_s: float) -> None:
        """The link is up (connected and subscribed) as of `now_s`."""
        self._up_since = now_s

    def link_lost(self, now_s: float) -> float:
        """The link dropped (or the session ended in error) at `now_s`: the seconds to wait before retrying."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and now_s - up_since >= self.policy.stable_s:
            self.failures = 0
        return self.failed()

    def was_stable(self, now_s: float) -> bool:
        """Whether the link, up now, has been up for at least `stable_s` as of `now_s`."""
        return self._up_since is not None and now_s - self._up_since >= self.policy.stable_s

    def failed(self) -> float:
        """An attempt failed (device not found, connect or setup error): the seconds to wait."""
        p = self.policy
        base = min(p.max_s, p.initial_s * p.factor ** min(self.failures, 64))
        self.failures += 1
        return min(p.max_s, base * self.rng.uniform(1 - p.jitter, 1 + p.jitter))
