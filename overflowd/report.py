"""The signed report: a COSE_Sign1 (RFC 9052) over a deterministic CBOR payload.

Sans-IO: bytes and values in, values out. This module builds the exact bytes that are signed
and parses what arrives; the Ed25519 arithmetic itself is injected (``sign`` / ``check``
callables, see :mod:`overflowd.identity`), so the codec imports no crypto, no sockets, no clock.

It must never accept two different byte strings for the same signed content: the report id is a
hash of the COSE bytes, and de-duplication across UDP, HTTP and gossip relies on it. Hence the
strict rules in :func:`decode_unverified` (tag 18, empty unprotected header, canonical outer
encoding, deterministic payload). The wire contract is written down in ``docs/protocol.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from overflowd.errors import ReportDecodeError

CONTENT_TYPE = "application/overflowd-report+cbor"
COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID = 1, 2, 3, 4
PAYLOAD_VERSION = 1

#: One report must fit one UDP datagram of 1200 bytes after the 4-byte magic (DESIGN.md),
#: the IPv6 minimum MTU less headers. Parsing refuses anything longer before decoding it.
MAX_REPORT_BYTES = 1196
#: Field limits chosen so that the largest possible report still fits MAX_REPORT_BYTES
#: (tests/unit/test_report.py builds that worst case).
MAX_CONTACTS = 4
MAX_CONTACT_BYTES_TOTAL = 512
MAX_POINT_BYTES = 64
MAX_KIND_BYTES = 32
MAX_FORMAT_BYTES = 24
NONCE_BYTES = 16
U64 = 2**64 - 1
U32 = 2**32 - 1

KIND_RE = re.compile(r"[a-z][a-z0-9-]*")  # used with fullmatch: "$" would allow a newline
PROVENANCES = ("announced", "overridden", "assumed")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Signer = Callable[[bytes], bytes]
#: ``check(public_key, message, signature)`` raises :class:`overflowd.errors.SignatureError`.
Checker = Callable[[bytes, bytes, bytes], None]


@dataclass(frozen=True, slots=True)
class Flow:
    """The flow a report is about. Times are integer milliseconds since the Unix epoch."""

    src: Address
    dst: Address
    sport: int
    dport: int
    proto: int
    packets: int
    bytes: int
    first: int
    last: int
    tcp_flags: int = 0
    tos: int = 0
    src_as: int | None = None
    dst_as: int | None = None


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the flow came to be reported: probability ``p`` and the exporter's own sampling."""

    probability: float
    format: str
    interval: int = 1
    provenance: str = "assumed"


@dataclass(frozen=True, slots=True)
class Observer:
    """Who saw it: contact URIs and a free-text observation point (router, interface)."""

    contacts: tuple[str, ...] = ()
    point: str = ""


@dataclass(frozen=True, slots=True)
class Payload:
    """What is signed. ``time`` is when the report was made, in Unix milliseconds."""

    kind: str
    nonce: bytes
    time: int
    observer: Observer
    flow: Flow
    sampling: Sampling
    version: int = PAYLOAD_VERSION


@dataclass(frozen=True, slots=True)
class UnverifiedReport:
    """A structurally valid report whose signature has not been checked yet."""

    cose: bytes
    protected: bytes
    payload_bytes: bytes
    signature: bytes
    kid: bytes
    payload: Payload

    @property
    def to_be_signed(self) -> bytes:
        return sig_structure(self.protected, self.payload_bytes)


@dataclass(frozen=True, slots=True)
class SignedReport:
    """A report whose signature verified against ``observer_key`` (the COSE kid)."""

    cose: bytes
    observer_key: bytes
    payload: Payload
    report_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_id", report_id(self.cose))


def _slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    setter: Callable[[Any, Any], None] = getattr(cls, name).__set__
    return setter


def _positional_constructor(cls: type) -> Callable[..., Any]:
    """A constructor of the frozen slotted dataclass ``cls`` taking every field positionally:
    the same object as ``cls(*values)``, without the generated ``__init__``'s attribute lookup
    per field (``object.__setattr__`` by name): each slot's own setter, bound once.

    For the few objects made per report signed (Flow, Sampling, Payload, SignedReport), where
    that lookup costs about as much as the rest of building them; ``tests/unit/test_report.py``
    checks they equal what the dataclass builds.
    """
    names = list(cls.__slots__)  # type: ignore[attr-defined]
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    body = []
    for i, name in enumerate(names):
        scope[f"set{i}"] = _slot_setter(cls, name)
        body.append(f"    set{i}(self, {name})")
    source = f"def construct({', '.join(names)}):\n    self = new(cls)\n"
    source += "\n".join(body) + "\n    return self\n"
    exec(source, scope)  # built from the class's own slot names, nothing else
    construct: Callable[..., Any] = scope["construct"]
    return construct


def report_id(cose: bytes) -> str:
    """The report id: lowercase hex SHA-256 of the exact COSE bytes."""
    return hashlib.sha256(cose).hexdigest()


