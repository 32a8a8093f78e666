"""ratelock.audit, pure: the chain and signed heads, with the real Ed25519 checker."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd.identity import NodeIdentity, check_signature
from ratelock import audit

NODE = NodeIdentity(seed=b"\x03" * 32)


def _chain(n: int) -> list[audit.Entry]:
    out, prev = [], audit.GENESIS
    for seq in range(1, n + 1):
        e = audit.make_entry(prev, seq, 1000 + seq, "app", "verify", f"u{seq % 3}", "wrong")
        out.append(e)
        prev = e.hash
    return out


def _head(e: audit.Entry, key: NodeIdentity = NODE) -> audit.Head:
    msg = audit.head_message(e.seq, e.hash, 5000)
    return audit.Head(e.seq, e.hash, 5000, key.public_key, key.sign(msg))


def test_intact_chain_with_heads() -> None:
    entries = _chain(10)
    r = audit.verify_chain(entries, [_head(entries[4]), _head(entries[9])], check_signature)
    assert r.ok and r.entries == 10 and r.signed_seq == 10


def test_head_from_a_key_that_is_not_the_nodes() -> None:
    entries = _chain(3)
    other = NodeIdentity(seed=b"\x04" * 32)
    r = audit.verify_chain(
        entries, [_head(entries[2], other)], check_signature, trusted_keys=[NODE.public_key]
    )
    assert not r.ok and "not the node's" in r.problems[0]


def test_the_head_message_is_never_a_cose_structure() -> None:
    # COSE signs a CBOR array ("Signature1", ...): first byte 0x84; ours is a text string
    assert audit.head_message(1, b"\x00" * 32, 0)[0] >> 5 == 3


@settings(max_examples=100)
@given(
    n=st.integers(2, 12),
    data=st.data(),
)
def test_any_single_edit_delete_or_swap_is_caught(n: int, data: st.DataObject) -> None:
    entries = _chain(n)
    heads = [_head(entries[-1])]
    kind = data.draw(st.sampled_from(["edit", "delete", "swap"]))
    i = data.draw(st.integers(0, n - 1))
    tampered = list(entries)
    if kind == "edit":
        tampered[i] = dataclasses.replace(entries[i], outcome="ok")
    elif kind == "delete":
        del tampered[i]
    else:
        j = (i + 1) % n
        tampered[i], tampered[j] = entries[j], entries[i]
    assert not audit.verify_chain(tampered, heads, check_signature).ok


def test_refusal_tally_counts_per_key_and_bounds_distinct_keys() -> None:
    """Refusals before the vault: one row per (client, op, reason) per window, at most
    max_keys of them plus one overflow row, whatever the flood."""
    tally = audit.RefusalTally(max_keys=3)
    for _ in range(1000):
        tally.add("", "verify", "bad_token")
    tally.add("app", "put", "too_large")
    tally.add("app", "put", "too_large")
    tally.add("app", "get", "busy")
    for i in range(50):  # distinct keys past the bound (clients the vault named)
        tally.add(f"client-{i}", "verify", "bad_body")
    assert len(tally) == 4 and tally.overflowed == 50
    rows = tally.take()
    assert rows == sorted([
        (audit.ANONYMOUS, "verify", "bad_token", "refused:1000"),
        ("app", "put", "too_large", "refused:2"),
        ("app", "get", "busy", "refused:1"),
        (*audit.OVERFLOW_KEY, "refused:50"),
    ])
    assert tally.take() == [] and len(tally) == 0  # the next window starts empty
