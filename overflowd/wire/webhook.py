"""Standard Webhooks signatures with Ed25519 (``v1a``): sign and verify, sans-IO.

The Standard Webhooks specification (standardwebhooks.com) signs the exact string
``"{webhook-id}.{webhook-timestamp}.{body}"`` and sends it in three headers::

    webhook-id:         the message id; for overflowd the report id (docs/protocol.md §3)
    webhook-timestamp:  integer seconds since the Unix epoch
    webhook-signature:  space-separated list of "<version>,<base64 signature>"

``v1`` is HMAC-SHA256 with a shared secret; ``v1a`` is Ed25519 over the same string, which is
what a node uses: the receiver needs only the node's public key. A receiver accepts a message if
*any* ``v1a`` entry verifies, so a sender can rotate keys by sending two signatures.

This module is pure: headers and bytes in, values out. The Ed25519 arithmetic is injected
(``sign`` / ``check`` callables, see :mod:`overflowd.identity`), the clock is an argument. It
must never accept a signature over anything but the exact bytes received: the body is signed
as bytes, never re-serialised before checking.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from overflowd.errors import DecodeError, SignatureError

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
#: The Standard Webhooks version tag for Ed25519 signatures.
SCHEME = "v1a"
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


@dataclass(frozen=True, slots=True)
class WebhookHeaders:
    """The three Standard Webhooks headers, parsed. ``signatures`` holds the ``v1a`` entries."""

    msg_id: str
    timestamp: int
    signatures: tuple[bytes, ...]


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The exact bytes that are signed: ``{id}.{timestamp}.{body}``."""
    return f"{msg_id}.{timestamp}.".encode("ascii") + bytes(body)


def sign(msg_id: str, timestamp: int, body: bytes, signer: Signer) -> dict[str, str]:
    """The headers of a message signed with ``signer`` (an Ed25519 signing callable)."""
    if not _ID_RE.match(msg_id) or len(msg_id) > MAX_ID_BYTES:
        raise ValueError("webhook id must be 1-256 characters of [A-Za-z0-9_.:-]")
    if timestamp < 0:
        raise ValueError("timestamp must not be negative")
    signature = signer(signed_content(msg_id, timestamp, body))
    if len(signature) != 64:
        raise ValueError("an Ed25519 signature is 64 bytes")
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: f"{SCHEME},{base64.b64encode(signature).decode('ascii')}",
        "content-type": CONTENT_TYPE,
    }


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


def parse_headers(headers: HeaderInput) -> WebhookHeaders:
    """Parse the three headers; :class:`WebhookDecodeError` for anything malformed.

    Entries of other schemes (``v1`` HMAC, future ones) are skipped, as the specification asks;
    a header without a single ``v1a`` entry is refused.
    """
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
    signatures: list[bytes] = []
    for entry in entries:
        scheme, sep, value = entry.partition(",")
        if not sep:
            raise WebhookDecodeError("a webhook-signature entry is not 'version,signature'")
        if scheme != SCHEME:
            continue
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise WebhookDecodeError("a v1a signature is not base64") from None
        if len(raw) != 64:
            raise WebhookDecodeError("a v1a signature is not 64 bytes")
        signatures.append(raw)
    if not signatures:
        raise WebhookDecodeError("no v1a (Ed25519) signature")
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