def key_fingerprint(public_key: bytes) -> str:
    """A short, stable name for a key, for people: first 8 bytes of its SHA-256, in 4 groups."""
    digest = hashlib.sha256(public_key).hexdigest()[:16]
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; ValueError on anything else."""
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


new_flow: Callable[..., Flow] = _positional_constructor(Flow)
new_sampling: Callable[..., Sampling] = _positional_constructor(Sampling)
new_payload: Callable[..., Payload] = _positional_constructor(Payload)
_NEW = object.__new__
_SET_COSE, _SET_KEY, _SET_PAYLOAD, _SET_ID = (
    _slot_setter(SignedReport, name) for name in ("cose", "observer_key", "payload", "report_id")
)


def new_signed_report(cose: bytes, observer_key: bytes, payload: Payload) -> SignedReport:
    """``SignedReport(cose=..., observer_key=..., payload=...)``, its id included, built
    like the constructors above (see :func:`_positional_constructor`)."""
    self = _NEW(SignedReport)
    _SET_COSE(self, cose)
    _SET_KEY(self, observer_key)
    _SET_PAYLOAD(self, payload)
    _SET_ID(self, hashlib.sha256(cose).hexdigest())
    return self


# ---------------------------------------------------------------------------------------------
# Encoding


def _canonical(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def _address_bytes(address: Address) -> bytes:
    return address.packed


def payload_to_map(payload: Payload) -> dict[str, Any]:
    """The CBOR data model of a payload (docs/protocol.md, "Payload")."""
    fl = payload.flow
    flow: dict[str, Any] = {
        "src": _address_bytes(fl.src),
        "dst": _address_bytes(fl.dst),
        "sport": fl.sport,
        "dport": fl.dport,
        "proto": fl.proto,
        "packets": fl.packets,
        "bytes": fl.bytes,
        "first": fl.first,
        "last": fl.last,
        "tcp_flags": fl.tcp_flags,
        "tos": fl.tos,
    }
    if fl.src_as is not None:
        flow["src_as"] = fl.src_as
    if fl.dst_as is not None:
        flow["dst_as"] = fl.dst_as
    observer: dict[str, Any] = {"contacts": list(payload.observer.contacts)}
    if payload.observer.point:
        observer["point"] = payload.observer.point
    sm = payload.sampling
    return {
        "v": payload.version,
        "kind": payload.kind,
        "nonce": payload.nonce,
        "time": payload.time,
        "observer": observer,
        "flow": flow,
        "sampling": {
            "p": float(sm.probability),
            "format": sm.format,
            "interval": sm.interval,
            "provenance": sm.provenance,
        },
    }


def encode_payload(payload: Payload) -> bytes:
    """Deterministic CBOR (RFC 8949 §4.2) of a payload, after checking every field.

    Written out by hand in the deterministic key order (a general encoder sorting keys costs as
    much as the signature itself); tests compare every byte with cbor2's canonical encoding.
    """
    _check_payload(payload)
    return _encode_payload_fast(payload)


def protected_header(kid: bytes) -> bytes:
    return _canonical({HDR_ALG: ALG_EDDSA, HDR_CONTENT_TYPE: CONTENT_TYPE, HDR_KID: kid})


def _head(major: int, n: int) -> bytes:
    """A CBOR head in its shortest form (RFC 8949 §3, §4.2.1)."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


def _bstr(data: bytes) -> bytes:
    return _head(2, len(data)) + data


def _tstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _head(3, len(raw)) + raw


_SMALL_UINTS = tuple(bytes((n,)) if n < 24 else bytes((24, n)) for n in range(256))
_PACK_U16 = struct.Struct(">BH").pack
_PACK_U32 = struct.Struct(">BI").pack
_PACK_U64 = struct.Struct(">BQ").pack


def _cbor_uint(n: int) -> bytes:
    """An unsigned integer's shortest head; ``n`` is checked to be in 0..2**64-1 before."""
    if n < 0x100:
        return _SMALL_UINTS[n]
    if n < 0x10000:
        return _PACK_U16(0x19, n)
    if n < 0x100000000:
        return _PACK_U32(0x1A, n)
    return _PACK_U64(0x1B, n)


def _float(x: float) -> bytes:
    """The shortest of half, single and double precision that keeps ``x`` (RFC 8949 §4.2.2)."""
    for code, fmt in ((0xF9, ">e"), (0xFA, ">f")):
        try:
            packed = struct.pack(fmt, x)
        except OverflowError:
            continue
        if struct.unpack(fmt, packed)[0] == x:
            return bytes((code,)) + packed
    return b"\xfb" + struct.pack(">d", x)


# Map keys in deterministic order: shorter encodings first, then bytewise (RFC 8949 §4.2.1).
_K = {
    k: _tstr(k)
    for k in (
        "v", "flow", "kind", "time", "nonce", "observer", "sampling", "dst", "src", "tos",
        "last", "bytes", "dport", "first", "proto", "sport", "dst_as", "src_as", "packets",
        "tcp_flags", "point", "contacts", "p", "format", "interval", "provenance",
    )
}  # fmt: skip


