"""Standard Webhooks signatures, Ed25519 (``v1a``) and HMAC-SHA256 (``v1``): sign and verify.

The Standard Webhooks specification (standardwebhooks.com) signs the exact string
``"{webhook-id}.{webhook-timestamp}.{body}"`` and sends it in three headers::

    webhook-id:         the message id; for overflowd the report id (docs/protocol.md §3)
    webhook-timestamp:  integer seconds since the Unix epoch
    webhook-signature:  space-separated list of "<version>,<base64 signature>"

``v1`` is HMAC-SHA256 with a shared secret; ``v1a`` is Ed25519 over the same string, which is
what a node always sends: the receiver needs only the node's public key. A receiver accepts a
message if *any* entry of the scheme it checks verifies, so a sender can rotate keys or secrets
by sending two signatures.

The ecosystem's own verifiers (the ``standardwebhooks`` packages on PyPI and npm, Svix) check
only ``v1``. So an endpoint configured with a shared secret (``whsec_`` + base64 of 24 to 64
random bytes, the specification's serialisation) gets ``v1,<hmac>`` entries for each secret
first and then the ``v1a,<ed25519>`` entry, space separated, in one header; a receiver with the
secret checks ``v1`` (:func:`verify_hmac`), one with the node's key ``v1a`` (:func:`verify`).
The ``v1`` entries say only that the sender knows the endpoint's secret: they never stand in for
the Ed25519 signature, which binds the webhook to the key that signed the report inside.

This module is pure: headers and bytes in, values out. The Ed25519 arithmetic is injected
(``sign`` / ``check`` callables, see :mod:`overflowd.identity`), the clock is an argument. It
must never accept a signature over anything but the exact bytes received: the body is signed
as bytes, never re-serialised before checking.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from overflowd.errors import DecodeError, SignatureError

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
#: The Standard Webhooks version tag for Ed25519 signatures.
SCHEME = "v1a"
#: The Standard Webhooks version tag for HMAC-SHA256 signatures with a shared secret.
SCHEME_HMAC = "v1"
#: Raw signature length per scheme: Ed25519 (RFC 8032) and SHA-256 HMAC outputs.
SIGNATURE_BYTES = {SCHEME: 64, SCHEME_HMAC: 32}
#: How the specification serialises a symmetric secret ("for easy identification").
SECRET_PREFIX = "whsec_"
#: The specification's bounds on a symmetric secret: 24 bytes (192 bits) to 64 bytes (512
#: bits). Shorter is guessable; longer than the SHA-256 block (64 bytes) HMAC hashes first.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
#: What ``overflowd key webhook-secret`` makes: 256 bits, the HMAC-SHA256 output size.
NEW_SECRET_BYTES = 32
CONTENT_TYPE = "application/json"

#: Timestamps further than this from the receiver's clock, in either direction, are refused:
#: the replay window the specification recommends (5 minutes).
DEFAULT_TOLERANCE_S = 300
#: Message ids are short tokens; ours are 64 hex characters. The bound keeps a header from
#: becoming a place to hide a large payload in the signed string.
MAX_ID_BYTES = 256
#: A signature header holds a few ``scheme,base64`` entries (key rotation); Ed25519 entries are
#: 92 bytes. More than this is garbage, refused before any base64 or crypto work.
MAX_SIGNATURE_HEADER_BYTES = 2048
MAX_SIGNATURES = 8
#: Secrets one message is signed with (the current one and, while rotating, the old ones): one
#: fewer than the entries a receiver reads, so the ``v1a`` entry always fits. A ``v1`` entry is
#: 47 bytes; seven and the ``v1a`` one are 429, well inside the header bound.
MAX_SECRETS = MAX_SIGNATURES - 1
#: Integer seconds; 12 digits reach the year 33658, which is enough.
MAX_TIMESTAMP_DIGITS = 12

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_TIMESTAMP_RE = re.compile(r"^[0-9]+$")

Signer = Callable[[bytes], bytes]
#: ``check(public_key, message, signature)`` raises :class:`SignatureError`.
Checker = Callable[[bytes, bytes, bytes], None]
HeaderInput = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]]


class WebhookDecodeError(DecodeError):
    """Webhook headers or body that are malformed (missing, oversized, not the format)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, fmt="webhook")


class StaleWebhookError(SignatureError):
    """A webhook whose timestamp is outside the tolerance window (replay protection)."""


class WebhookSecretError(ValueError):
    """A shared secret that is not ``whsec_`` + canonical base64 of 24 to 64 bytes.

    A ValueError: secrets come from the operator's config (which names the key and file around
    this message) or from a receiver's own code, never from the network. The message never
    contains the secret.
    """


