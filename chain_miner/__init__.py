"""Miners as witnesses: they check each log checkpoint against the last one they cosigned and cosign it.

`witness` is the sans-IO decision (cosign, or refuse with evidence), `service` the MQTT process shell
(`WitnessMiner`), `assembly` builds one from config for `carechain miner` (the one way to run it), and
`storage_server` is the storage miner (`StorageServer`, `python -m chain_miner.storage_server`). The
C2SP cosignature format and the evidence an auditor checks are shared protocol (carechain.cosignature,
carechain.evidence). Protocol: docs/miners.md.
"""