def _encode_observer(obs: Observer) -> bytes:
    """The payload's ``"observer"`` key and its map."""
    k = _K
    observer = [k["observer"], _head(5, 2 if obs.point else 1)]
    if obs.point:
        observer += (k["point"], _tstr(obs.point))
    observer += (k["contacts"], _head(4, len(obs.contacts)), *map(_tstr, obs.contacts))
    return b"".join(observer)


def _encode_payload_fast(payload: Payload) -> bytes:
    fl = payload.flow
    k = _K
    u = _cbor_uint
    flow_items = 11 + (fl.src_as is not None) + (fl.dst_as is not None)
    flow = [
        _head(5, flow_items),
        k["dst"], _bstr(fl.dst.packed), k["src"], _bstr(fl.src.packed), k["tos"], u(fl.tos),
        k["last"], u(fl.last), k["bytes"], u(fl.bytes), k["dport"], u(fl.dport),
        k["first"], u(fl.first), k["proto"], u(fl.proto), k["sport"], u(fl.sport),
    ]  # fmt: skip
    if fl.dst_as is not None:
        flow += (k["dst_as"], u(fl.dst_as))
    if fl.src_as is not None:
        flow += (k["src_as"], u(fl.src_as))
    flow += (k["packets"], u(fl.packets), k["tcp_flags"], u(fl.tcp_flags))
    sm = payload.sampling
    return b"".join((
        b"\xa7", k["v"], u(payload.version),
        k["flow"], *flow,
        k["kind"], _tstr(payload.kind),
        k["time"], u(payload.time),
        k["nonce"], _bstr(payload.nonce),
        _encode_observer(payload.observer),
        k["sampling"], b"\xa4", k["p"], _float(float(sm.probability)),
        k["format"], _tstr(sm.format), k["interval"], u(sm.interval),
        k["provenance"], _tstr(sm.provenance),
    ))  # fmt: skip


