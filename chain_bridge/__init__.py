"""Chain bridge: ingest, ledger, checkpoints and receipts."""
