"""Finality: a checkpoint is final when t of the n registered miners have validly cosigned its body.

Pure functions. Distinct *keys* count, so a key registered twice under two names counts once; signature
lines by unknown keys, invalid lines and repeated lines add nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from carechain.checkpoint import NoteError, NoteSignature, parse_note
from carechain.cosignature import Cosigner, cosignature_timestamp


@dataclass(frozen=True)
class FinalityPolicy:
    """The registered miners and how many distinct ones must cosign."""

    cosigners: tuple[Cosigner, ...]
    threshold: int

    def __post_init__(self) -> None:
        n = len({c.public_key for c in self.cosigners})
        if not 1 <= self.threshold <= n:
            raise ValueError(f"threshold {self.threshold} must be between 1 and the {n} distinct miner keys")


def cosigning_keys(body: str, signatures: Iterable[NoteSignature], policy: FinalityPolicy) -> set[bytes]:
    """Public keys of registered miners with a valid cosignature/v1 on `body` among `signatures`."""
    by_id: dict[tuple[str, bytes], list[Cosigner]] = {}
    for c in policy.cosigners:
        by_id.setdefault((c.name, c.key_id), []).append(c)
    keys: set[bytes] = set()
    for sig in signatures:
        for c in by_id.get((sig.name, sig.key_hash), ()):
            if c.public_key not in keys and cosignature_timestamp(body, sig, c) is not None:
                keys.add(c.public_key)
    return keys


def is_final(body: str, signatures: Iterable[NoteSignature], policy: FinalityPolicy) -> bool:
    """True when at least `policy.threshold` distinct registered miner keys cosigned `body`."""
    return len(cosigning_keys(body, signatures, policy)) >= policy.threshold


def is_final_note(note: str, policy: FinalityPolicy) -> bool:
    """`is_final` for a signed note carrying the log's signature and cosignature lines.

    The log's own signature is not checked here: check it with `carechain.proofs.verify_checkpoint`.
    """
    try:
        body, signatures = parse_note(note)
    except NoteError:
        return False
    return is_final(body, signatures, policy)


class FinalityTracker:
    """Collects cosignatures as they arrive (one per message) and says when each body becomes final."""

    def __init__(self, policy: FinalityPolicy) -> None:
        self.policy = policy
        self._lines: dict[str, list[NoteSignature]] = {}
        self.final: dict[str, list[NoteSignature]] = {}  # body -> the lines that made it final

    def add(self, body: str, line: NoteSignature) -> bool:
        """Record one cosignature line on `body`; True when this one made `body` final."""
        new_keys = cosigning_keys(body, [line], self.policy)
        lines = self._lines.setdefault(body, [])
        if not new_keys or new_keys <= cosigning_keys(body, lines, self.policy):
            return False  # invalid, unknown, or a key already counted
        lines.append(line)
        if body not in self.final and is_final(body, lines, self.policy):
            self.final[body] = list(lines)
            return True
        return False

    def forget(self, body: str) -> None:
        """Drop what was collected for `body` (a long-running collector keeps only recent checkpoints)."""
        self._lines.pop(body, None)
        self.final.pop(body, None)

    def cosigners(self, body: str) -> set[bytes]:
        """Keys of the registered miners that have cosigned `body` so far (also after it became final)."""
        return cosigning_keys(body, self._lines.get(body, ()), self.policy)

    def final_note(self, note: str) -> str | None:
        """The log's `note` with the cosignature lines that made it final, or None if not final."""
        body, _ = parse_note(note)
        lines: Sequence[NoteSignature] | None = self.final.get(body)
        return None if lines is None else note + "".join(s.line() for s in lines)
