"""Finality: a checkpoint is final when t of the n active miners have validly cosigned its body.

Pure functions. Distinct *keys* count, so a key registered twice under two names counts once; signature
lines by unknown keys, invalid lines and repeated lines add nothing.

Who counts comes from the ledger, never from configuration: `ledger_policy(state)` takes the active miner
set the contracts compute (`contract_rules.miners`: registered miners with an admitted bond, not suspended,
no failed audit this storage epoch) and asks a majority of them. A miner cosigns under the name
`carechain.miner/<party id>`, the name `carechain miner` uses by default (docs/miners.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from carechain.checkpoint import NoteError, NoteSignature, parse_note
from carechain.cosignature import Cosigner, cosignature_timestamp

if TYPE_CHECKING:
    from contract_rules import State

MINER_NAME_PREFIX = "carechain.miner/"


def miner_cosigner(party_id: str, public_key: bytes) -> Cosigner:
    """The cosigner a registered miner signs as: `carechain.miner/<party id>` with its party key."""
    return Cosigner(MINER_NAME_PREFIX + party_id, public_key)


@dataclass(frozen=True)
class FinalityPolicy:
    """The registered miners and how many distinct ones must cosign."""

    cosigners: tuple[Cosigner, ...]
    threshold: int

    def __post_init__(self) -> None:
        n = len({c.public_key for c in self.cosigners})
        if not 1 <= self.threshold <= n:
            raise ValueError(f"threshold {self.threshold} must be between 1 and the {n} distinct miner keys")

    @classmethod
    def of_miners(cls, keys: Mapping[str, bytes]) -> FinalityPolicy | None:
        """A strict majority of the miners `keys` (party id -> Ed25519 key); None when there are none."""
        from contract_rules.miners import finality_threshold

        if not keys:
            return None
        cosigners = tuple(miner_cosigner(party, pk) for party, pk in sorted(keys.items()))
        return cls(cosigners, min(finality_threshold(len(keys)), len({c.public_key for c in cosigners})))


def ledger_policy(state: State) -> FinalityPolicy | None:
    """The finality policy of the ledger `state`: a majority of its active miners (None: no active miner).

    The same majority `contract_rules.miners.final_note` asks of a note the rules judge final.
    """
    from contract_rules.miners import miner_keys

    return FinalityPolicy.of_miners(miner_keys(state))


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
    """Collects cosignatures as they arrive (one per message) and says when each body becomes final.

    `policy` None means no miner is active: nothing becomes final. The bridge replaces the policy when the
    ledger's active miner set changes (`set_policy`); bodies already final stay final (their lines were
    valid cosignatures of miners active when they arrived), the others are judged by the new set.
    """

    def __init__(self, policy: FinalityPolicy | None) -> None:
        self.policy = policy
        self._lines: dict[str, list[NoteSignature]] = {}
        self.final: dict[str, list[NoteSignature]] = {}  # body -> the lines that made it final

    def set_policy(self, policy: FinalityPolicy | None) -> list[str]:
        """Judge what is collected by `policy` from now on; the bodies this made final (oldest first)."""
        if policy == self.policy:
            return []
        self.policy = policy
        made_final: list[str] = []
        for body, lines in self._lines.items():
            if policy is None:
                lines.clear()
                continue
            lines[:] = [line for line in lines if cosigning_keys(body, [line], policy)]
            if body not in self.final and is_final(body, lines, policy):
                self.final[body] = list(lines)
                made_final.append(body)
        return made_final

    def add(self, body: str, line: NoteSignature) -> bool:
        """Record one cosignature line on `body`; True when this one made `body` final."""
        if self.policy is None:
            return False
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
        """Keys of the active miners that have cosigned `body` so far (also after it became final)."""
        if self.policy is None:
            return set()
        return cosigning_keys(body, self._lines.get(body, ()), self.policy)

    def final_note(self, note: str) -> str | None:
        """The log's `note` with the cosignature lines that made it final, or None if not final."""
        body, _ = parse_note(note)
        lines: Sequence[NoteSignature] | None = self.final.get(body)
        return None if lines is None else note + "".join(s.line() for s in lines)