# Fixed prefixes of the Sig_structure and the message, written out once: the hot path of a
# node signing many reports needs no CBOR encoder for them (tests compare with cbor2's output).
_SIG1_PREFIX = b"\x84" + _canonical("Signature1")
_EMPTY_BSTR = b"\x40"
_COSE_PREFIX = b"\xd2\x84"  # tag 18, array of 4
_EMPTY_MAP = b"\xa0"


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The COSE Sig_structure for COSE_Sign1 with empty external AAD (RFC 9052 §4.4)."""
    return _SIG1_PREFIX + _bstr(protected) + _EMPTY_BSTR + _bstr(payload)


def encode_signed(
    payload: Payload, kid: bytes, sign: Signer, *, protected: bytes | None = None
) -> bytes:
    """Build the COSE_Sign1 bytes of ``payload`` signed by ``sign`` under public key ``kid``.

    ``protected`` may pass :func:`protected_header` of ``kid`` computed once by the caller.
    """
    if len(kid) != 32:
        raise ValueError("kid must be the 32-byte Ed25519 public key")
    if protected is None:
        protected = protected_header(kid)
    payload_bytes = encode_payload(payload)
    signature = sign(sig_structure(protected, payload_bytes))
    if len(signature) != 64:
        raise ValueError("an Ed25519 signature is 64 bytes")
    cose = (
        _COSE_PREFIX + _bstr(protected) + _EMPTY_MAP + _bstr(payload_bytes) + _bstr(signature)
    )
    if len(cose) > MAX_REPORT_BYTES:  # cannot happen within the field limits; guard anyway
        raise ValueError(f"report is {len(cose)} bytes, more than {MAX_REPORT_BYTES}")
    return cose


#: Distinct (kind) and (format, interval, provenance) values whose checked encodings an
#: :class:`Envelope` keeps; past this the table starts again empty. Kinds are the node's own
#: few; formats and provenances are a handful, but intervals come from exporters, so the
#: table must be bounded whatever they announce. ~100 bytes an entry.
ENVELOPE_SHAPES = 256
#: Sampling probabilities whose float encodings an :class:`Envelope` keeps (same rule).
ENVELOPE_FLOATS = 1024

_ADDRESS_HEADS = {ipaddress.IPv4Address: b"\x44", ipaddress.IPv6Address: b"\x50"}
_K_TOS, _K_LAST, _K_BYTES, _K_DPORT = _K["tos"], _K["last"], _K["bytes"], _K["dport"]
_K_FIRST, _K_PROTO, _K_SPORT, _K_PACKETS = _K["first"], _K["proto"], _K["sport"], _K["packets"]
_K_DST_AS, _K_SRC_AS, _K_TCP_FLAGS = _K["dst_as"], _K["src_as"], _K["tcp_flags"]
_K_TIME = _K["time"]
_K_NONCE = _K["nonce"] + _head(2, NONCE_BYTES)
_K_SAMPLING_P = _K["sampling"] + b"\xa4" + _K["p"]
_SIG_BSTR = _head(2, 64)


class Envelope:
    """Canonical CBOR and COSE_Sign1 for the reports of one observer under one key.

    What a report maker writes the same way every time is checked and encoded once, here or
    on first sight, rather than per report: the protected header and both COSE prefixes, the
    observer (contacts, point), each ``kind``, and each (format, interval, provenance) of the
    sampling map. Per report only the fields that vary are checked (the flow, time, nonce,
    ``p``) and written into the fixed pieces.

    It must give, for every payload, exactly what :func:`encode_payload` and
    :func:`encode_signed` give (the same bytes, the same refusals with the same messages):
    whatever the fast path does not recognise (another observer, an unseen shape, any field
    of an unexpected type or out of range) goes to them. ``tests/fuzz/test_report_fuzz.py``
    compares both, and cbor2, on random and hostile payloads.
    """

    __slots__ = ("_cose_prefix", "_floats", "_kinds", "_observer", "_observer_bytes",
                 "_samplings", "_sig_prefix", "_sign", "kid", "observer", "protected")  # fmt: skip

    def __init__(self, kid: bytes, sign: Signer, observer: Observer) -> None:
        if len(kid) != 32:
            raise ValueError("kid must be the 32-byte Ed25519 public key")
        self.kid = kid
        self.observer = observer
        self._sign = sign
        self.protected = protected = protected_header(kid)
        self._sig_prefix = _SIG1_PREFIX + _bstr(protected) + _EMPTY_BSTR
        self._cose_prefix = _COSE_PREFIX + _bstr(protected) + _EMPTY_MAP
        self._kinds: dict[str, bytes] = {}
        self._samplings: dict[tuple[str, int, str], bytes] = {}
        self._floats: dict[float, bytes] = {}
        # The observer is checked once: a payload naming this very object needs no check of
        # it again (frozen, of immutable parts). An observer no report may carry is left to
        # encode_payload, which refuses it in its own words.
        self._observer: object = _NOT_CHECKED
        self._observer_bytes = b""
        # Only an Observer of a tuple is immutable all through: contacts given as a list (the
        # annotation is not enforced) could change after this check, and the bytes with them.
        if type(observer) is not Observer or type(observer.contacts) is not tuple:
            return
        probe = Payload("x", bytes(NONCE_BYTES), 0, observer, _PROBE_FLOW, _PROBE_SAMPLING)
        try:
            _check_payload(probe)
        except ValueError:
            return
        self._observer_bytes = _encode_observer(observer)
        self._observer = observer

    def encode_payload(self, payload: Payload) -> bytes:
        """:func:`encode_payload` of ``payload``: the same bytes, or the same ValueError."""
        fl = payload.flow
        sm = payload.sampling
        src, dst = fl.src, fl.dst
        kind, interval, p = payload.kind, sm.interval, sm.probability
        time, nonce = payload.time, payload.nonce
        sport, dport, proto, tos = fl.sport, fl.dport, fl.proto, fl.tos
        packets, nbytes, first, last = fl.packets, fl.bytes, fl.first, fl.last
        tcp_flags, src_as, dst_as = fl.tcp_flags, fl.src_as, fl.dst_as
        address_head = _ADDRESS_HEADS.get(type(src))
        if not (
            payload.observer is self._observer
            and payload.version == PAYLOAD_VERSION
            and type(payload.version) is int
            and type(kind) is str
            and (kind_bytes := self._kinds.get(kind)) is not None
            and type(interval) is int
            and type(sm.format) is str
            and type(sm.provenance) is str
            and (sampling_tail := self._samplings.get((sm.format, interval, sm.provenance)))
            is not None
            and type(p) is float
            and 0.0 < p <= 1.0
            and type(nonce) is bytes
            and len(nonce) == NONCE_BYTES
            and address_head is not None
            and type(dst) is type(src)
            and type(time) is int and 0 <= time <= U64
            and type(sport) is int and 0 <= sport <= 0xFFFF
            and type(dport) is int and 0 <= dport <= 0xFFFF
            and type(proto) is int and 0 <= proto <= 0xFF
            and type(tos) is int and 0 <= tos <= 0xFF
            and type(tcp_flags) is int and 0 <= tcp_flags <= 0xFFFF
            and type(packets) is int and 0 <= packets <= U64
            and type(nbytes) is int and 0 <= nbytes <= U64
            and type(first) is int and 0 <= first <= U64
            and type(last) is int and 0 <= last <= U64
            and (src_as is None or (type(src_as) is int and 0 <= src_as <= U32))
            and (dst_as is None or (type(dst_as) is int and 0 <= dst_as <= U32))
        ):  # fmt: skip
            return self._encode_slow(payload)
        p_bytes = self._floats.get(p)
        if p_bytes is None:
            if len(self._floats) >= ENVELOPE_FLOATS:
                self._floats.clear()
            p_bytes = self._floats[p] = _float(p)
        u = _cbor_uint
        small = _SMALL_UINTS  # tos and proto are at most 0xFF (checked above)
        flow_items = 11 + (src_as is not None) + (dst_as is not None)
        parts = [
            _FLOW_OPENINGS[flow_items], address_head, dst.packed, _K_SRC, address_head,
            src.packed, _K_TOS, small[tos], _K_LAST, u(last), _K_BYTES, u(nbytes), _K_DPORT,
            u(dport), _K_FIRST, u(first), _K_PROTO, small[proto], _K_SPORT, u(sport),
        ]  # fmt: skip
        if dst_as is not None:
            parts += (_K_DST_AS, u(dst_as))
        if src_as is not None:
            parts += (_K_SRC_AS, u(src_as))
        parts += (
            _K_PACKETS, u(packets), _K_TCP_FLAGS, u(tcp_flags), kind_bytes, _K_TIME, u(time),
            _K_NONCE, nonce, self._observer_bytes, _K_SAMPLING_P, p_bytes, sampling_tail,
        )  # fmt: skip
        return b"".join(parts)

    def _encode_slow(self, payload: Payload) -> bytes:
        """Today's path, which also says why a payload is refused; then remember the shape."""
        encoded = encode_payload(payload)  # raises what it raises
        kind, sm = payload.kind, payload.sampling
        if type(kind) is str:
            if len(self._kinds) >= ENVELOPE_SHAPES:
                self._kinds.clear()
            self._kinds[kind] = _K["kind"] + _tstr(kind)
        if type(sm.format) is str and type(sm.interval) is int and type(sm.provenance) is str:
            if len(self._samplings) >= ENVELOPE_SHAPES:
                self._samplings.clear()
            self._samplings[(sm.format, sm.interval, sm.provenance)] = b"".join((
                _K["format"], _tstr(sm.format), _K["interval"], _cbor_uint(sm.interval),
                _K["provenance"], _tstr(sm.provenance),
            ))  # fmt: skip
        return encoded

    def sign(self, payload: Payload) -> bytes:
        """:func:`encode_signed` of ``payload`` under this key: the COSE_Sign1 bytes.

        The Sig_structure and the COSE_Sign1 share the payload's encoding and the fixed
        prefixes written once; the payload is encoded once.
        """
        payload_bytes = self.encode_payload(payload)
        payload_bstr = _bstr(payload_bytes)
        signature = self._sign(self._sig_prefix + payload_bstr)
        if len(signature) != 64:
            raise ValueError("an Ed25519 signature is 64 bytes")
        cose = self._cose_prefix + payload_bstr + _SIG_BSTR + signature
        if len(cose) > MAX_REPORT_BYTES:  # cannot happen within the field limits; guard anyway
            raise ValueError(f"report is {len(cose)} bytes, more than {MAX_REPORT_BYTES}")
        return cose


