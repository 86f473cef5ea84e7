"""carechain: signed health events anchored in a verifiable ledger."""

__version__ = "0.1.0"
