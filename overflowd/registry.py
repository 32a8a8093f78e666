"""Keys and contacts published in DNS: the ``_overflowd`` TXT record (sans-IO).

The record uses DKIM-style ``tag=value`` pairs separated by ``;`` (docs/protocol.md, "DNS
record"). Unknown tags are ignored so the format can grow; an empty ``p=`` revokes a key.
Lookups, caches and trust come with the registry issue; this module only formats and parses.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from overflowd.errors import DecodeError

RECORD_LABEL = "_overflowd"
RECORD_VERSION = "OVF1"
KEY_TYPE = "ed25519"
#: A TXT character-string holds at most 255 bytes (RFC 1035 §3.3); longer records are split.
TXT_STRING_MAX = 255
#: Records longer than this are refused before parsing (a whole TXT RR fits in 64 KiB anyway).
MAX_RECORD_BYTES = 4096

_URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:[^\s;,]+$")


@dataclass(frozen=True)
class KeyRecord:
    """One parsed ``_overflowd`` record. ``public_key`` is None for a revocation."""

    public_key: bytes | None
    contacts: tuple[str, ...] = ()
    webhook_url: str | None = None
    boost: float | None = None


def check_contact(uri: str) -> str:
    """A contact is a URI without white space, ';' or ',' (percent-encode those)."""
    if not _URI_RE.match(uri):
        raise ValueError(
            f"'{uri}' is not a contact URI (mailto:, https:, tel:; no spaces, ';' or ',')"
        )
    return uri


def format_record(
    public_key: bytes,
    contacts: tuple[str, ...] | list[str] = (),
    webhook_url: str | None = None,
    boost: float | None = None,
) -> str:
    """The record's text, before splitting into character-strings."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    tags = [f"v={RECORD_VERSION}", f"k={KEY_TYPE}", f"p={base64.b64encode(public_key).decode()}"]
    if contacts:
        tags.append("c=" + ",".join(check_contact(c) for c in contacts))
    if webhook_url:
        if not re.match(r"^https?://[^\s;]+$", webhook_url):
            raise ValueError(f"'{webhook_url}' is not an http(s) URL without spaces or ';'")
        tags.append(f"u={webhook_url}")
    if boost is not None:
        if not 1 <= boost <= 1e6:
            raise ValueError("boost must be between 1 and 1000000")
        tags.append(f"r={boost:g}")
    return "; ".join(tags)


def split_txt(text: str) -> list[str]:
    """Split into TXT character-strings of at most 255 bytes (the record is ASCII)."""
    raw = text.encode("ascii")
    return [raw[i : i + TXT_STRING_MAX].decode("ascii") for i in range(0, len(raw), TXT_STRING_MAX)]


def zone_line(text: str, name: str | None = None, ttl: int = 3600) -> str:
    """A zone-file line; ``name`` None gives the relative owner ``_overflowd``."""
    owner = RECORD_LABEL if not name else f"{RECORD_LABEL}.{name.rstrip('.')}."
    strings = " ".join(f'"{s}"' for s in split_txt(text))
    return f"{owner} {ttl} IN TXT {strings}"


def parse_record(strings: list[bytes] | bytes | str) -> KeyRecord:
    """Parse a record (its character-strings are joined first); DecodeError if it is not ours."""
    if isinstance(strings, str):
        raw = strings.encode("utf-8", "surrogateescape")
    elif isinstance(strings, bytes):
        raw = strings
    else:
        raw = b"".join(strings)
    if len(raw) > MAX_RECORD_BYTES:
        raise DecodeError(f"record longer than {MAX_RECORD_BYTES} bytes", fmt="dns-txt")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError("record is not ASCII", fmt="dns-txt", offset=exc.start) from None
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", name):
            raise DecodeError(f"malformed tag '{part[:40]}'", fmt="dns-txt")
        if name in tags:
            raise DecodeError(f"tag '{name}' appears twice", fmt="dns-txt")
        tags[name] = re.sub(r"\s+", "", value)  # DKIM folds white space inside values
    if tags.get("v") != RECORD_VERSION:
        raise DecodeError(f"not an {RECORD_VERSION} record (v=)", fmt="dns-txt")
    if tags.get("k", KEY_TYPE) != KEY_TYPE:
        raise DecodeError(f"key type {tags['k']!r} is not supported", fmt="dns-txt")
    if "p" not in tags:
        raise DecodeError("no p= tag", fmt="dns-txt")
    key: bytes | None = None
    if tags["p"]:
        try:
            key = base64.b64decode(tags["p"], validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError("p= is not base64", fmt="dns-txt") from None
        if len(key) != 32:
            raise DecodeError("p= is not a 32-byte Ed25519 key", fmt="dns-txt")
    contacts: tuple[str, ...] = ()
    if tags.get("c"):
        contacts = tuple(c for c in tags["c"].split(",") if c)
        if not all(_URI_RE.match(c) for c in contacts):
            raise DecodeError("c= holds something that is not a URI", fmt="dns-txt")
    boost: float | None = None
    if tags.get("r"):
        try:
            boost = float(tags["r"])
        except ValueError:
            raise DecodeError("r= is not a number", fmt="dns-txt") from None
        if not 1 <= boost <= 1e6:
            raise DecodeError("r= is out of range", fmt="dns-txt")
    return KeyRecord(
        public_key=key, contacts=contacts, webhook_url=tags.get("u") or None, boost=boost
    )
