"""Seeds for placement and audits, derived from a final checkpoint and its miner cosignatures.

docs/architecture.md ("Randomness"): the bridge chooses what goes into a checkpoint, so a seed taken from the
checkpoint alone could be ground by it. Ed25519 cosignatures are deterministic and need the miners' keys,
so `SHA-256(domain ‖ checkpoint ‖ sorted cosignatures)` is unpredictable to the bridge and to any single
miner until the checkpoint is final. Every input is length-prefixed so no two inputs hash alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SEED_SIZE = 32
_SEED_DOMAIN = b"carechain/storage/seed/v1"


def _frame(part: bytes | str | int) -> bytes:
    if isinstance(part, bool):
        raise TypeError("a seed part must be bytes, str or int, not bool")
    if isinstance(part, int):
        if part < 0:
            raise ValueError(f"a seed part must be a non-negative integer, got {part}")
        part = part.to_bytes(8, "big")
    elif isinstance(part, str):
        part = part.encode()
    return len(part).to_bytes(4, "big") + bytes(part)


def checkpoint_seed(checkpoint: bytes | str, cosignatures: Iterable[bytes]) -> bytes:
    """The storage seed of a final checkpoint: its signed note body and the miners' cosignatures.

    Cosignatures are sorted so the seed does not depend on the order they arrived in.
    """
    sigs = sorted(bytes(s) for s in cosignatures)
    if not sigs:
        raise ValueError("a storage seed needs the cosignatures of a final checkpoint, got none")
    h = hashlib.sha256(_SEED_DOMAIN + _frame(checkpoint) + len(sigs).to_bytes(4, "big"))
    for s in sigs:
        h.update(_frame(s))
    return h.digest()


def derive(seed: bytes, purpose: str, *parts: bytes | str | int) -> bytes:
    """A 32-byte value for one `purpose` (e.g. "placement") and its `parts`, from a checkpoint seed."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"a storage seed is {SEED_SIZE} bytes, got {len(seed)}")
    h = hashlib.sha256(_SEED_DOMAIN + seed + _frame(purpose))
    for p in parts:
        h.update(_frame(p))
    return h.digest()


def uniform_below(seed: bytes, purpose: str, bound: int, *parts: bytes | str | int) -> int:
    """An integer uniform in [0, bound), by rejection sampling over `derive` (no modulo bias)."""
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    limit = (1 << 256) - ((1 << 256) % bound)
    attempt = 0
    while True:
        x = int.from_bytes(derive(seed, purpose, *parts, attempt), "big")
        if x < limit:
            return x % bound
        attempt += 1
