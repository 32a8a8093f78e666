"""Keys and contacts published in DNS: the ``_overflowd`` TXT record (sans-IO).

The record uses DKIM-style ``tag=value`` pairs separated by ``;`` (docs/protocol.md, "DNS
record"). Unknown tags are ignored so the format can grow; an empty ``p=`` revokes a key.
It also holds the pure parts of looking records up: which names to ask for an address (the
walk-up from the longest reverse-zone prefix), abuse-zone names and answers, and the cache
policy (:class:`TxtCache`, clock injected). The trust model is in :mod:`overflowd.trust`; the
queries themselves in :mod:`overflowd.services.dns`. This module must never import dnspython,
trio or sockets, nor read a clock: a unit test walks its imports.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from overflowd.trust import ContinuityPolicy, PinnedKey

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


def _txt_text(strings: list[bytes] | bytes | str, fmt: str) -> str:
    """A TXT record's character-strings joined, bounded, and ASCII (or a DecodeError)."""
    if isinstance(strings, str):
        raw = strings.encode("utf-8", "surrogateescape")
    elif isinstance(strings, bytes):
        raw = strings
    else:
        raw = b"".join(strings)
    if len(raw) > MAX_RECORD_BYTES:
        raise DecodeError(f"record longer than {MAX_RECORD_BYTES} bytes", fmt=fmt)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError("record is not ASCII", fmt=fmt, offset=exc.start) from None


def parse_record(strings: list[bytes] | bytes | str) -> KeyRecord:
    """Parse a record (its character-strings are joined first); DecodeError if it is not ours."""
    text = _txt_text(strings, "dns-txt")
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
    # protocol.md §5: v= is required and first (as DKIM's v=, RFC 6376 §3.6.1), so a TXT
    # string that merely mentions v=OVF1 somewhere (an SPF-like record, a site-verification
    # blob with our tags pasted in) is never taken for a key publication.
    if next(iter(tags), None) != "v" or tags["v"] != RECORD_VERSION:
        raise DecodeError(
            f"not an {RECORD_VERSION} record (v= must be the first tag)", fmt="dns-txt"
        )
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


# ---------------------------------------------------------------------------------------------
# Where to look: reverse names, record names, abuse-zone names
#
# An address's record is looked for at the reverse-zone name of the address itself, then of
# ever shorter prefixes, and the first name that holds an OVF1 record answers. The prefixes are
# those at which reverse zones are delegated in practice, so a network publishes one record at
# the zone apex it already runs and it covers every address below:
#
# * IPv4: /32, /24, /16, /8 (RFC 1035 §3.5: one label per octet; classless RFC 2317
#   delegations below /24 are CNAME tricks that a /32 name follows anyway);
# * IPv6: /128, /64, /48, /32 (RFC 3596 §2.5: one label per nibble). /128 lets a single host
#   publish its own key; /64 is a LAN, /48 a site, /32 an LIR allocation. Other nibble
#   boundaries (/56, /40...) are not asked: each name costs a query, and the walk must stay
#   within the per-lookup query budget.