_K_SRC = _K["src"]
# The flow map's head, after the payload map's opening, "v": 1 and "flow", by item count,
# followed by "dst" (the first key of the flow map).
_FLOW_OPENINGS = {
    n: b"\xa7" + _K["v"] + _cbor_uint(PAYLOAD_VERSION) + _K["flow"] + _head(5, n) + _K["dst"]
    for n in (11, 12, 13)
}
_PROBE_FLOW = Flow(
    src=ipaddress.IPv4Address(0), dst=ipaddress.IPv4Address(0), sport=0, dport=0, proto=0,
    packets=0, bytes=0, first=0, last=0,
)  # fmt: skip
_PROBE_SAMPLING = Sampling(probability=1.0, format="")
_NOT_CHECKED = object()


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_unverified(data: bytes) -> UnverifiedReport:
    """Parse COSE bytes into a report; raise :class:`ReportDecodeError` and nothing else.

    The signature is *not* checked here; :func:`verify` does that.

    Fast path: the outer array is split by hand and the payload's canonical form is checked
    by re-encoding the decoded :class:`Payload` with the hand-written encoder (cbor2's
    canonical encoder sorting keys cost as much as the signature check). A report is accepted
    here only when its bytes are exactly what the encoders write for the decoded values, which
    is what the general decoder accepts; anything else (refusals included) goes to
    :func:`_decode_unverified_reference`, so the verdicts and messages do not change.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("report must be bytes")
    data = bytes(data)
    if not 0 < len(data) <= MAX_REPORT_BYTES:
        return _decode_unverified_reference(data)
    parts = _split_sign1(data)
    if parts is None:
        return _decode_unverified_reference(data)
    protected, payload_bytes, signature = parts
    if len(protected) == _PROTECTED_LEN and protected.startswith(_PROTECTED_PREFIX):
        kid = protected[-32:]  # exactly protected_header(kid): what _parse_protected accepts
    else:
        return _decode_unverified_reference(data)
    try:
        payload_map = cbor2.loads(payload_bytes)
        payload = _payload_from_map(payload_map) if type(payload_map) is dict else None
        same = payload is not None and _encode_payload_fast(payload) == payload_bytes
    except Exception:  # the general decoder says what is wrong, in its words
        same = False
    if not same:
        return _decode_unverified_reference(data)
    assert payload is not None
    return UnverifiedReport(
        cose=data,
        protected=protected,
        payload_bytes=payload_bytes,
        signature=signature,
        kid=kid,
        payload=payload,
    )


_PROTECTED_PREFIX = protected_header(bytes(32))[:-32]
_PROTECTED_LEN = len(_PROTECTED_PREFIX) + 32


def _split_sign1(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(protected, payload, signature) if ``data`` is exactly the canonical COSE_Sign1 that
    :func:`encode_signed` writes around them (tag 18, empty unprotected map, a 64-byte
    signature), else None: the general decoder then looks at it."""
    pos, fields = 2, []
    if data[:2] != _COSE_PREFIX:
        return None
    for _ in range(3):
        head = data[pos : pos + 1]
        if head == b"\x58":  # a byte string of 24..255 bytes
            n, pos = data[pos + 1 : pos + 2], pos + 2
        elif head == b"\x59":  # 256..65535 bytes
            n, pos = data[pos + 1 : pos + 3], pos + 3
        else:  # shorter (0x40..0x57) or longer heads: not what a report holds
            return None
        end = pos + int.from_bytes(n, "big")
        fields.append(data[pos:end])
        pos = end
        if len(fields) == 1:
            if data[pos : pos + 1] != _EMPTY_MAP:
                return None
            pos += 1  # the unprotected header, after the protected one
    protected, payload_bytes, signature = fields
    if len(signature) != 64 or pos != len(data):
        return None
    rebuilt = _COSE_PREFIX + _bstr(protected) + _EMPTY_MAP + _bstr(payload_bytes) + _bstr(signature)
    return (protected, payload_bytes, signature) if rebuilt == data else None


