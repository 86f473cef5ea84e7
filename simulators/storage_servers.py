"""Dishonest storage servers for the tests and the benchmarks: the selfish and lazy miners of the paper.

    python -m simulators.storage_servers --misbehave corrupt --data-dir D --broker HOST:PORT

`delete` drops each share right after acknowledging it, `corrupt` stores every byte flipped (so every chunk
fails its audit proof, and every share it serves fails its root), `ignore-retrievals` never answers `get`.
Each still signs what it does answer with its miner key: the signed answers are the evidence against it.
Everything else is the product's `chain_miner.storage_server`, whose options this takes too.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from carechain.identity import Identity
from chain_miner.storage_server import Ref, ShareStore, StorageServer, argument_parser, run

MISBEHAVIOURS = ("delete", "corrupt", "ignore-retrievals")
_FLIP = bytes(range(255, -1, -1))  # every byte inverted


class MisbehavingStorageServer(StorageServer):
    def __init__(self, identity: Identity, store: ShareStore, misbehave: str) -> None:
        if misbehave not in MISBEHAVIOURS:
            raise ValueError(f"--misbehave must be one of {', '.join(MISBEHAVIOURS)}, got {misbehave!r}")
        super().__init__(identity, store)
        self.misbehave = misbehave

    def store_share(self, ref: Ref, data: bytes) -> None:
        self.store.put(ref, data.translate(_FLIP) if self.misbehave == "corrupt" else data)
        if self.misbehave == "delete":
            self.store.delete(ref)

    def answers_retrieval(self, ref: Ref) -> bool:
        return self.misbehave != "ignore-retrievals"

    def ready_info(self) -> dict[str, Any]:
        return {"misbehave": self.misbehave}


def main(argv: list[str] | None = None) -> int:
    parser: argparse.ArgumentParser = argument_parser("python -m simulators.storage_servers")
    parser.add_argument("--misbehave", choices=MISBEHAVIOURS, required=True, help="misbehave this way")
    args = parser.parse_args(argv)
    return run(args, lambda identity, store: MisbehavingStorageServer(identity, store, args.misbehave))


if __name__ == "__main__":  # pragma: no cover
    os.umask(0o077)
    raise SystemExit(main())
