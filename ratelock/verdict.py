"""Signed verdicts: ratelockd's answer as a COSE_Sign1 (RFC 9052) the client can check. Sans-IO.

An application talks to ratelockd through whatever sits between them (a socket, a proxy, a
compromised library); the verdict is what it can trust. Each answer is signed with the node
identity (Ed25519, COSE alg -8) under its own content type ``application/ratelock-verdict+cbor``
in the protected header, so no report, peer record or audit head can ever be taken for a
verdict or the reverse (DESIGN.md "Identity"). The payload binds:

* ``nonce`` — the client's fresh random request nonce: a verdict for another request (an
  "ok" recorded yesterday for alice) is refused (:class:`VerdictReplayError`);
* ``op``, ``client``, ``subject`` (user or record key), ``outcome`` — so an "ok" for bob, or for
  verify when the client asked change, is refused by a client that checks the fields
  (:func:`verify_verdict` does when given ``expect``);
* ``token`` — :func:`token_digest` of the bearer token the request presented (never the token
  itself): the client library computes the same digest of its own token, so a verdict earned
  with another client's token (a second, compromised application re-addressing our request into
  its own namespace) is refused, although the client does not know its own client name;
* ``request`` — SHA-256 of the request body as ratelockd read it (absent only when it refused
  the request before reading the body: ``unauthorized``, ``too_large``, ``bad_request``,
  ``busy``): an altered ``put`` data or ``change`` password is refused by the client;
* ``time`` (Unix ms) — a client refuses one dated more than ``max_skew_ms`` from its clock;
* ``retry_after_ms`` with ``over_budget``; ``digest``, a SHA-256 of record data for ``get``
  (the data itself travels beside the verdict, not inside it).

Version 2 (these two bindings) is the only one accepted: a v1 verdict binds neither.

Strict decoding, as for reports: tag 18, an empty unprotected header, a canonical
(deterministic) protected header and payload, bounded size (:data:`MAX_VERDICT_BYTES`), so
there is exactly one byte string per verdict. Every malformed input raises
:class:`VerdictDecodeError`; nothing else escapes (tests/fuzz/test_ratelock_verdict_fuzz.py).
The Ed25519 work is injected: ``sign(message) -> signature`` and ``check(public_key, message,
signature)`` raising on failure (overflowd.identity.check_signature).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from overflowd.errors import (
    VerdictDecodeError,
    VerdictReplayError,
    VerdictSignatureError,
    VerdictStaleError,
)

CONTENT_TYPE = "application/ratelock-verdict+cbor"
COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
HDR_ALG, HDR_CONTENT_TYPE, HDR_KID = 1, 3, 4
VERDICT_VERSION = 2
#: a verdict is a few hundred bytes; anything bigger is not one and is refused before decoding
MAX_VERDICT_BYTES = 2048
#: request nonces: at least 128 bits so a client's fresh nonce never repeats; at most 64 bytes
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
#: op, outcome: short tokens; client and subject: ratelock.config max_name_bytes' ceiling
MAX_TOKEN_BYTES = 32
MAX_NAME_BYTES = 1024
#: default freshness window (RatelockSettings.verdict_max_skew_s)
DEFAULT_MAX_SKEW_MS = 30_000
U63 = 2**63 - 1

Signer = Callable[[bytes], bytes]
Checker = Callable[[bytes, bytes, bytes], None]

_FIELDS = {"v", "op", "nonce", "client", "subject", "outcome", "time", "token"}
_OPTIONAL = {"retry_after_ms", "digest", "request"}
#: outcomes of a request refused before its body was read: ``request`` may be absent
PRE_BODY_OUTCOMES = frozenset({"unauthorized", "bad_request", "too_large", "busy"})
_TOKEN_DOMAIN = b"ratelock verdict token v2\x00"


def token_digest(token: str) -> bytes:
    """What a verdict binds of the presented bearer token: domain-separated SHA-256, so it is
    neither the token nor the at-rest token hash (ratelock.crypto.token_digest)."""
    return hashlib.sha256(_TOKEN_DOMAIN + token.strip().encode("utf-8", "surrogatepass")).digest()


def body_digest(body: bytes) -> bytes:
    """What a verdict binds of the request body (``request``)."""
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ratelockd decided. ``time_ms`` is when it signed; ``digest`` is SHA-256 of data."""

    op: str
    nonce: bytes
    client: str
    subject: str
    outcome: str
    time_ms: int
    token: bytes
    request: bytes | None = None
    retry_after_ms: int | None = None
    digest: bytes | None = None
    version: int = VERDICT_VERSION


