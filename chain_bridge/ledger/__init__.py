"""The verifiable ledger: the Merkle log, its checkpoints, proofs and stores."""
