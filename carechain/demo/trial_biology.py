"""The trial demo's simulated biology: what is in each kit, and what it does to the body that swallows it.

THE SIMULATOR'S OMNISCIENCE, kept apart on purpose. In a real trial the kits' contents decide the outcome: a
kit labelled hrt-1-0-0003 holds either the drug or a placebo, the pharmacy hands it over without knowing which,
and the participant's heart answers to what she swallowed. A simulation has no physical kits, so something must
stand for their contents: this module. It reads every committer's seed where the committers keep it — the
sponsor's seed file and each labelling miner's DATA_DIR/trials/<trial>.seed (chain_miner.trial_runner) — and the
checkpoint seed the ledger recorded, computes `arm_of` for each slot exactly as the kit factory would have filled
it, and generates the follow-up reading the participant's device then measures and seals.

No party's code ever calls it: not the sponsor, the investigator, the pharmacy, the miners, the bridge, nor
`verify trial` — they all see only the ledger, on which the arms stay concealed until the reveals after the lock.
`carechain.demo.trial` calls it only to simulate the bodies, and reports from it only the effect it simulated.

The natural variation is matched within each permuted block: the i-th treated slot of a block and its i-th
placebo slot share the same draw, like twins (a blocked design's ideal). So with no effect (`effect_milli=0`) the
arms' outcomes are identical within every complete block and the null trial can never meet its endpoint by
chance, and with an effect the difference between the arms is exactly the effect: the demo's verdict is the
same on every run, whatever seeds the committers drew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carechain import trial_allocation as alloc

__all__ = ["Biology", "BiologyError"]

BASELINE_MILLI_BPM = (60_000, 80_000)  # a participant's resting heart rate before the trial, milli-bpm
NOISE_MILLI_BPM = 2_500  # the natural change over the trial, at most this much either way


class BiologyError(RuntimeError):
    """The simulator cannot know a kit's contents (a seed file is missing or not the committed seed)."""


@dataclass(frozen=True)
class Biology:
    """Every committer's seed and the checkpoint seed (so every kit's contents), and the simulated effect."""

    trial_id: str
    design: alloc.Design
    checkpoint_seed: bytes
    seeds: Mapping[str, bytes]
    effect_milli: int  # the change the drug causes in the treatment arm, milli-bpm (negative: it lowers)

    @classmethod
    def from_kits(cls, trial: Mapping[str, Any], sponsor_seed: Path, miner_dirs: list[Path],
                  effect_milli: int) -> Biology:
        """Read the seeds where the committers keep them (the sponsor's seed file, each labelling miner's data
        dir) and check each against its commitment on the ledger: the kits were filled from exactly these."""
        from chain_miner.trial_runner import SeedFileError, read_seed, seed_path
        from record_access.trials import TrialClientError, load_seed

        trial_id = trial["trial_id"]
        try:
            seeds = {trial["sponsor"]: load_seed(sponsor_seed, trial_id)}
        except TrialClientError as exc:
            raise BiologyError(f"the kits' contents are unknown: {exc}") from None
        for labeller in trial["labellers"]:
            found = [d for d in miner_dirs if seed_path(d, trial_id).exists()
                     and _holds(d, trial_id, labeller)]
            if not found:
                raise BiologyError(f"no seed of labelling miner {labeller} for trial {trial_id} in the demo miners' "
                                   f"data dirs {[str(d) for d in miner_dirs]}")
            try:
                seeds[labeller] = read_seed(seed_path(found[0], trial_id), trial_id, labeller)
            except SeedFileError as exc:
                raise BiologyError(str(exc)) from None
        for party, seed in seeds.items():
            committed = trial["commitments"].get(party)
            if committed is None or not alloc.check_reveal(trial_id, party, seed, committed["commitment"]):
                raise BiologyError(f"{party}'s kept seed is not the one it committed to trial {trial_id}")
        return cls(trial_id, alloc.Design.model_validate(trial["design"]), bytes.fromhex(trial["checkpoint_seed"]),
                   seeds, effect_milli)

    def contents(self, stratum: str, position: int) -> str:
        """What the kit of a stratum's `position`-th slot holds: its arm."""
        key = alloc.allocation_key(self.seeds, self.checkpoint_seed, self.trial_id)
        return alloc.arm_of(key, self.design, stratum, position)

    def resting_heart_rate(self, participant: str, stratum: str, position: int) -> tuple[int, int]:
        """(baseline, follow-up) resting heart rate of the participant in that slot, milli-bpm: her own
        baseline, the natural variation she shares with her twin slot in the other arm, and the drug's effect
        if her kit held it."""
        key = alloc.allocation_key(self.seeds, self.checkpoint_seed, self.trial_id)
        block = alloc.block_of(key, self.design, stratum, position)
        arms = [alloc.arm_of(key, self.design, stratum, p) for p in range(block.first, block.first + block.size)]
        arm = arms[position - block.first]
        rank = arms[:position - block.first].count(arm)  # her place among her arm's slots of the block
        lo, hi = BASELINE_MILLI_BPM
        baseline = lo + _draw(self.trial_id, "baseline", participant) % (hi - lo + 1)
        noise = _draw(self.trial_id, "noise", stratum, block.number, rank) % (2 * NOISE_MILLI_BPM + 1) \
            - NOISE_MILLI_BPM
        effect = self.effect_milli if arm == self.design.arms[0] else 0
        return baseline, baseline + noise + effect


def _holds(data_dir: Path, trial_id: str, party: str) -> bool:
    from chain_miner.trial_runner import SeedFileError, read_seed, seed_path

    try:
        read_seed(seed_path(data_dir, trial_id), trial_id, party)
    except SeedFileError:
        return False
    return True


def _draw(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")
