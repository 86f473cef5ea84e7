"""Miners as witnesses: they check each log checkpoint against the last one they cosigned and cosign it.

`witness` is the sans-IO decision (cosign, or refuse with evidence), `cosignature` the C2SP
cosignature/v1 format, `evidence` what an auditor checks, `finality` the t-of-n rule, and `service` the
MQTT process shell (`python -m chain_miner.service`). Protocol: docs/miners.md.
"""