@dataclass(frozen=True, slots=True)
class WebhookHeaders:
    """The three Standard Webhooks headers, parsed.

    ``signatures`` holds the decoded entries of the one scheme asked for (``v1a`` unless
    :func:`parse_headers` was told otherwise), in header order.
    """

    msg_id: str
    timestamp: int
    signatures: tuple[bytes, ...]


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The exact bytes that are signed: ``{id}.{timestamp}.{body}``."""
    return f"{msg_id}.{timestamp}.".encode("ascii") + bytes(body)


def parse_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_...`` secret; :class:`WebhookSecretError` if malformed.

    Strict where the reference libraries are lenient, so that every library reads the same key
    from the same text: the prefix is required (a bare base64 string may be some other kind of
    secret), the base64 is the standard alphabet and canonical, its ``=`` padding optional (both
    libraries accept either), and the key is 24 to 64 bytes. Python's package silently drops
    characters outside the alphabet (URL-safe ``-`` and ``_``, stray text) and so reads another
    key than npm's, which refuses them. Surrounding whitespace (a file's newline) is ignored.
    """
    if not isinstance(text, str):
        raise TypeError("a webhook secret is a str: whsec_ followed by base64")
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise WebhookSecretError(f"a webhook secret starts with {SECRET_PREFIX}")
    encoded = text[len(SECRET_PREFIX) :]
    unpadded = encoded.rstrip("=")
    try:
        key = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = None
    canonical = "" if key is None else base64.b64encode(key).decode("ascii")
    if key is None or encoded not in (canonical, canonical.rstrip("=")):
        raise WebhookSecretError(
            f"a webhook secret is {SECRET_PREFIX} followed by standard base64 "
            "(A-Z a-z 0-9 + /, = padding optional)"
        )
    return _check_key(key)


def format_secret(key: bytes) -> str:
    """``whsec_`` + base64 of ``key``: how a secret is written in config files and shown."""
    return SECRET_PREFIX + base64.b64encode(_check_key(bytes(key))).decode("ascii")


def _check_key(key: bytes) -> bytes:
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise WebhookSecretError(
            f"a webhook secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
            f"not {len(key)}"
        )
    return key


def _secret_key(secret: bytes | str) -> bytes:
    if isinstance(secret, str):
        return parse_secret(secret)
    if isinstance(secret, bytes | bytearray | memoryview):
        return _check_key(bytes(secret))
    raise TypeError("a webhook secret is bytes (the key) or a whsec_ str")


