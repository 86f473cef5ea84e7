"""Device sources: where an edge agent's readings come from (BLE, a pharmacy terminal, simulation).

Each source turns a device's own output into `(event kind, body model)` pairs from `carechain.events`;
signing, the outbox and the uplink are the agent's business, not a source's.
"""
