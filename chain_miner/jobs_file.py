"""The jobs file of a miner's runner: which jobs it did and how often each failed (docs/market.md, docs/trials.md).

Both runners (`chain_miner.study_runner`, `chain_miner.trial_runner`) do each job at most once and give up on
one after MAX_ATTEMPTS failures; this file is what makes that survive a restart. It is DATA_DIR/<runner>/jobs.json,
0600, replaced atomically (`carechain.files.write_atomic`): JSON `{"v": 1, "done": [KEY...], "failed": {KEY: N}}`
plus the runner's own fields (a subclass's `read_own`/`own_fields`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from carechain.files import PRIVATE_DIR, write_atomic

__all__ = ["JOBS_FILE", "JOBS_VERSION", "MAX_ATTEMPTS", "JobsFile"]

log = logging.getLogger("carechain.miner")

JOBS_FILE = "jobs.json"
JOBS_VERSION = 1
MAX_ATTEMPTS = 3


@dataclass
class JobsFile:
    """The jobs of one runner, as kept in `path`. Not thread-safe: the runner holds its lock around each use."""

    KIND: ClassVar[str] = "miner"  # what the log lines call the jobs ("study", "trial")

    path: Path
    done: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)  # job key → failures so far (gone once it succeeds)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """The jobs file in `directory`; empty when there is none, or when it is unreadable (logged). Forgetting
        done jobs is safe, only wasteful: the rules refuse an entry a job already sent."""
        path = Path(directory) / JOBS_FILE
        jobs = cls(path)
        if not path.exists():
            return jobs
        try:
            raw = json.loads(path.read_text())
            if raw.get("v") != JOBS_VERSION:
                raise ValueError(f"version {raw.get('v')!r}, this miner reads {JOBS_VERSION}")
            jobs.done = set(raw["done"])
            jobs.failed = {str(k): int(v) for k, v in raw["failed"].items()}
            jobs.read_own(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s): starting with no %s jobs done", path, exc, cls.KIND)
            return cls(path)
        return jobs

    def read_own(self, raw: Mapping[str, Any]) -> None:
        """Take the runner's own fields from the file's JSON; raise ValueError, KeyError or TypeError when they
        are malformed (the whole file then counts as unreadable)."""

    def own_fields(self) -> dict[str, Any]:
        """The runner's own fields, written beside `done` and `failed`."""
        return {}

    def may_run(self, key: str) -> bool:
        """Whether job `key` is neither done nor given up on."""
        return key not in self.done and self.failed.get(key, 0) < MAX_ATTEMPTS

    def succeeded(self, key: str) -> None:
        self.done.add(key)
        self.failed.pop(key, None)

    def failed_once(self, key: str, miner: str) -> None:
        """Count one failure of job `key`; at MAX_ATTEMPTS the runner gives up on it, loudly."""
        self.failed[key] = self.failed.get(key, 0) + 1
        if self.failed[key] >= MAX_ATTEMPTS:
            log.error("miner %s: %s job %s failed %d times; giving up on it (remove it from %s to try again)",
                      miner, self.KIND, key, MAX_ATTEMPTS, self.path)

    def save(self) -> None:
        self.path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        data = {"v": JOBS_VERSION, "done": sorted(self.done), "failed": dict(sorted(self.failed.items())),
                **self.own_fields()}
        write_atomic(self.path, json.dumps(data, indent=1).encode())
