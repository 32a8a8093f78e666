"""The node identity: one Ed25519 key, shared by overflowd, jfe and ratelock.

The secret seed lives in a file only its owner can read. Like ssh, loading refuses a key file
that group or others can read: a key that may have leaked is not a key to sign with. This module
is the one place that touches PyNaCl's signing API.
"""

from __future__ import annotations

import base64
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from overflowd import peers
from overflowd import report as rpt
from overflowd.errors import IdentityError, SignatureError
from overflowd.files import write_private

IDENTITY_FILE = "identity.key"
#: The public key the identity had before ``overflowd key rotate``: published beside the new one
#: during the overlap, so reports signed before the rotation still verify against DNS.
PREVIOUS_PUBLIC_FILE = "identity.previous.pub"
_HEADER = "# overflowd node identity: Ed25519 seed, base64. Never share this file.\n"
_PREFIX = "ed25519-seed:"


@dataclass(frozen=True)
class NodeIdentity:
    """A loaded signing key. Never log or render ``seed``."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")

    def __repr__(self) -> str:
        return f"NodeIdentity(fingerprint={self.fingerprint!r})"

    @property
    def _signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return rpt.key_fingerprint(self.public_key)

    def signer(self) -> Callable[[bytes], bytes]:
        """A fast signing callable (the key is expanded once, not per message)."""
        key = self._signing_key

        def sign(message: bytes) -> bytes:
            return bytes(key.sign(message).signature)

        return sign

    def sign(self, message: bytes) -> bytes:
        return bytes(self._signing_key.sign(message).signature)

    def sign_report(
        self, payload: rpt.Payload, signer: Callable[[bytes], bytes] | None = None
    ) -> rpt.SignedReport:
        cose = rpt.encode_signed(payload, self.public_key, signer or self.sign)
        return rpt.SignedReport(cose=cose, observer_key=self.public_key, payload=payload)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(seed=secrets.token_bytes(32))


def check_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Ed25519 verification; raise :class:`SignatureError` on any failure, nothing else."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SignatureError("signature does not verify") from None


def verify_report(data: bytes) -> rpt.SignedReport:
    """Parse and verify a report from anywhere (ReportDecodeError or SignatureError)."""
    return rpt.verify(data, check_signature)


def sign_node_record(
    identity: NodeIdentity, *, contacts: tuple[str, ...], point: str, endpoint: str, time_ms: int
) -> bytes:
    """This node's signed record (``/v1/identity`` ``signed``): :mod:`overflowd.peers` codec."""
    record = peers.NodeRecord(
        key=identity.public_key, contacts=contacts, point=point, endpoint=endpoint, time_ms=time_ms
    )
    return peers.encode_node_record(record, identity.sign)


def verify_node_record(data: bytes, *, now_ms: int | None = None) -> peers.NodeRecord:
    """Parse and verify a node record from anywhere (NodeRecordError or SignatureError);
    with ``now_ms``, also refuse one too old or dated ahead (peers.verify_node_record)."""
    return peers.verify_node_record(data, check_signature, now_ms=now_ms)


# ---------------------------------------------------------------------------------------------
# Files


def identity_path(home: Path) -> Path:
    return home / IDENTITY_FILE


def write_identity(home: Path, identity: NodeIdentity, *, force: bool = False) -> Path:
    """Write the key file with mode 0600, atomically; refuse to replace one unless ``force``."""
    path = identity_path(home)
    if path.exists() and not force:
        raise IdentityError(f"{path} exists; refusing to overwrite a node identity without --force")
    text = _HEADER + _PREFIX + base64.b64encode(identity.seed).decode("ascii") + "\n"
    write_private(path, text.encode("ascii"))
    return path


def load_identity(home: Path) -> NodeIdentity:
    """Load the node key, refusing files that group or others can read (as ssh does)."""
    path = identity_path(home)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(f"no node identity at {path}; run 'overflowd init' first") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"permissions {mode:04o} for {path} are too open: the key must be readable by its "
            f"owner only (chmod 600 {path})"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(_PREFIX):
            try:
                seed = base64.b64decode(line[len(_PREFIX) :], validate=True)
            except ValueError:
                break
            if len(seed) == 32:
                return NodeIdentity(seed=seed)
            break
    raise IdentityError(f"{path} is not an overflowd identity file")


def previous_public_path(home: Path) -> Path:
    return home / PREVIOUS_PUBLIC_FILE


def load_previous_public(home: Path) -> bytes | None:
    """The key kept by the last rotation, or None when there was none (IdentityError if bad)."""
    path = previous_public_path(home)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read {path}: {exc}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise IdentityError(f"{path} is not a base64 Ed25519 public key")
    return key


def rotate_identity(home: Path) -> tuple[NodeIdentity, NodeIdentity]:
    """A new identity in place of the current one, whose public key is kept as the previous
    one (replacing any older previous: one overlap at a time). Returns (old, new).

    Order matters for a crash in between: the previous key is written first, so at worst it
    names the key still in use, never a key whose reports can no longer be verified."""
    old = load_identity(home)
    path = previous_public_path(home)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(old.public_key_b64 + "\n", encoding="ascii")
        tmp.chmod(0o644)  # a public key: jfe, ratelockd and people may read it
        tmp.replace(path)
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror}") from None
    new = NodeIdentity.generate()
    write_identity(home, new, force=True)
    return old, new
