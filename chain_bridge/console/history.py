"""Ring buffers of the figures the console charts: ingest rate, latency, finality lag, storage shares.

Sampled once per refresh (`cfg.refresh_s`) from counters, so memory is fixed (`POINTS` samples per series) and a
chart covers the last POINTS × refresh_s seconds (4 minutes at the default 2 s).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

POINTS = 120
SERIES = ("ingest_rate", "latency_p50", "latency_p99", "finality_lag", "storage_shares")


@dataclass(frozen=True)
class Sample:
    anchored: int  # the bridge's anchored counter (monotonic while it runs)
    latency_p50: float | None
    latency_p99: float | None
    finality_lag: float | None  # seconds between the newest checkpoint and the newest final one
    storage_shares: int


class History:
    """Fixed-size series; `add` turns the anchored counter into a rate (events/s) between samples."""

    def __init__(self, points: int = POINTS) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, deque[float | None]] = {name: deque(maxlen=points) for name in SERIES}
        self._last: tuple[float, int] | None = None

    def add(self, now_s: float, sample: Sample) -> None:
        """Record one sample taken at monotonic time `now_s`."""
        with self._lock:
            rate: float | None = None
            if self._last is not None and now_s > self._last[0]:
                rate = max(0, sample.anchored - self._last[1]) / (now_s - self._last[0])
            self._last = (now_s, sample.anchored)
            for name, value in (("ingest_rate", rate), ("latency_p50", sample.latency_p50),
                                ("latency_p99", sample.latency_p99), ("finality_lag", sample.finality_lag),
                                ("storage_shares", float(sample.storage_shares))):
                self._series[name].append(value)

    def series(self) -> dict[str, list[float | None]]:
        """Every series, oldest first (None where a figure was not measured)."""
        with self._lock:
            return {name: list(values) for name, values in self._series.items()}

    def latest_rate(self) -> float | None:
        with self._lock:
            values = self._series["ingest_rate"]
            return values[-1] if values else None