def _decode_unverified_reference(data: bytes) -> UnverifiedReport:
    """The general decoder: cbor2 decodes, every check, and cbor2 re-encodes to compare.

    It decides every input the fast path of :func:`decode_unverified` does not accept
    itself; ``tests/unit/test_report_fast_decode.py`` checks both give the same verdicts.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("report must be bytes")
    data = bytes(data)
    if len(data) > MAX_REPORT_BYTES:
        raise ReportDecodeError(f"{len(data)} bytes, more than {MAX_REPORT_BYTES}")
    if not data:
        raise ReportDecodeError("empty input")
    outer = _loads(data, "message")
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise ReportDecodeError("not a tagged COSE_Sign1 (tag 18)", offset=0)
    body = outer.value
    if not isinstance(body, list) or len(body) != 4:
        raise ReportDecodeError("COSE_Sign1 must be an array of 4")
    protected, unprotected, payload_bytes, signature = body
    if not isinstance(protected, bytes):
        raise ReportDecodeError("protected header must be a byte string")
    if not isinstance(unprotected, dict) or unprotected:
        raise ReportDecodeError("unprotected header must be an empty map")
    if not isinstance(payload_bytes, bytes):
        raise ReportDecodeError("payload must be an attached byte string")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise ReportDecodeError("signature must be 64 bytes")
    if _recanonical(outer, "COSE_Sign1") != data:
        raise ReportDecodeError("COSE_Sign1 is not in canonical encoding")
    kid = _parse_protected(protected)
    payload_map = _loads(payload_bytes, "payload")
    if not isinstance(payload_map, dict):
        raise ReportDecodeError("payload must be a map")
    payload = _payload_from_map(payload_map)
    if _recanonical(payload_map, "payload") != payload_bytes:
        raise ReportDecodeError("payload is not deterministic CBOR")
    return UnverifiedReport(
        cose=data,
        protected=protected,
        payload_bytes=payload_bytes,
        signature=signature,
        kid=kid,
        payload=payload,
    )


def verify(data: bytes, check: Checker) -> SignedReport:
    """Parse and verify a report; ``check`` is the Ed25519 verifier (see identity.py)."""
    unverified = decode_unverified(data)
    check(unverified.kid, unverified.to_be_signed, unverified.signature)
    return SignedReport(
        cose=unverified.cose, observer_key=unverified.kid, payload=unverified.payload
    )


def _recanonical(obj: Any, what: str) -> bytes:
    """Re-encode what cbor2 decoded, to compare; anything it cannot encode is our decode error.

    Decoded values can hold things the encoder refuses (self-referencing tags 28/29, odd
    tags inside unknown keys): that must never escape as anything but ReportDecodeError.
    """
    try:
        return _canonical(obj)
    except Exception as exc:  # cbor2 raises CBOREncodeError, ValueError, RecursionError...
        raise ReportDecodeError(f"{what} cannot be re-encoded: {type(exc).__name__}") from None


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, ...)
        raise ReportDecodeError(f"{what} is not valid CBOR: {exc}") from None


def _parse_protected(protected: bytes) -> bytes:
    header = _loads(protected, "protected header")
    if not isinstance(header, dict):
        raise ReportDecodeError("protected header must be a map")
    if HDR_CRIT in header:
        raise ReportDecodeError("critical header parameters are not supported")
    if header.get(HDR_ALG) != ALG_EDDSA:
        raise ReportDecodeError("algorithm must be EdDSA (-8)")
    if header.get(HDR_CONTENT_TYPE) != CONTENT_TYPE:
        raise ReportDecodeError(f"content type must be {CONTENT_TYPE}")
    kid = header.get(HDR_KID)
    if not isinstance(kid, bytes) or len(kid) != 32:
        raise ReportDecodeError("kid must be the 32-byte Ed25519 public key")
    return kid


def _get(m: Mapping[Any, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in m:
        raise ReportDecodeError(f"{where}.{key} is missing")
    value = m[key]
    # bool is an int subclass in Python; CBOR true/false must never pass for a number.
    if isinstance(value, bool) and kind is not bool:
        raise ReportDecodeError(f"{where}.{key} has the wrong type")
    if not isinstance(value, kind):
        raise ReportDecodeError(f"{where}.{key} has the wrong type")
    return value


def _uint(m: Mapping[Any, Any], key: str, where: str, maximum: int) -> int:
    value: int = _get(m, key, int, where)
    if not 0 <= value <= maximum:
        raise ReportDecodeError(f"{where}.{key} is out of range")
    return value


def _text(m: Mapping[Any, Any], key: str, where: str, max_bytes: int) -> str:
    value: str = _get(m, key, str, where)
    if len(value.encode("utf-8")) > max_bytes:
        raise ReportDecodeError(f"{where}.{key} is longer than {max_bytes} bytes")
    return value


def _address(m: Mapping[Any, Any], key: str) -> Address:
    raw: bytes = _get(m, key, bytes, "flow")
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ReportDecodeError(f"flow.{key} must be 4 or 16 bytes")


def _payload_from_map(m: Mapping[Any, Any]) -> Payload:
    version = _uint(m, "v", "payload", U32)
    if version != PAYLOAD_VERSION:
        raise ReportDecodeError(f"payload version {version} is not supported")
    kind = _text(m, "kind", "payload", MAX_KIND_BYTES)
    if not KIND_RE.fullmatch(kind):
        raise ReportDecodeError("payload.kind must be lowercase letters, digits and '-'")
    nonce: bytes = _get(m, "nonce", bytes, "payload")
    if len(nonce) != NONCE_BYTES:
        raise ReportDecodeError(f"payload.nonce must be {NONCE_BYTES} bytes")
    time = _uint(m, "time", "payload", U64)

    obs = _get(m, "observer", dict, "payload")
    contacts_raw = _get(obs, "contacts", list, "observer")
    if len(contacts_raw) > MAX_CONTACTS:
        raise ReportDecodeError(f"observer.contacts has more than {MAX_CONTACTS} entries")
    if not all(isinstance(c, str) for c in contacts_raw):
        raise ReportDecodeError("observer.contacts must be text strings")
    if sum(len(c.encode("utf-8")) for c in contacts_raw) > MAX_CONTACT_BYTES_TOTAL:
        raise ReportDecodeError("observer.contacts are too long")
    point = _text(obs, "point", "observer", MAX_POINT_BYTES) if "point" in obs else ""
    observer = Observer(contacts=tuple(contacts_raw), point=point)

    f = _get(m, "flow", dict, "payload")
    src, dst = _address(f, "src"), _address(f, "dst")
    if src.version != dst.version:
        raise ReportDecodeError("flow.src and flow.dst must be the same address family")
    first, last = _uint(f, "first", "flow", U64), _uint(f, "last", "flow", U64)
    flow = Flow(
        src=src,
        dst=dst,
        sport=_uint(f, "sport", "flow", 0xFFFF),
        dport=_uint(f, "dport", "flow", 0xFFFF),
        proto=_uint(f, "proto", "flow", 0xFF),
        packets=_uint(f, "packets", "flow", U64),
        bytes=_uint(f, "bytes", "flow", U64),
        first=first,
        last=last,
        tcp_flags=_uint(f, "tcp_flags", "flow", 0xFFFF),
        tos=_uint(f, "tos", "flow", 0xFF),
        src_as=_uint(f, "src_as", "flow", U32) if "src_as" in f else None,
        dst_as=_uint(f, "dst_as", "flow", U32) if "dst_as" in f else None,
    )

    s = _get(m, "sampling", dict, "payload")
    p: float = _get(s, "p", float, "sampling")
    if not 0.0 < p <= 1.0:
        raise ReportDecodeError("sampling.p must be in (0, 1]")
    provenance = _text(s, "provenance", "sampling", 16)
    if provenance not in PROVENANCES:
        raise ReportDecodeError(f"sampling.provenance must be one of {', '.join(PROVENANCES)}")
    sampling = Sampling(
        probability=p,
        format=_text(s, "format", "sampling", MAX_FORMAT_BYTES),
        interval=_uint(s, "interval", "sampling", U32),
        provenance=provenance,
    )
    if sampling.interval < 1:
        raise ReportDecodeError("sampling.interval must be at least 1")
    return Payload(
        kind=kind,
        nonce=nonce,
        time=time,
        observer=observer,
        flow=flow,
        sampling=sampling,
        version=version,
    )


def _check_payload(payload: Payload) -> None:
    """Refuse, before signing, what :func:`decode_unverified` would refuse after.

    Written out field by field (rather than decoding our own map) because it runs once per
    report signed; ``tests/fuzz/test_report_fuzz.py`` checks both agree on random payloads.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid report payload: {why}")

    def uint(value: object, maximum: int, name: str) -> None:
        if type(value) is not int or not 0 <= value <= maximum:
            raise bad(f"{name} must be an integer in 0..{maximum}")

    if payload.version != PAYLOAD_VERSION:
        raise bad(f"version must be {PAYLOAD_VERSION}")
    if len(payload.kind.encode()) > MAX_KIND_BYTES or not KIND_RE.fullmatch(payload.kind):
        raise bad("kind must be lowercase letters, digits and '-', at most 32 bytes")
    if type(payload.nonce) is not bytes or len(payload.nonce) != NONCE_BYTES:
        raise bad(f"nonce must be {NONCE_BYTES} bytes")
    uint(payload.time, U64, "time")
    obs = payload.observer
    if len(obs.contacts) > MAX_CONTACTS or not all(type(c) is str for c in obs.contacts):
        raise bad(f"observer.contacts must be at most {MAX_CONTACTS} strings")
    if sum(len(c.encode()) for c in obs.contacts) > MAX_CONTACT_BYTES_TOTAL:
        raise bad("observer.contacts are too long")
    if type(obs.point) is not str or len(obs.point.encode()) > MAX_POINT_BYTES:
        raise bad(f"observer.point must be text of at most {MAX_POINT_BYTES} bytes")
    fl = payload.flow
    if not isinstance(fl.src, ipaddress.IPv4Address | ipaddress.IPv6Address) or not isinstance(
        fl.dst, ipaddress.IPv4Address | ipaddress.IPv6Address
    ):
        raise bad("flow.src and flow.dst must be IP addresses")
    if fl.src.version != fl.dst.version:
        raise bad("flow.src and flow.dst must be the same address family")
    for name, value, maximum in (
        ("sport", fl.sport, 0xFFFF), ("dport", fl.dport, 0xFFFF), ("proto", fl.proto, 0xFF),
        ("packets", fl.packets, U64), ("bytes", fl.bytes, U64), ("first", fl.first, U64),
        ("last", fl.last, U64), ("tcp_flags", fl.tcp_flags, 0xFFFF), ("tos", fl.tos, 0xFF),
    ):  # fmt: skip
        uint(value, maximum, f"flow.{name}")
    for name, opt in (("src_as", fl.src_as), ("dst_as", fl.dst_as)):
        if opt is not None:
            uint(opt, U32, f"flow.{name}")
    sm = payload.sampling
    if type(sm.probability) not in (float, int) or not 0.0 < sm.probability <= 1.0:
        raise bad("sampling.p must be a float in (0, 1]")
    if type(sm.format) is not str or len(sm.format.encode()) > MAX_FORMAT_BYTES:
        raise bad(f"sampling.format must be text of at most {MAX_FORMAT_BYTES} bytes")
    if type(sm.interval) is not int or not 1 <= sm.interval <= U32:
        raise bad("sampling.interval must be an integer in 1..2**32-1")
    if sm.provenance not in PROVENANCES:
        raise bad(f"sampling.provenance must be one of {', '.join(PROVENANCES)}")


