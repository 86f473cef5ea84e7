"""A miner reading the log from its C2SP tlog-tiles over HTTP(S) (`miner.tiles_url`) instead of asking the bridge.

The tiles may come from any web server or CDN, so nothing they hold is trusted: the served checkpoint must
verify with the log key, each entry bundle must match the leaf hashes of its level-0 tile
(`carechain.tile_client.TiledLog.entry_range`), and the witness then checks, before it runs a single entry
through the contracts, that the consistency path joins the root it cosigned to the checkpoint's root and that
the entries hash to that root. A tile server that is behind, down or wrong costs nothing but a fall back to the
bridge (`chain_miner.service`), whose answers are signed and so can become evidence; tiles cannot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from carechain.checkpoint import Checkpoint
from carechain.proofs import VerificationError
from carechain.retry import Backoff, ReconnectPolicy
from carechain.tile_client import DEFAULT_TIMEOUT_S, HttpTiles, TiledLog, TileFetchError

# A tile server that failed is not asked again for a while (each attempt may cost a whole timeout): the miner
# asks the bridge meanwhile. 2 s after a first failure, up to 60 s while it keeps failing.
TILES_RETRY = ReconnectPolicy(initial_s=2.0, max_s=60.0)
_T = TypeVar("_T")


class TilesBehind(TileFetchError):
    """The tile server does not serve the asked tree yet (its tiles are written after each checkpoint)."""


@dataclass(frozen=True)
class TileFetch:
    """What the witness needs to judge a move from `old_size` to `new_size`, read from tiles."""

    consistency_path: list[bytes]  # proves min(old, new) → max(old, new)
    entries: list[bytes]  # leaves old_size..new_size - 1 (none when the checkpoint is older)


class TileFeed:
    """The log of `log_public_key` as served in tiles below `url`."""

    def __init__(self, url: str, log_public_key: bytes, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = TiledLog(HttpTiles(url, timeout_s=timeout_s), log_public_key)
        self.url = self.log.source.base_url  # with its final slash
        self._clock = clock
        self._backoff = Backoff(TILES_RETRY)
        self._retry_at = 0.0

    def available(self) -> bool:
        """False for a while after the server failed (unreachable, an error, tiles that do not check)."""
        return self._clock() >= self._retry_at

    def failed(self) -> None:
        """The server failed, or served what the witness refused: leave it alone for a while."""
        self._retry_at = self._clock() + self._backoff.failed()

    def _attempt(self, read: Callable[[], _T]) -> _T:
        try:
            result = read()
        except TilesBehind:
            raise
        except TileFetchError:
            self.failed()
            raise
        self._backoff.failures = 0
        return result

    def checkpoint(self) -> tuple[Checkpoint, str]:
        """The served checkpoint and its note, verified with the log key (TileFetchError if it does not)."""
        return self._attempt(self._checkpoint)

    def _checkpoint(self) -> tuple[Checkpoint, str]:
        try:
            return self.log.checkpoint()
        except VerificationError as exc:
            raise TileFetchError(f"{self.url}checkpoint is not this log's: {exc}") from None

    def fetch(self, old_size: int, new_size: int) -> TileFetch:
        """The consistency path and the new entries between two tree sizes, from the tiles of the larger tree.
        TileFetchError when the server does not serve that tree yet (it is written after each checkpoint) or
        serves something that is not a tiled log."""
        return self._attempt(lambda: self._fetch(old_size, new_size))

    def _fetch(self, old_size: int, new_size: int) -> TileFetch:
        lo, hi = sorted((old_size, new_size))
        served, _ = self._checkpoint()
        if served.tree_size < hi:
            raise TilesBehind(f"{self.url} serves the log at {served.tree_size} leaves, not yet {hi}")
        path = self.log.consistency_path(lo, hi)
        entries = self.log.entry_range(old_size, new_size, hi) if old_size < new_size else []
        return TileFetch(path, entries)
