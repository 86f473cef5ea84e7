"""Encrypted, erasure-coded storage of datasets on miners (issue 7): the sans-IO core.

- `codec`: segments, AES-256-GCM under the owner's per-dataset key, zfec k-of-n shares, share Merkle roots.
- `keyfile`: the shell that makes a dataset key and reads and writes its file (0600).
- `manifest`: the versioned manifest of a dataset and `plan_update` (only changed segments are re-encoded).
- `placement`: rendezvous placement of a segment's shares on distinct miners, seeded by a final checkpoint.
- `audit`: checkpoint-seeded chunk challenges, answers with RFC 9162 inclusion proofs, and their math.
- `repair`: which shares to regenerate and where, with a grace period for briefly offline miners.

No sockets, no clocks, no disk, no randomness except in `keyfile`: the miner process and `carechain store` wrap
these. Rewards from audit evidence are a contract rule (`contract_rules.rewards`). Erasure coding needs zfec,
the `storage` extra (`pip install 'carechain[storage]'`).
"""
