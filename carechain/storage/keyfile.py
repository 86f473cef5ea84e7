"""The owner's dataset key files: the I/O shell around `codec.DatasetKey`.

Making a key (256 random bits from the OS) and reading or writing its file (atomically, mode 0600, refusing a
file that group or others can read) happen here, so that `carechain.storage.codec` and the cores that import
it stay pure. The file's format is the codec's (`DatasetKey.key_file_bytes`).
"""

from __future__ import annotations

import os
from pathlib import Path

from carechain.files import PRIVATE, read_private, write_atomic
from carechain.storage.codec import KEY_SIZE, DatasetKey

__all__ = ["load_dataset_key", "new_dataset_key", "save_dataset_key"]


def new_dataset_key(dataset_id: str) -> DatasetKey:
    """A fresh random key for `dataset_id` (one key per dataset; it never leaves the owner)."""
    return DatasetKey(dataset_id, os.urandom(KEY_SIZE))


def save_dataset_key(key: DatasetKey, path: Path) -> None:
    """Write the key file atomically with mode 0600."""
    write_atomic(Path(path), key.key_file_bytes(), PRIVATE)


def load_dataset_key(path: Path, dataset_id: str | None = None) -> DatasetKey:
    """Read a key file, refusing one readable by group or others, or one for another dataset."""
    return DatasetKey.from_key_file_bytes(read_private(Path(path)), str(path), dataset_id)