IPV4_PREFIXES: tuple[int, ...] = (32, 24, 16, 8)
IPV6_PREFIXES: tuple[int, ...] = (128, 64, 48, 32)
#: A DNS name is at most 253 characters in text (RFC 1035 §2.3.4: 255 octets on the wire).
MAX_NAME_CHARS = 253
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def as_address(addr: str | Address) -> Address:
    """An address object from text or an address (ValueError if it is neither)."""
    parsed = (
        addr
        if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)
        else ipaddress.ip_address(addr.strip())
    )
    # An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 host: look it up in in-addr.arpa,
    # whether it came as text or as an address object (a v6 socket's peer, an IPFIX v6 field).
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def reverse_name(addr: str | Address, prefix_len: int | None = None) -> str:
    """The reverse-zone name (no trailing dot) of ``addr`` truncated to ``prefix_len`` bits.

    IPv4 prefixes must be multiples of 8, IPv6 prefixes multiples of 4 (whole labels).
    """
    a = as_address(addr)
    if prefix_len is None:
        prefix_len = a.max_prefixlen
    if isinstance(a, ipaddress.IPv4Address):
        if prefix_len % 8 or not 0 < prefix_len <= 32:
            raise ValueError(f"IPv4 reverse names exist for /8, /16, /24, /32, not /{prefix_len}")
        octets = str(a).split(".")[: prefix_len // 8]
        return ".".join(reversed(octets)) + ".in-addr.arpa"
    if prefix_len % 4 or not 0 < prefix_len <= 128:
        raise ValueError(f"IPv6 reverse names exist at nibble boundaries, not /{prefix_len}")
    nibbles = a.packed.hex()[: prefix_len // 4]
    return ".".join(reversed(nibbles)) + ".ip6.arpa"


def walk_prefixes(addr: str | Address) -> tuple[int, ...]:
    """The prefix lengths asked for ``addr``, longest first."""
    return IPV4_PREFIXES if as_address(addr).version == 4 else IPV6_PREFIXES


def address_record_names(addr: str | Address) -> list[tuple[int, str]]:
    """``(prefix length, _overflowd name)`` for each step of the walk-up, longest first."""
    return [(plen, f"{RECORD_LABEL}.{reverse_name(addr, plen)}") for plen in walk_prefixes(addr)]


def check_domain(domain: str) -> str:
    """A domain name in canonical text form (lower case, no trailing dot); ValueError if not.

    Internationalised names must be given in their A-label (``xn--``) form: the lookup never
    guesses an IDNA mapping for a name that came from outside.
    """
    name = domain.strip().rstrip(".").lower()
    if not name or len(name) > MAX_NAME_CHARS - len(RECORD_LABEL) - 1:
        raise ValueError(f"'{domain[:80]}' is not a domain name (empty or too long)")
    if not all(_LABEL_RE.match(label) for label in name.split(".")):
        raise ValueError(
            f"'{domain[:80]}' is not a domain name (labels of a-z, 0-9, '-', 1 to 63 long)"
        )
    return name


def domain_record_name(domain: str) -> str:
    """``_overflowd.<domain>``."""
    return f"{RECORD_LABEL}.{check_domain(domain)}"


def abuse_zone_name(addr: str | Address, zone: str) -> str:
    """``<reversed-ip>.<zone>``: the Abusix-style abuse-contact name of one address.

    IPv4 reverses the four octets (``1.2.0.192.<zone>``), IPv6 the 32 nibbles, as in the
    reverse zones; the zone's server does any walk to covering prefixes itself.
    """
    rev = reverse_name(addr)
    rev = rev.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
    return f"{rev}.{check_domain(zone)}"


# ---------------------------------------------------------------------------------------------
# Abuse-zone answers
#
# An abuse-contacts zone answers a TXT whose strings are e-mail addresses (the Abusix
# convention: "abuse@example.net"), sometimes several separated by ',' or white space. We accept
# bare addresses (returned as mailto: URIs) and URIs, and refuse anything else as a whole: a
# record we half understand is not a contact to send abuse reports to.

#: Contacts taken from one abuse-zone answer; more are dropped (and counted by the caller).
MAX_ABUSE_CONTACTS = 8
_EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}$")


def parse_abuse_txt(strings: list[bytes] | bytes | str) -> tuple[str, ...]:
    """Contact URIs from one abuse-zone TXT record; DecodeError if it is not a contact list."""
    text = _txt_text(strings, "abuse-txt")
    contacts: list[str] = []
    for item in re.split(r"[\s,;]+", text):
        if not item:
            continue
        if _EMAIL_RE.match(item) and ".." not in item:
            uri = f"mailto:{item}"
        elif _URI_RE.match(item):
            uri = item
        else:
            raise DecodeError(
                f"'{item[:40]}' is neither an e-mail address nor a URI", fmt="abuse-txt"
            )
        if uri not in contacts:
            contacts.append(uri)
    if not contacts:
        raise DecodeError("no contact in record", fmt="abuse-txt")
    return tuple(contacts[:MAX_ABUSE_CONTACTS])


# ---------------------------------------------------------------------------------------------
# Cache policy
#
# What one TXT question came back with, kept for its TTL. Answers and negative answers are kept
# in two separately bounded LRU maps, so a flood of lookups for random names (each an NXDOMAIN)
# can never push out the positive answers that reports are being delivered with.
#
# * Positive TTLs are the record's TTL, capped (a record says 1 week; we ask again sooner).
# * Negative TTLs follow RFC 2308 §5 (the SOA's TTL or MINIMUM, whichever is lower) but are
#   capped at minutes: a network that publishes its first record should not wait the SOA's
#   hours before reports reach it. Without an SOA a default applies.
# * Failures (timeouts, SERVFAIL, refusals) are cached briefly, so a dead resolver costs one
#   timeout per name per failure TTL instead of one per report (RFC 2308 §7.1 allows up to 5
#   minutes; we default to 30 s).
#
# Entries are counted in bytes as well as in number, because an answer's size is the zone
# owner's choice: one name may answer 64 KiB of TXT (a TCP message's limit), so 4096 entries
# alone would allow a quarter gigabyte. Each entry's footprint is estimated from what it holds
# (:func:`entry_footprint`, an upper bound checked against tracemalloc by a unit test) and
# each table is evicted, least recently used first, until both its count and its bytes fit.
# An answer whose footprint exceeds the per-entry cap is not kept: it is cached as a failure
# ("answer too large"), counted, so the zone that sent it is not asked again at every report.

#: bytes one cached entry costs beyond its strings: the CachedTxt object and its __dict__,
#: the key string's header, the OrderedDict slot and link, the records tuple (measured on
#: CPython 3.11 with tracemalloc, rounded up; see tests/unit/test_registry_lookup_policy.py)
ENTRY_OVERHEAD_BYTES = 320
#: bytes one record costs beyond its length: the bytes object's header and the tuple slot
RECORD_OVERHEAD_BYTES = 64
#: a failure's reason is kept to one line of this many characters
MAX_REASON_CHARS = 300


def entry_footprint(name: str, records: tuple[bytes, ...] = (), reason: str = "") -> int:
    """Bytes a cache entry holding these is estimated to cost (an upper bound)."""
    return (
        ENTRY_OVERHEAD_BYTES
        + len(name)
        + len(reason)
        + sum(len(r) + RECORD_OVERHEAD_BYTES for r in records)
    )


class Outcome(enum.Enum):
    ANSWER = "answer"  # the name has TXT records (maybe none of them ours)
    NXDOMAIN = "nxdomain"  # the name does not exist
    NODATA = "nodata"  # the name exists, without TXT
    FAILURE = "failure"  # no usable answer: timeout, SERVFAIL, REFUSED, network error, too large


KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class CachePolicy:
    """Bounds of the TXT cache. Times in seconds, sizes in bytes as :func:`entry_footprint`."""

    #: answers kept (names with TXT records)
    max_positive: int = 4096
    #: NXDOMAIN, NODATA and failures kept
    max_negative: int = 4096
    #: bytes of answers kept: 4096 typical answers (one or two OVF1 records, ~1 KiB each)
    #: fit four times over, while 4096 answers of 64 KiB (256 MiB) cannot
    max_positive_bytes: int = 16 * MIB
    #: bytes of negative entries kept; each is small (a name, a reason of at most
    #: MAX_REASON_CHARS), so this only binds when names are long
    max_negative_bytes: int = 4 * MIB
    #: an answer costing more than this is cached as a failure instead: eight OVF1 records
    #: (rotation) of ~500 bytes plus foreign TXT fit, a zone's 64 KiB of junk does not
    max_entry_bytes: int = 16 * KIB
    #: longest an answer is kept, whatever its TTL says (1 day)
    positive_ttl_cap_s: float = 24 * 3600.0
    #: longest an NXDOMAIN or NODATA is kept, whatever the SOA says (5 minutes)
    negative_ttl_cap_s: float = 5 * 60.0
    #: negative TTL when the answer carries no SOA (1 minute)
    negative_ttl_default_s: float = 60.0
    #: how long a failure is remembered (30 seconds)
    failure_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "max_positive",
            "max_negative",
            "max_positive_bytes",
            "max_negative_bytes",
            "max_entry_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"cache size {name} must not be negative")
        for name in (
            "positive_ttl_cap_s",
            "negative_ttl_cap_s",
            "negative_ttl_default_s",
            "failure_ttl_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True)
class CachedTxt:
    """What a TXT question for ``name`` came back with, and until when (clock of the cache)."""

    name: str
    outcome: Outcome
    #: each TXT record's character-strings joined (empty unless ANSWER)
    records: tuple[bytes, ...] = ()
    expires_at: float = 0.0
    #: why, for failures (one line)
    reason: str = ""

    @property
    def footprint(self) -> int:
        return entry_footprint(self.name, self.records, self.reason)


@dataclass(frozen=True)
class CacheStatistics:
    positive_entries: int
    negative_entries: int
    #: estimated bytes held (entry_footprint), answers and negative entries
    positive_bytes: int
    negative_bytes: int
    hits: int
    misses: int
    expired: int
    evicted: int
    #: answers over max_entry_bytes, cached as failures instead
    too_large: int


class _Table:
    """One LRU map of entries with its count and byte bounds."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, CachedTxt] = OrderedDict()
        self.bytes = 0

    def pop(self, key: str) -> CachedTxt | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.footprint
        return entry

    def add(self, entry: CachedTxt) -> int:
        """Insert ``entry`` (whose key is not present); the number of entries evicted."""
        self.entries[entry.name] = entry
        self.bytes += entry.footprint
        evicted = 0
        while self.entries and (
            len(self.entries) > self.max_entries or self.bytes > self.max_bytes
        ):
            _key, old = self.entries.popitem(last=False)
            self.bytes -= old.footprint
            evicted += 1
        return evicted

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class TxtCache:
    """Positive and negative TXT answers, bounded in entries, in bytes and by TTL.

    ``now`` is injected. Names are compared case-insensitively without a trailing dot. Not
    thread-safe; one per resolver, used from one trio task at a time.
    """

    def __init__(self, policy: CachePolicy | None = None) -> None:
        self.policy = policy or CachePolicy()
        self._positive = _Table(self.policy.max_positive, self.policy.max_positive_bytes)
        self._negative = _Table(self.policy.max_negative, self.policy.max_negative_bytes)
        self._hits = self._misses = self._expired = self._evicted = self._too_large = 0

    @staticmethod
    def _key(name: str) -> str:
        return name.rstrip(".").lower()

    def get(self, name: str, now: float) -> CachedTxt | None:
        key = self._key(name)
        for table in (self._positive, self._negative):
            entry = table.entries.get(key)
            if entry is None:
                continue
            if now >= entry.expires_at:
                table.pop(key)
                self._expired += 1
                break
            table.entries.move_to_end(key)
            self._hits += 1
            return entry
        self._misses += 1
        return None

    def put_answer(
        self, name: str, records: tuple[bytes, ...], ttl_s: float, now: float
    ) -> CachedTxt:
        """Cache an answer; one over ``max_entry_bytes`` is cached (and returned) as a failure."""
        key = self._key(name)
        size = entry_footprint(key, records)
        if size > self.policy.max_entry_bytes:
            self._too_large += 1
            return self.put_failure(
                name,
                f"answer of {len(records)} TXT records, ~{size} bytes, is larger than "
                f"{self.policy.max_entry_bytes} bytes",
                now,
            )
        ttl = min(max(ttl_s, 0.0), self.policy.positive_ttl_cap_s)
        entry = CachedTxt(key, Outcome.ANSWER, records, now + ttl)
        self._store(entry, ttl, positive=True)
        return entry

    def put_negative(
        self, name: str, outcome: Outcome, soa_ttl_s: float | None, now: float
    ) -> CachedTxt:
        """NXDOMAIN or NODATA; ``soa_ttl_s`` is min(SOA TTL, SOA MINIMUM), None without SOA."""
        if outcome not in (Outcome.NXDOMAIN, Outcome.NODATA):
            raise ValueError(f"{outcome} is not a negative answer")
        ttl = self.policy.negative_ttl_default_s if soa_ttl_s is None else max(soa_ttl_s, 0.0)
        ttl = min(ttl, self.policy.negative_ttl_cap_s)
        entry = CachedTxt(self._key(name), outcome, (), now + ttl)
        self._store(entry, ttl, positive=False)
        return entry

    def put_failure(self, name: str, reason: str, now: float) -> CachedTxt:
        ttl = self.policy.failure_ttl_s
        reason = reason[:MAX_REASON_CHARS]
        entry = CachedTxt(self._key(name), Outcome.FAILURE, (), now + ttl, reason)
        self._store(entry, ttl, positive=False)
        return entry

    def _store(self, entry: CachedTxt, ttl: float, *, positive: bool) -> None:
        # An answer replaces a negative entry for the same name and vice versa.
        self._positive.pop(entry.name)
        self._negative.pop(entry.name)
        table = self._positive if positive else self._negative
        if ttl <= 0 or table.max_entries == 0:
            return  # TTL 0: use once, never cache (RFC 1035 §3.2.1)
        if entry.footprint > table.max_bytes:
            return  # could never fit: returned to the caller, not kept
        self._evicted += table.add(entry)

    def clear(self) -> None:
        self._positive.clear()
        self._negative.clear()

    def __len__(self) -> int:
        return len(self._positive.entries) + len(self._negative.entries)

    @property
    def bytes(self) -> int:
        """Estimated bytes held, both tables."""
        return self._positive.bytes + self._negative.bytes

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            positive_entries=len(self._positive.entries),
            negative_entries=len(self._negative.entries),
            positive_bytes=self._positive.bytes,
            negative_bytes=self._negative.bytes,
            hits=self._hits,
            misses=self._misses,
            expired=self._expired,
            evicted=self._evicted,
            too_large=self._too_large,
        )


# ---------------------------------------------------------------------------------------------
# What a lookup found


class Found(NamedTuple):
    """One record found: the DNS name that answered and what it said."""

    name: str
    record: KeyRecord


#: OVF1 records read at one name; more are ignored and counted (rotation needs two or three).
MAX_RECORDS_PER_NAME = 8


@dataclass(frozen=True)
class ParsedAnswer:
    """The OVF1 records among one name's TXT records, and how many were ignored and why."""

    records: tuple[KeyRecord, ...]
    #: TXT records that are not OVF1 at all (an SPF or site-verification string): not counted
    #: as malformed, they simply are not ours
    foreign: int = 0
    #: records that say v=OVF1 but do not parse
    malformed: int = 0
    #: records longer than MAX_RECORD_BYTES
    oversized: int = 0
    #: OVF1 records beyond MAX_RECORDS_PER_NAME
    excess: int = 0


def parse_answer(records: tuple[bytes, ...] | list[bytes]) -> ParsedAnswer:
    """Parse every TXT record at one name (each one's strings already joined); never raises.

    Several OVF1 records at one name mean key rotation: each key is valid. A revocation
    (``p=`` empty) is returned like any record; :func:`valid_keys` leaves it out.
    """
    parsed: list[KeyRecord] = []
    foreign = malformed = oversized = excess = 0
    for raw in records:
        if len(raw) > MAX_RECORD_BYTES:
            oversized += 1
            continue
        try:
            record = parse_record(raw)
        except DecodeError:
            # claims to be ours (a v=OVF tag anywhere, first or not) but does not parse
            if re.search(rb"(?:^|;)\s*v\s*=\s*OVF", raw):
                malformed += 1
            else:
                foreign += 1
            continue
        if len(parsed) >= MAX_RECORDS_PER_NAME:
            excess += 1
            continue
        if record not in parsed:
            parsed.append(record)
    return ParsedAnswer(tuple(parsed), foreign, malformed, oversized, excess)


def valid_keys(found: list[Found] | tuple[Found, ...]) -> list[bytes]:
    """The public keys a lookup found (revocations left out), in the order found."""
    keys: list[bytes] = []
    for item in found:
        key = item.record.public_key
        if key is not None and key not in keys:
            keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------------
# Settings

SECONDS = 1.0


@dataclass(frozen=True)
class RegistrySettings:
    """``[registry]`` in overflowd.toml. Times in seconds; defaults are what an operator gets.

    Plain data, here rather than in :mod:`overflowd.services.dns` (which re-exports it) so that
    reading the config does not import trio and dnspython (a quarter second of every CLI start).
    """

    #: resolvers as "ADDR", "ADDR:PORT" or "[V6ADDR]:PORT"; empty: those of /etc/resolv.conf
    nameservers: tuple[str, ...] = ()
    #: longest one question may take, all retries included
    timeout_s: float = 2 * SECONDS
    #: questions one lookup may send (cache hits are free)
    max_queries: int = 8
    #: questions outstanding at once, all lookups together
    max_concurrent_queries: int = 64
    #: positive answers cached
    cache_entries: int = 4096
    #: NXDOMAIN, NODATA and failures cached
    negative_cache_entries: int = 4096
    #: estimated bytes of answers cached (an answer's size is the zone owner's choice)
    cache_max_bytes: int = 16 * MIB
    #: estimated bytes of NXDOMAIN, NODATA and failures cached
    negative_cache_max_bytes: int = 4 * MIB
    #: an answer larger than this is not kept; it is cached as a failure (counted too_large)
    cache_entry_max_bytes: int = 16 * KIB
    #: an answer is asked again after this long at most, whatever its TTL
    positive_ttl_cap_s: float = 24 * 3600 * SECONDS
    #: NXDOMAIN / NODATA are cached at most this long, whatever the SOA says
    negative_ttl_cap_s: float = 5 * 60 * SECONDS
    #: a failure (timeout, SERVFAIL) is remembered this long
    failure_ttl_s: float = 30 * SECONDS
    #: zones of the <reversed-ip>.<zone> TXT form, asked in order for abuse contacts
    abuse_zones: tuple[str, ...] = ()
    #: keys the operator vouches for: "BASE64KEY" or "LABEL=BASE64KEY"
    pinned: tuple[str, ...] = ()
    #: continuity: same key and contacts over at least this many days ...
    continuity_min_days: float = 7.0
    #: ... from at least this many /24 or /48 networks ...
    continuity_min_networks: int = 2
    #: ... in at least this many reports
    continuity_min_reports: int = 3

    def __post_init__(self) -> None:
        # ValueError here becomes a ConfigError naming the file and section (config._build).
        for ns in self.nameservers:
            parse_nameserver(ns)
        if not 0 < self.timeout_s <= 60:
            raise ValueError("registry.timeout_s must be in (0, 60]")
        if not 1 <= self.max_queries <= 64:
            raise ValueError("registry.max_queries must be between 1 and 64")
        if not 1 <= self.max_concurrent_queries <= 4096:
            raise ValueError("registry.max_concurrent_queries must be between 1 and 4096")
        if self.cache_max_bytes < 0 or self.negative_cache_max_bytes < 0:
            raise ValueError("registry.cache_max_bytes and negative_cache_max_bytes must be >= 0")
        if not 1024 <= self.cache_entry_max_bytes <= 1 * MIB:
            raise ValueError("registry.cache_entry_max_bytes must be between 1024 and 1048576")
        for zone in self.abuse_zones:
            check_domain(zone)
        for pin in self.pinned:
            self._parse_pinned(pin)
        self.cache_policy()
        self.continuity_policy()

    def cache_policy(self) -> CachePolicy:
        return CachePolicy(
            max_positive=self.cache_entries,
            max_negative=self.negative_cache_entries,
            max_positive_bytes=self.cache_max_bytes,
            max_negative_bytes=self.negative_cache_max_bytes,
            max_entry_bytes=self.cache_entry_max_bytes,
            positive_ttl_cap_s=self.positive_ttl_cap_s,
            negative_ttl_cap_s=self.negative_ttl_cap_s,
            negative_ttl_default_s=min(60.0, self.negative_ttl_cap_s),
            failure_ttl_s=self.failure_ttl_s,
        )

    def continuity_policy(self) -> ContinuityPolicy:
        from overflowd.trust import ContinuityPolicy  # trust imports this module

        return ContinuityPolicy(
            min_days=self.continuity_min_days,
            min_networks=self.continuity_min_networks,
            min_reports=self.continuity_min_reports,
        )

    def pinned_keys(self) -> tuple[PinnedKey, ...]:
        return tuple(self._parse_pinned(p) for p in self.pinned)

    @staticmethod
    def _parse_pinned(text: str) -> PinnedKey:
        from overflowd.trust import parse_pinned  # trust imports this module

        return parse_pinned(text)


def parse_nameserver(text: str) -> tuple[str, int]:
    """ "ADDR", "ADDR:PORT", "[V6]:PORT" or a bare IPv6 address into (address, port)."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {text!r} is not ADDR, ADDR:PORT or [V6ADDR]:PORT")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = _port(rest, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"nameserver {text!r}: {host!r} is not an IP address (ADDR, ADDR:PORT, [V6ADDR]:PORT)"
        ) from None
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"nameserver {whole!r}: port must be 1 to 65535")
    return int(text)