# ---------------------------------------------------------------------------------------------
# Rendering


def iso_ms(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC with millisecond precision."""
    try:
        t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def to_json(report: SignedReport, *, include_cose: bool = True) -> dict[str, Any]:
    """The JSON rendering for people and webhooks; derived from the payload, never signed."""
    p = report.payload
    fl = p.flow
    out: dict[str, Any] = {
        "id": report.report_id,
        "version": p.version,
        "kind": p.kind,
        "nonce": b64url(p.nonce),
        "time": iso_ms(p.time),
        "time_ms": p.time,
        "observer": {
            "key": base64.b64encode(report.observer_key).decode("ascii"),
            "fingerprint": key_fingerprint(report.observer_key),
            "contacts": list(p.observer.contacts),
            "point": p.observer.point,
        },
        "flow": {
            "src": str(fl.src),
            "dst": str(fl.dst),
            "sport": fl.sport,
            "dport": fl.dport,
            "proto": fl.proto,
            "packets": fl.packets,
            "bytes": fl.bytes,
            "first": iso_ms(fl.first),
            "last": iso_ms(fl.last),
            "first_ms": fl.first,
            "last_ms": fl.last,
            "tcp_flags": fl.tcp_flags,
            "tos": fl.tos,
            "src_as": fl.src_as,
            "dst_as": fl.dst_as,
        },
        "sampling": {
            "probability": p.sampling.probability,
            "format": p.sampling.format,
            "interval": p.sampling.interval,
            "provenance": p.sampling.provenance,
        },
    }
    if include_cose:
        out["cose"] = b64url(report.cose)
    return out
