"""The audit log's hash chain and signed heads: the arithmetic and the check, no database.

Every vault request appends one entry in the same transaction as its charge (ratelock/vault.py);
each entry's hash covers the previous entry's hash and the entry's own fields, so editing,
reordering or deleting a row breaks the chain from there on. A chain alone does not show a
truncated tail (drop the last rows and it still links), so the vault signs the head (sequence
number and hash) with the node identity every ``audit_sign_every_entries`` entries and when the
server asks; :func:`verify_chain` refuses a log shorter than its last signed head.

The signed message starts with ``ratelock audit head v1\\0``: a text string to a CBOR reader,
so it can never be the ``Signature1`` array a COSE report or verdict signs (domain
separation, DESIGN.md "Identity"). Sans-IO: signature checking is injected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import cbor2

GENESIS = b"\x00" * 32
_ENTRY_DOMAIN = b"ratelock audit entry v1\x00"
_HEAD_DOMAIN = b"ratelock audit head v1\x00"

#: ``check(public_key, message, signature)`` raises on a bad signature
Checker = Callable[[bytes, bytes, bytes], None]


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit row. ``subject`` is the user or record key; ``outcome`` what was decided."""

    seq: int
    time_ms: int
    client: str
    op: str
    subject: str
    outcome: str
    prev: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class Head:
    """A signed audit head."""

    seq: int
    hash: bytes
    time_ms: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify_chain` found. ``ok`` iff ``problems`` is empty."""

    entries: int
    last_seq: int
    signed_seq: int
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def entry_hash(
    prev: bytes, seq: int, time_ms: int, client: str, op: str, subject: str, outcome: str
) -> bytes:
    body = cbor2.dumps([seq, time_ms, client, op, subject, outcome], canonical=True)
    return hashlib.sha256(_ENTRY_DOMAIN + prev + body).digest()


def make_entry(
    prev: bytes, seq: int, time_ms: int, client: str, op: str, subject: str, outcome: str
) -> Entry:
    h = entry_hash(prev, seq, time_ms, client, op, subject, outcome)
    return Entry(seq, time_ms, client, op, subject, outcome, prev, h)


def head_message(seq: int, hash_: bytes, time_ms: int) -> bytes:
    return _HEAD_DOMAIN + cbor2.dumps([seq, hash_, time_ms], canonical=True)


def verify_chain(
    entries: Iterable[Entry],
    heads: Sequence[Head],
    check: Checker,
    *,
    trusted_keys: Sequence[bytes] | None = None,
    retired_keys: Sequence[bytes] = (),
    max_problems: int = 20,
) -> AuditReport:
    """Walk the chain from the first entry; report each break (at most ``max_problems``).

    ``trusted_keys``: the public keys a head may be signed with (the node's); None trusts the
    key each head names, which still catches every edit made without the node key.
    ``retired_keys`` (among the trusted: the key a rotation kept as previous) may only sign
    heads before the first head of a key not retired: once the new key signs, the old one,
    perhaps leaked, vouches for nothing later.
    """
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < max_problems:
            problems.append(text)

    prev = GENESIS
    expected_seq = 1
    count = 0
    # only the entries a head names: the log grows for ever, the heads by one per hundreds
    wanted = {h.seq for h in heads}
    by_seq: dict[int, bytes] = {}
    for e in entries:
        count += 1
        if e.seq != expected_seq:
            problem(f"entry {e.seq}: expected entry {expected_seq} (rows deleted or reordered)")
        if e.prev != prev:
            problem(f"entry {e.seq}: does not link to the entry before it")
        if entry_hash(e.prev, e.seq, e.time_ms, e.client, e.op, e.subject, e.outcome) != e.hash:
            problem(f"entry {e.seq}: contents do not match its hash (row edited)")
        if e.seq in wanted:
            by_seq[e.seq] = e.hash
        prev = e.hash
        expected_seq = e.seq + 1
    last_seq = expected_seq - 1
    signed = 0
    first_current = min(
        (
            h.seq for h in heads
            if h.public_key not in retired_keys
            and (trusted_keys is None or h.public_key in trusted_keys)
        ),
        default=None,
    )
    for h in heads:
        if trusted_keys is not None and h.public_key not in trusted_keys:
            problem(f"head {h.seq}: signed by a key that is not the node's")
            continue
        if h.public_key in retired_keys and first_current is not None and h.seq > first_current:
            problem(
                f"head {h.seq}: signed by the node's previous key after its current key "
                f"signed head {first_current}"
            )
            continue
        try:
            check(h.public_key, head_message(h.seq, h.hash, h.time_ms), h.signature)
        except Exception:  # the injected checker's own error type: any failure is a break
            problem(f"head {h.seq}: signature does not verify")
            continue
        if h.seq > last_seq:
            problem(f"head {h.seq}: the log ends at entry {last_seq} (tail truncated)")
        elif by_seq.get(h.seq) != h.hash:
            problem(f"head {h.seq}: entry {h.seq} is not the one that was signed")
        signed = max(signed, h.seq)
    return AuditReport(count, last_seq, signed, tuple(problems))


#: the audit "client" of a refusal whose token named no client
ANONYMOUS = "-anonymous"
#: the key every refusal beyond ``max_keys`` distinct ones in a window is counted under
OVERFLOW_KEY = (ANONYMOUS, "-overflow", "-overflow")


class RefusalTally:
    """Requests refused before the vault, counted per (client, op, reason) per window. Sans-IO.

    A refusal costs the daemon next to nothing, so a flood of bad tokens must not cost one
    audit row (a transaction and a fsync) each: the server counts them here and writes one row
    per key per window (:meth:`take`, ``outcome`` ``refused:N``). At most ``max_keys`` distinct
    keys per window; every refusal past that is counted under :data:`OVERFLOW_KEY`, so the
    memory and the rows of one window are bounded whatever the flood. Keys hold no attacker's
    bytes: the client name is the vault's (an authenticated token) or :data:`ANONYMOUS`, op and
    reason come from fixed sets.
    """

    def __init__(self, max_keys: int = 256) -> None:
        self.max_keys = max_keys
        self._counts: dict[tuple[str, str, str], int] = {}
        self.overflowed = 0

    def add(self, client: str, op: str, reason: str) -> None:
        key = (client or ANONYMOUS, op, reason)
        if key not in self._counts and len(self._counts) >= self.max_keys:
            key = OVERFLOW_KEY
            self.overflowed += 1
        self._counts[key] = self._counts.get(key, 0) + 1

    def __len__(self) -> int:
        return len(self._counts)

    def take(self) -> list[tuple[str, str, str, str]]:
        """This window's rows as (client, op, subject, outcome); the tally starts again."""
        counts, self._counts = self._counts, {}
        return [(c, op, reason, f"refused:{n}") for (c, op, reason), n in sorted(counts.items())]