def hmac_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The raw ``v1`` signature: HMAC-SHA256 under ``key`` of the signed content."""
    return hmac.digest(key, signed_content(msg_id, timestamp, body), hashlib.sha256)


def sign(
    msg_id: str,
    timestamp: int,
    body: bytes,
    signer: Signer,
    *,
    secrets: Iterable[bytes | str] = (),
) -> dict[str, str]:
    """The headers of a message signed with ``signer`` (Ed25519) and each shared secret.

    ``webhook-signature`` is ``v1,<hmac>`` for each of ``secrets`` (key bytes, or ``whsec_``
    text), in order, then ``v1a,<ed25519>``: the reference verifiers stop at the first entry
    that matches, and ours skip the ``v1`` ones without decoding them.
    """
    if not _ID_RE.match(msg_id) or len(msg_id) > MAX_ID_BYTES:
        raise ValueError("webhook id must be 1-256 characters of [A-Za-z0-9_.:-]")
    if timestamp < 0:
        raise ValueError("timestamp must not be negative")
    if isinstance(secrets, str | bytes | bytearray | memoryview):
        raise TypeError("secrets is a sequence of secrets, not one secret")
    keys = [_secret_key(secret) for secret in secrets]
    if len(keys) > MAX_SECRETS:
        raise ValueError(f"at most {MAX_SECRETS} secrets sign one message")
    content = signed_content(msg_id, timestamp, body)
    signature = signer(content)
    if len(signature) != SIGNATURE_BYTES[SCHEME]:
        raise ValueError("an Ed25519 signature is 64 bytes")
    entries = [
        f"{SCHEME_HMAC},{_b64(hmac.digest(key, content, hashlib.sha256))}" for key in keys
    ]
    entries.append(f"{SCHEME},{_b64(signature)}")
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: " ".join(entries),
        "content-type": CONTENT_TYPE,
    }


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def normalize_headers(headers: HeaderInput) -> dict[str, str]:
    """Lower-case names, latin-1 decoded bytes; a header given twice is malformed.

    HTTP header names are case-insensitive (RFC 9110 §5.1); ASGI hands over bytes pairs,
    http.server a case-insensitive mapping, tests a dict. All become one dict.
    """
    items: Iterable[tuple[str | bytes, str | bytes]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        n = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        v = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        n = n.lower()
        if n in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE) and n in out:
            raise WebhookDecodeError(f"header {n} given more than once")
        out[n] = v
    return out


def parse_headers(headers: HeaderInput, *, scheme: str = SCHEME) -> WebhookHeaders:
    """Parse the three headers; :class:`WebhookDecodeError` for anything malformed.

    ``signatures`` gets the entries of ``scheme`` (``v1a``, or ``v1`` for :func:`verify_hmac`),
    each base64 checked and of its scheme's length. Entries of other schemes (``v1`` HMACs when
    checking ``v1a``, future ones) are skipped without decoding, as the specification asks; a
    header without a single entry of ``scheme`` is refused. The header's length and entry
    count are bounded before any entry is looked at.
    """
    if scheme not in SIGNATURE_BYTES:
        raise ValueError(f"unknown signature scheme {scheme!r}")
    h = normalize_headers(headers)
    for name in (HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE):
        if name not in h:
            raise WebhookDecodeError(f"header {name} is missing")
    msg_id = h[HEADER_ID].strip()
    if not msg_id or len(msg_id) > MAX_ID_BYTES or not _ID_RE.match(msg_id):
        raise WebhookDecodeError("header webhook-id is malformed")
    ts_text = h[HEADER_TIMESTAMP].strip()
    if not _TIMESTAMP_RE.match(ts_text) or len(ts_text) > MAX_TIMESTAMP_DIGITS:
        raise WebhookDecodeError("header webhook-timestamp must be integer seconds")
    sig_text = h[HEADER_SIGNATURE]
    if len(sig_text) > MAX_SIGNATURE_HEADER_BYTES:
        raise WebhookDecodeError("header webhook-signature is too long")
    entries = sig_text.split()
    if len(entries) > MAX_SIGNATURES:
        raise WebhookDecodeError(f"more than {MAX_SIGNATURES} signatures")
    size = SIGNATURE_BYTES[scheme]
    signatures: list[bytes] = []
    for entry in entries:
        version, sep, value = entry.partition(",")
        if not sep:
            raise WebhookDecodeError("a webhook-signature entry is not 'version,signature'")
        if version != scheme:
            continue
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise WebhookDecodeError(f"a {scheme} signature is not base64") from None
        if len(raw) != size:
            raise WebhookDecodeError(f"a {scheme} signature is not {size} bytes")
        signatures.append(raw)
    if not signatures:
        what = "Ed25519" if scheme == SCHEME else "HMAC-SHA256"
        raise WebhookDecodeError(f"no {scheme} ({what}) signature")
    return WebhookHeaders(msg_id=msg_id, timestamp=int(ts_text), signatures=tuple(signatures))


def check_timestamp(timestamp: int, *, now: float, tolerance_s: float) -> None:
    """Refuse a timestamp more than ``tolerance_s`` before or after ``now`` (both seconds).

    Written as "accept only inside the window" so that a NaN clock or tolerance refuses
    everything instead of comparing false both ways and accepting everything.
    """
    if now - tolerance_s <= timestamp <= now + tolerance_s:
        return
    if timestamp > now:
        raise StaleWebhookError(f"timestamp is more than {tolerance_s:g} s in the future")
    raise StaleWebhookError(f"timestamp is not within {tolerance_s:g} s of now")


def verify_signature(
    parsed: WebhookHeaders, body: bytes, *, public_key: bytes, check: Checker
) -> None:
    """Accept if any ``v1a`` signature verifies under ``public_key``; else SignatureError."""
    content = signed_content(parsed.msg_id, parsed.timestamp, body)
    for signature in parsed.signatures:
        try:
            check(public_key, content, signature)
        except SignatureError:
            continue
        return
    raise SignatureError("no webhook signature verifies")


def verify(
    headers: HeaderInput,
    body: bytes,
    *,
    public_key: bytes,
    check: Checker,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> WebhookHeaders:
    """Parse, check the timestamp window, and verify: the whole Standard Webhooks check."""
    parsed = parse_headers(headers)
    check_timestamp(parsed.timestamp, now=now, tolerance_s=tolerance_s)
    verify_signature(parsed, body, public_key=public_key, check=check)
    return parsed


def verify_hmac(
    headers: HeaderInput,
    body: bytes,
    secret: bytes | str,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> WebhookHeaders:
    """The whole ``v1`` check with the endpoint's shared secret (key bytes or ``whsec_`` text).

    What the ``standardwebhooks`` libraries do, with our bounds: parse (``signatures`` are the
    ``v1`` entries), check the timestamp window, accept if any entry equals the HMAC, compared
    in constant time. It proves only that the sender knows the secret; :func:`verify` (or
    :func:`overflowd.receiver.verify_delivery`) checks who signed the report.
    """
    key = _secret_key(secret)
    parsed = parse_headers(headers, scheme=SCHEME_HMAC)
    check_timestamp(parsed.timestamp, now=now, tolerance_s=tolerance_s)
    expected = hmac_signature(key, parsed.msg_id, parsed.timestamp, body)
    # Every entry is compared, so the time taken does not say which one matched.
    matched = False
    for signature in parsed.signatures:
        matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise SignatureError("no v1 webhook signature matches the secret")
    return parsed
