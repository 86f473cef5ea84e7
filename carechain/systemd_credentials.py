"""Where systemd hands a service its secrets: `LoadCredential=` files in $CREDENTIALS_DIRECTORY.

Kept apart from carechain.files (a disk I/O shell) so that key parsing (carechain.identity), which the sans-IO
protocol cores import, can ask this one question without importing the file layer.
"""

from __future__ import annotations

import os
from pathlib import Path


def managed_by_systemd(path: Path) -> bool:
    """Whether `path` is one of this service's systemd credentials (`LoadCredential=`, in $CREDENTIALS_DIRECTORY).

    systemd makes that directory readable by the service alone, and may grant the service's user a credential
    through an ACL, which shows as group bits in the mode: the mode check does not apply there.
    """
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return False
    try:
        return Path(path).resolve().is_relative_to(Path(directory).resolve())
    except OSError:
        return False
