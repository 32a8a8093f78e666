"""ratelock's cryptography: Argon2id verifiers, sealed with a secret only ratelockd holds.

The choice (docs/ratelock-design.md says it at length):

* **Argon2id** (RFC 9106) over the password with a random 16-byte salt, parameters from
  ``[ratelock]`` (default RFC 9106's second recommended option, t=3, 64 MiB; libsodium computes
  with one lane). The parameters are stored per user, so changing them never breaks a verifier.
* **The secret encrypts the verifier** instead of being hashed into it (a "pepper" fed to
  Argon2 or an HMAC before it). The 32-byte Argon2 output is sealed with XChaCha20-Poly1305
  (libsodium's ``crypto_aead_xchacha20poly1305_ietf``, a random 24-byte nonce, so no nonce
  bookkeeping) under a key derived from the secret, the user's namespace and name, the Argon2
  parameters and the salt as associated data (v2), so a sealed verifier moved to another user
  does not open, and neither does one whose stored parameters a database writer raised to make
  each verify a memory bomb (the vault opens the verifier before it hashes). Why encryption:

  - a stolen database holds only ciphertext: without the secret, not one guess can be tested
    offline (a peppered hash is as good here, but the next two points are not);
  - **rotating the secret** re-encrypts each verifier (open with the old key, seal with the
    new) with no password; a pepper inside the hash can only be changed at each user's next
    login, leaving the old pepper alive for ever for users who never come back;
  - **upgrading Argon2 parameters** happens at a user's next successful verify, when the
    password is at hand: the vault re-hashes with the new parameters and reseals.

* **Records** are sealed the same way under a second key derived from the secret, with a
  different BLAKE2b personalisation, so a verifier key can never open a record and back.

The secret lives in its own file (never the node's signing key, DESIGN.md "Identity"), mode
0600, created on first open; a loader refuses one group or others can read, as for the node
key. The file holds numbered keys: the first is current; a rotation writes the new key first,
re-encrypts, then drops the old one, so a crash half-way leaves every row still openable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings as sodium
import nacl.exceptions
import nacl.pwhash.argon2id as argon2id

from overflowd.errors import SealError, SecretError
from overflowd.files import write_private

SECRET_BYTES = 32
SALT_BYTES = argon2id.SALTBYTES  # 16
HASH_BYTES = 32
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
_HEADER = "# ratelock vault secret: never share, never copy with the database. key-id:base64\n"
#: BLAKE2b personalisations (16 bytes max): one derived key per purpose (domain separation)
PERSON_VERIFIER = b"ratelock-verif1"
PERSON_RECORD = b"ratelock-record1"
#: v2 binds the Argon2 parameters and the salt; v1 (namespace and user only) is read once, by
#: the vault's one-time reseal of a schema 1 store (Vault.open)
AAD_VERIFIER = b"ratelock verifier v2\x00"
AAD_VERIFIER_V1 = b"ratelock verifier v1\x00"
AAD_RECORD = b"ratelock record v1\x00"


@dataclass(frozen=True, slots=True)
class Argon2Parameters:
    """Argon2id cost: ``time_cost`` passes over ``memory_kib`` KiB (libsodium: one lane)."""

    time_cost: int
    memory_kib: int

    @property
    def memlimit(self) -> int:
        return self.memory_kib * 1024


def argon2(password: bytes, salt: bytes, params: Argon2Parameters) -> bytes:
    """The raw 32-byte Argon2id output. CPU- and memory-bound: callers bound concurrency."""
    return bytes(
        argon2id.kdf(
            HASH_BYTES, password, salt, opslimit=params.time_cost, memlimit=params.memlimit
        )
    )


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (the Argon2 outputs of a guess and the verifier)."""
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class VaultKey:
    """One numbered vault secret and the keys derived from it. Never log it."""

    key_id: int
    secret: bytes

    def __repr__(self) -> str:
        return f"VaultKey(key_id={self.key_id})"

    def _derive(self, person: bytes) -> bytes:
        return hashlib.blake2b(key=self.secret, person=person, digest_size=32).digest()

    def seal_verifier(
        self, namespace: str, user: str, verifier: bytes, params: Argon2Parameters, salt: bytes
    ) -> tuple[bytes, bytes]:
        aad = _verifier_aad(namespace, user, params, salt)
        return _seal(self._derive(PERSON_VERIFIER), aad, verifier)

    def open_verifier(
        self, namespace: str, user: str, nonce: bytes, sealed: bytes,
        params: Argon2Parameters, salt: bytes,
    ) -> bytes:
        """SealError unless sealed for this user with exactly these parameters and salt."""
        aad = _verifier_aad(namespace, user, params, salt)
        return _open(self._derive(PERSON_VERIFIER), aad, nonce, sealed)

    def open_verifier_v1(self, namespace: str, user: str, nonce: bytes, sealed: bytes) -> bytes:
        """A verifier sealed before v2 (schema 1): only the one-time reseal reads these."""
        return _open(
            self._derive(PERSON_VERIFIER), _aad(AAD_VERIFIER_V1, namespace, user), nonce, sealed
        )

    def seal_record(self, namespace: str, key: str, data: bytes) -> tuple[bytes, bytes]:
        return _seal(self._derive(PERSON_RECORD), _aad(AAD_RECORD, namespace, key), data)

    def open_record(self, namespace: str, key: str, nonce: bytes, sealed: bytes) -> bytes:
        return _open(self._derive(PERSON_RECORD), _aad(AAD_RECORD, namespace, key), nonce, sealed)


