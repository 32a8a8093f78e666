"""The _overflowd TXT record: what we print parses back to the same key and contacts."""

from __future__ import annotations

import pytest

from overflowd.errors import DecodeError
from overflowd.identity import NodeIdentity
from overflowd.registry import format_record, parse_record, split_txt, zone_line


def test_record_round_trips() -> None:
    key = NodeIdentity.generate().public_key
    text = format_record(
        key, ["mailto:abuse@example.net", "tel:+1-555-0100"], "https://example.net/hook", 10
    )
    rec = parse_record(text)
    assert rec.public_key == key
    assert rec.contacts == ("mailto:abuse@example.net", "tel:+1-555-0100")
    assert rec.webhook_url == "https://example.net/hook"
    assert rec.boost == 10


def test_long_records_split_into_255_byte_strings_and_join_back() -> None:
    key = NodeIdentity.generate().public_key
    contacts = [f"https://example.net/{'x' * 60}/{i}" for i in range(4)]
    text = format_record(key, contacts)
    strings = split_txt(text)
    assert len(strings) > 1 and all(len(s) <= 255 for s in strings)
    assert parse_record([s.encode() for s in strings]).contacts == tuple(contacts)
    assert zone_line(text, "example.net").startswith('_overflowd.example.net. 3600 IN TXT "v=OVF1;')


def test_empty_p_revokes_and_unknown_tags_are_ignored() -> None:
    rec = parse_record("v=OVF1; k=ed25519; p=; zz=future")
    assert rec.public_key is None


def test_v_first_after_white_space_and_folding_is_accepted() -> None:
    rec = parse_record(
        [b"  v = OVF1 ;k=ed25519;", b" p=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="]
    )
    assert rec.public_key == bytes([1]) * 32


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=DKIM1; p=AAAA",
        "v=OVF1; k=rsa; p=AAAA",
        "v=OVF1",
        "v=OVF1; p=!!!",
        "v=OVF1; p=AAAA",
        "v=OVF1; p=; p=",
        "v=OVF1; p=; garbage",
        "v=OVF1; p=; r=lots",
        "v=OVF1; p=; c=not a uri",
        b"v=OVF1; p=\xff",
        "v=OVF1; p=; " + "x=1; " * 1000,
        # protocol.md §5: v= is required and first
        "k=ed25519; v=OVF1; p=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        "p=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=; v=OVF1",
        "zz=1; v=OVF1; p=",
    ],
)
def test_malformed_records_raise_decode_error(text: str | bytes) -> None:
    with pytest.raises(DecodeError):
        parse_record(text)


def test_contacts_with_separators_are_refused_when_formatting() -> None:
    with pytest.raises(ValueError, match="contact URI"):
        format_record(bytes(32), ["mailto:a@example.net;b@example.net"])
