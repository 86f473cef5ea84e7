"""Repair planning: which shares to regenerate and where, without storms when a miner blinks.

A share is *online* if its miner was seen within `offline_after` seconds, *suspect* if the miner has been
away for less than `grace` (it probably comes back: a reboot, a network hiccup), and *lost* if the miner has
been away longer, or the share failed an audit, or its miner left. A segment is repaired when its shares
that are not lost drop below `threshold` (default k + 2): then every lost share is regenerated from k
online ones (`codec.regenerate_shares`, no dataset key needed; the result matches the recorded root) and
placed on the best-ranked miner that holds no share of the segment. Safety valve: if fewer than k + 1
shares are *online*, suspects count as lost too, because one more failure would make the segment unreadable.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from carechain.storage.manifest import Manifest, SegmentRecord, ShareRecord
from carechain.storage.placement import PlacementError, place_shares

OFFLINE_AFTER = 10 * 60  # a miner answers heartbeats/audits every few minutes
GRACE = 24 * 3600  # a day covers reboots, upgrades and most outages; data stays readable meanwhile (k of n)


@dataclass(frozen=True)
class RepairPolicy:
    threshold_margin: int = 2  # repair when fewer than k + margin shares are not lost
    offline_after: int = OFFLINE_AFTER
    grace: int = GRACE


@dataclass(frozen=True)
class RepairTask:
    """Regenerate `share` of a segment version from `sources` (k online shares) and store it on `target`."""

    segment: int
    version: int
    share: int
    sources: tuple[int, ...]
    target: str


@dataclass(frozen=True)
class SegmentHealth:
    segment: int
    online: tuple[int, ...]
    suspect: tuple[int, ...]
    lost: tuple[int, ...]


def share_health(
    segment: SegmentRecord, last_seen: Mapping[str, int], now: int, policy: RepairPolicy,
    failed: Collection[tuple[int, int]] = (),
) -> SegmentHealth:
    """Classify each share of `segment`; `failed` holds (segment, share) pairs that failed an audit."""
    online, suspect, lost = [], [], []
    for s in segment.shares:
        seen = last_seen.get(s.miner)
        away = None if seen is None else now - seen
        if (segment.index, s.index) in failed or away is None or away > policy.grace:
            lost.append(s.index)
        elif away > policy.offline_after:
            suspect.append(s.index)
        else:
            online.append(s.index)
    return SegmentHealth(segment.index, tuple(online), tuple(suspect), tuple(lost))


def plan_repairs(
    manifest: Manifest, last_seen: Mapping[str, int], now: int, seed: bytes,
    policy: RepairPolicy | None = None, failed: Collection[tuple[int, int]] = (),
    active: Collection[str] | None = None,
) -> list[RepairTask]:
    """Repair tasks for every segment below threshold; `seed` (a final checkpoint's) fixes the targets, so
    every node computes the same plan.

    Targets are drawn from `active`, the ledger's active miners, when it is given: exactly where the storage
    v2 rules accept a repaired share (`place_shares` over the active miners, the segment's old holders
    excluded), whether or not a target was seen lately. Without it (off the ledger), from the miners seen
    within `offline_after`."""
    policy = policy or RepairPolicy()
    k = manifest.k
    if active is not None:
        candidates = sorted(active)
    else:
        candidates = sorted(m for m, t in last_seen.items() if now - t <= policy.offline_after)
    tasks: list[RepairTask] = []
    for seg in manifest.segments:
        h = share_health(seg, last_seen, now, policy, failed)
        lost = list(h.lost)
        if len(h.online) < k + 1:
            lost += h.suspect  # safety valve: do not wait out the grace period on the edge of loss
        elif len(h.online) + len(h.suspect) >= k + policy.threshold_margin:
            continue
        if not lost:
            continue
        if len(h.online) < k:
            continue  # unreadable for now: nothing to rebuild from; status reports it
        holders = {s.miner for s in seg.shares if s.index not in lost}
        # A lost share's old miner is not re-used (it failed or left); the seed is scoped to the repair.
        banned = holders | {s.miner for s in seg.shares if s.index in lost}
        try:
            targets = place_shares(seed, manifest.dataset_id, seg.index, seg.version, candidates, len(lost), banned)
        except PlacementError:
            targets = place_shares(seed, manifest.dataset_id, seg.index, seg.version, candidates,
                                   min(len(lost), len(set(candidates) - banned)), banned)
        sources = tuple(sorted(h.online)[:k])
        tasks += [RepairTask(seg.index, seg.version, share, sources, target)
                  for share, target in zip(sorted(lost), targets, strict=False)]
    return tasks


def apply_repairs(manifest: Manifest, done: Iterable[RepairTask]) -> Manifest:
    """The manifest after confirmed repairs: each repaired share now names its new miner (same root)."""
    moved = {(t.segment, t.version, t.share): t.target for t in done}
    segments = []
    for seg in manifest.segments:
        shares = tuple(
            ShareRecord(index=s.index, miner=moved.get((seg.index, seg.version, s.index), s.miner),
                        root=s.root, length=s.length) for s in seg.shares)
        segments.append(seg.model_copy(update={"shares": shares}))
    # Re-validated: a repair must keep every share of a segment on its own miner.
    return Manifest.model_validate(manifest.model_dump() | {"segments": [s.model_dump() for s in segments]})
