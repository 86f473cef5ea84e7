"""Console-local pseudonyms for record owners: the console never shows a patient identifier.

A pseudonym is HMAC-SHA256(key, owner)[:8] in hex. The key is 32 random bytes in DATA_DIR/console/pseudonym.key
(mode 0600), made on first use and never shown: the same owner has the same pseudonym on every page and across
restarts, so an operator can follow "the same patient" without learning who it is, and nobody without the key
can test a guessed party id against a pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from carechain.files import read_private, write_atomic

KEY_BYTES = 32
PSEUDONYM_HEX = 8


class Pseudonyms:
    """Owner id → stable pseudonym, keyed by a secret kept beside the console's accounts."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = Path(key_file)
        if not self.key_file.exists():
            write_atomic(self.key_file, os.urandom(KEY_BYTES))  # 0600, atomically: never a half-written key
        key = read_private(self.key_file)  # refuses a key file others can read
        if len(key) != KEY_BYTES:
            raise ValueError(f"{self.key_file}: a console pseudonym key is {KEY_BYTES} bytes, this one is "
                             f"{len(key)}; delete the file to make a new one (pseudonyms then change)")
        self._key = key

    def of(self, owner: str) -> str:
        """The pseudonym shown in place of `owner` (e.g. "p:3fa2c1d0")."""
        digest = hmac.new(self._key, owner.encode(), hashlib.sha256).hexdigest()
        return f"p:{digest[:PSEUDONYM_HEX]}"
