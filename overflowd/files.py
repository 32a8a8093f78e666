"""Private files written whole or not at all: the node identity, jfe's keys, ratelock's secret.

A reader (another process, the next start after a crash) must never see half a key. So the
bytes go to a temporary file created 0600 beside the target (never readable by others, not
even for a moment), are synced, and then take the target's name in one step.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_private(path: Path, data: bytes, *, keep_existing: bool = False) -> bool:
    """Write ``data`` to ``path`` atomically, mode 0600, its folder created 0700.

    With ``keep_existing`` a file already at ``path`` wins (two processes creating the same
    secret at once agree on one): nothing is written and the answer is False.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_existing:
            os.link(tmp, path)  # FileExistsError if another process created it meanwhile
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True