def _canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def _check_fields(v: Verdict, fail: Callable[[str], Exception]) -> None:
    """The same rules for what we sign and what we accept."""
    if v.version != VERDICT_VERSION:
        raise fail(f"verdict version {v.version!r} is not {VERDICT_VERSION}")
    if not MIN_NONCE_BYTES <= len(v.nonce) <= MAX_NONCE_BYTES:
        raise fail(f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")
    for name, value, limit in (
        ("op", v.op, MAX_TOKEN_BYTES),
        ("outcome", v.outcome, MAX_TOKEN_BYTES),
        ("client", v.client, MAX_NAME_BYTES),
        ("subject", v.subject, MAX_NAME_BYTES),
    ):
        if len(value.encode("utf-8", "surrogatepass")) > limit:
            raise fail(f"{name} longer than {limit} bytes")
    if not 0 <= v.time_ms <= U63:
        raise fail("time out of range")
    if v.retry_after_ms is not None and not 0 <= v.retry_after_ms <= U63:
        raise fail("retry_after_ms out of range")
    if v.digest is not None and len(v.digest) != 32:
        raise fail("digest must be 32 bytes")
    if len(v.token) != 32:
        raise fail("token must be a 32-byte digest")
    if v.request is not None and len(v.request) != 32:
        raise fail("request must be a 32-byte digest")


def verdict_to_map(v: Verdict) -> dict[str, Any]:
    m: dict[str, Any] = {
        "v": v.version,
        "op": v.op,
        "nonce": v.nonce,
        "client": v.client,
        "subject": v.subject,
        "outcome": v.outcome,
        "time": v.time_ms,
        "token": v.token,
    }
    if v.request is not None:
        m["request"] = v.request
    if v.retry_after_ms is not None:
        m["retry_after_ms"] = v.retry_after_ms
    if v.digest is not None:
        m["digest"] = v.digest
    return m


def protected_header(public_key: bytes) -> bytes:
    return _canonical({HDR_ALG: ALG_EDDSA, HDR_CONTENT_TYPE: CONTENT_TYPE, HDR_KID: public_key})


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4 Sig_structure for COSE_Sign1 with no external AAD."""
    return _canonical(["Signature1", protected, b"", payload])


def encode_verdict(verdict: Verdict, public_key: bytes, sign: Signer) -> bytes:
    """The COSE_Sign1 bytes of ``verdict``, signed by ``sign`` (the node identity's signer)."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    _check_fields(verdict, ValueError)
    protected = protected_header(public_key)
    payload = _canonical(verdict_to_map(verdict))
    signature = sign(sig_structure(protected, payload))
    data = _canonical(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))
    if len(data) > MAX_VERDICT_BYTES:
        raise ValueError("verdict larger than MAX_VERDICT_BYTES")
    return data


@dataclass(frozen=True, slots=True)
class UnverifiedVerdict:
    kid: bytes
    protected: bytes
    payload_bytes: bytes
    signature: bytes
    verdict: Verdict


def decode_unverified(data: bytes) -> UnverifiedVerdict:
    """Parse without checking the signature; VerdictDecodeError for anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise VerdictDecodeError("a verdict is bytes")
    data = bytes(data)
    if len(data) > MAX_VERDICT_BYTES:
        raise VerdictDecodeError(f"verdict larger than {MAX_VERDICT_BYTES} bytes")
    outer = _loads(data, "verdict")
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise VerdictDecodeError("not a COSE_Sign1 (tag 18)")
    body = outer.value
    if not isinstance(body, list) or len(body) != 4:
        raise VerdictDecodeError("COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = body
    if not isinstance(protected, bytes) or not isinstance(payload, bytes):
        raise VerdictDecodeError("protected header and payload must be byte strings")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise VerdictDecodeError("signature must be 64 bytes (Ed25519)")
    if unprotected != {}:
        raise VerdictDecodeError("unprotected header must be empty")
    if _canonical(outer) != data:
        raise VerdictDecodeError("verdict is not in canonical CBOR")
    header = _loads(protected, "protected header")
    if not isinstance(header, dict) or set(header) != {HDR_ALG, HDR_CONTENT_TYPE, HDR_KID}:
        raise VerdictDecodeError("protected header must hold exactly alg, content type, kid")
    if header[HDR_ALG] != ALG_EDDSA:
        raise VerdictDecodeError("alg is not EdDSA")
    if header[HDR_CONTENT_TYPE] != CONTENT_TYPE:
        raise VerdictDecodeError(f"content type is not {CONTENT_TYPE}")
    kid = header[HDR_KID]
    if not isinstance(kid, bytes) or len(kid) != 32:
        raise VerdictDecodeError("kid must be a 32-byte Ed25519 public key")
    if _canonical(header) != protected:
        raise VerdictDecodeError("protected header is not canonical CBOR")
    fields = _loads(payload, "payload")
    if not isinstance(fields, dict):
        raise VerdictDecodeError("payload must be a map")
    if _canonical(fields) != payload:
        raise VerdictDecodeError("payload is not canonical CBOR")
    verdict = _from_map(fields)
    return UnverifiedVerdict(kid, protected, payload, signature, verdict)


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise VerdictDecodeError(f"{what}: not CBOR ({type(exc).__name__})") from None
    except Exception as exc:  # cbor2's C decoder raises assorted types for garbage
        raise VerdictDecodeError(f"{what}: not CBOR ({type(exc).__name__})") from None


def _from_map(m: Mapping[Any, Any]) -> Verdict:
    keys = set(m)
    if not keys >= _FIELDS or keys - _FIELDS - _OPTIONAL:
        raise VerdictDecodeError("payload fields are not those of a verdict")

    def typed(name: str, kind: type) -> Any:
        value = m[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise VerdictDecodeError(f"{name} must be an integer")
        if not isinstance(value, kind):
            raise VerdictDecodeError(f"{name} must be {kind.__name__}")
        return value

    verdict = Verdict(
        op=typed("op", str),
        nonce=typed("nonce", bytes),
        client=typed("client", str),
        subject=typed("subject", str),
        outcome=typed("outcome", str),
        time_ms=typed("time", int),
        token=typed("token", bytes),
        request=typed("request", bytes) if "request" in m else None,
        retry_after_ms=typed("retry_after_ms", int) if "retry_after_ms" in m else None,
        digest=typed("digest", bytes) if "digest" in m else None,
        version=typed("v", int),
    )
    _check_fields(verdict, VerdictDecodeError)
    return verdict


def verify_verdict(
    data: bytes,
    check: Checker,
    *,
    public_key: bytes,
    nonce: bytes,
    now_ms: int,
    token: bytes,
    request: bytes | None = None,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    expect: Mapping[str, str] | None = None,
) -> Verdict:
    """Decode, then refuse unless signed by ``public_key``, for ``nonce``, ``token``, and fresh.

    ``token`` is :func:`token_digest` of the token this request presented; ``request``, when
    given, :func:`body_digest` of the body it sent: the verdict must bind it, unless its outcome
    is one of :data:`PRE_BODY_OUTCOMES` and it binds no body. ``expect`` maps field names
    (``op``, ``client``, ``subject``) to the values this request asked for; a verdict about
    anything else is refused as a replay.
    """
    u = decode_unverified(data)
    if not hmac.compare_digest(u.kid, public_key):
        raise VerdictSignatureError("verdict signed by another key than ratelockd's")
    try:
        check(public_key, sig_structure(u.protected, u.payload_bytes), u.signature)
    except Exception:  # the injected checker's own error: any failure means forged
        raise VerdictSignatureError("verdict signature does not verify") from None
    v = u.verdict
    if not hmac.compare_digest(v.nonce, nonce):
        raise VerdictReplayError("verdict does not bind this request's nonce")
    if not hmac.compare_digest(v.token, token):
        raise VerdictReplayError("verdict answers a request made with another token")
    if request is not None:
        if v.request is None:
            if v.outcome not in PRE_BODY_OUTCOMES:
                raise VerdictReplayError("verdict does not bind the request body")
        elif not hmac.compare_digest(v.request, request):
            raise VerdictReplayError("verdict answers a request with another body")
    for name, wanted in (expect or {}).items():
        if getattr(v, name) != wanted:
            raise VerdictReplayError(f"verdict is about another {name}")
    if abs(v.time_ms - now_ms) > max_skew_ms:
        raise VerdictStaleError(
            f"verdict dated {(v.time_ms - now_ms) / 1000:+.1f} s from this clock "
            f"(limit {max_skew_ms / 1000:.0f} s)"
        )
    return v
