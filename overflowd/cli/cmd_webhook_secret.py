"""``overflowd key webhook-secret``: a new shared secret for one webhook endpoint's ``v1`` HMAC.

Prints ``whsec_`` + base64 of 32 random bytes, the Standard Webhooks form, for
``secret = "..."`` in a ``[[webhook.endpoints]]`` table and for the receiver's
``Webhook(secret)``. With ``--out FILE`` it writes the secret to FILE instead (mode 0600, a
new file unless ``--force``), for ``secret_file = "..."``, and prints only the path. One secret
per endpoint: whoever holds it can sign as the sender, so never share one between receivers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from overflowd.errors import ConfigError


def register(key_subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``webhook-secret`` to ``overflowd key``'s subcommands."""
    p = key_subparsers.add_parser(
        "webhook-secret",
        parents=[common_parent],
        help="make a whsec_ secret for a webhook endpoint's v1 (HMAC) signatures",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--out", metavar="FILE", help="write it to FILE (mode 0600) instead of printing it"
    )
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=cmd_webhook_secret)


def cmd_webhook_secret(args: argparse.Namespace) -> int:
    # overflowd.wire's package import loads every decoder: only this command needs it here.
    from overflowd.wire import webhook as wh

    secret = wh.format_secret(secrets.token_bytes(wh.NEW_SECRET_BYTES))
    if not args.out:
        print(secret)
        return 0
    path = Path(args.out)
    write_secret(path, secret + "\n", force=args.force)
    print(path)
    return 0


def write_secret(path: Path, text: str, *, force: bool) -> None:
    """Write ``text`` to a file only its owner can read; all or nothing.

    Written to a temporary file in the same directory and moved into place, so a reader never
    sees a partial secret and a failure leaves nothing behind. Without ``force`` an existing
    file is refused (it may be a secret a receiver already has).
    """
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a directory")
    if path.exists() and not force:
        raise ConfigError(f"--out {path}: exists; refusing to replace a secret without --force")
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:  # mkstemp's file is mode 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never replaced unasked
            os.unlink(tmp)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"--out {path}: cannot write: {exc.strerror}") from None
