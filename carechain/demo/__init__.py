"""`carechain demo`: the whole flow on one machine (embedded broker, agent, bridge, miners, pharmacy day)."""