def _aad(prefix: bytes, namespace: str, name: str) -> bytes:
    # Length-prefixed so ("ab", "c") and ("a", "bc") differ.
    ns, nm = namespace.encode("utf-8"), name.encode("utf-8")
    return prefix + len(ns).to_bytes(4, "big") + ns + len(nm).to_bytes(4, "big") + nm


def _verifier_aad(namespace: str, user: str, params: Argon2Parameters, salt: bytes) -> bytes:
    return (
        _aad(AAD_VERIFIER, namespace, user)
        + params.time_cost.to_bytes(8, "big")
        + params.memory_kib.to_bytes(8, "big")
        + len(salt).to_bytes(4, "big")
        + salt
    )


def _seal(key: bytes, aad: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return nonce, bytes(sealed)


def _open(key: bytes, aad: bytes, nonce: bytes, sealed: bytes) -> bytes:
    try:
        return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, key))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SealError("sealed value does not open with the vault secret") from None


@dataclass(frozen=True)
class SecretFile:
    """The secret file's keys: ``keys[0]`` is current; others are kept until a rotation ends."""

    path: Path
    keys: tuple[VaultKey, ...]

    @property
    def current(self) -> VaultKey:
        return self.keys[0]

    def key(self, key_id: int) -> VaultKey:
        for k in self.keys:
            if k.key_id == key_id:
                return k
        raise SealError(f"sealed with vault key {key_id}, which {self.path} no longer holds")


def open_secret(path: Path, *, create: bool = True) -> SecretFile:
    """Load the secret file, creating it (mode 0600, atomically) when absent and ``create``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if not create:
            raise SecretError(f"no vault secret at {path}") from None
        write_secret(path, (VaultKey(1, secrets.token_bytes(SECRET_BYTES)),), new=True)
        return open_secret(path, create=False)
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise SecretError(
            f"permissions {mode:04o} for {path} are too open: the vault secret must be readable "
            f"by its owner only (chmod 600 {path})"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"cannot read {path}: {exc}") from None
    keys: list[VaultKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, b64 = line.partition(":")
        try:
            if not sep or not key_id.isdigit():
                raise ValueError
            secret = base64.b64decode(b64, validate=True)
            if len(secret) != SECRET_BYTES:
                raise ValueError
        except ValueError:
            raise SecretError(f"{path}:{number}: not a ratelock vault key") from None
        keys.append(VaultKey(int(key_id), secret))
    if not keys:
        raise SecretError(f"{path} holds no vault key")
    return SecretFile(path, tuple(keys))


def write_secret(path: Path, keys: tuple[VaultKey, ...], *, new: bool = False) -> None:
    """Write the keys with mode 0600 via a temporary file and rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if new and path.exists():
        raise SecretError(f"{path} exists")
    body = _HEADER + "".join(
        f"{k.key_id}:{base64.b64encode(k.secret).decode('ascii')}\n" for k in keys
    )
    # new: another process that created it meanwhile wins, and both then read its keys
    write_private(path, body.encode("ascii"), keep_existing=new)


def token_digest(token: str) -> bytes:
    """What the vault stores for a client token: tokens are 256 random bits, so one BLAKE2b
    (keyless, personalised) is as good as a slow hash and keeps authentication cheap."""
    return hashlib.blake2b(
        token.encode("utf-8"), person=b"ratelock-token1", digest_size=32
    ).digest()


def new_token() -> str:
    return "rl1_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
