"""Encrypted, erasure-coded storage of datasets on miners (issue 7): the sans-IO core.

- `codec`: segments, AES-256-GCM under the owner's per-dataset key, zfec k-of-n shares, share Merkle roots.
- `manifest`: the versioned manifest of a dataset and `plan_update` (only changed segments are re-encoded).
- `placement`: rendezvous placement of a segment's shares on distinct miners, seeded by a final checkpoint.
- `audit`: checkpoint-seeded chunk challenges, answers with RFC 9162 inclusion proofs, and their math.
- `repair`: which shares to regenerate and where, with a grace period for briefly offline miners.
- `rewards`: per-epoch reputation and rewards in integer minor units.

No sockets, no clocks, no disk except the owner's key file: the miner process and `carechain store` wrap these.
"""
