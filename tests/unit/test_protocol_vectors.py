"""docs/protocol.md's test vectors are the code's output, and an independent COSE library agrees.

pycose is the independent implementation: it verifies our reports, and a report it makes from
the same key and payload is byte-for-byte ours and verifies here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pycose.algorithms import EdDSA
from pycose.headers import KID, Algorithm, ContentType
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import CoseMessage, Sign1Message

from overflowd import report as rpt
from overflowd.identity import NodeIdentity, verify_report
from tests.support.reports import make_payload
from tests.vectors import make_vectors

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _doc_vectors() -> dict[str, object]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Test vectors", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block, "docs/protocol.md lost its test vector block"
    return json.loads(block.group(1))  # type: ignore[no-any-return]


def test_document_matches_the_code() -> None:
    doc = _doc_vectors()
    identity = NodeIdentity(seed=make_vectors.SEED)
    assert doc["seed_hex"] == make_vectors.SEED.hex()
    assert doc["public_key_hex"] == identity.public_key.hex()
    assert doc["vectors"] == make_vectors.vectors()


@pytest.mark.parametrize("name", sorted(make_vectors.VECTORS))
def test_vectors_verify_and_decode_to_their_payloads(name: str) -> None:
    vec = make_vectors.vectors()[name]
    signed = verify_report(bytes.fromhex(vec["cose_hex"]))
    assert signed.payload == make_vectors.VECTORS[name]
    assert signed.report_id == vec["report_id"]


def _pycose_key(identity: NodeIdentity, *, private: bool) -> OKPKey:
    if private:
        return OKPKey(crv=Ed25519, d=identity.seed, x=identity.public_key)
    return OKPKey(crv=Ed25519, x=identity.public_key)


def test_pycose_verifies_our_reports() -> None:
    identity = NodeIdentity.generate()
    signed = identity.sign_report(make_payload("2001:db8::1", "2001:db8::2"))
    msg = CoseMessage.decode(signed.cose)
    assert isinstance(msg, Sign1Message)
    assert msg.phdr[ContentType] == rpt.CONTENT_TYPE
    assert msg.phdr[KID] == identity.public_key
    msg.key = _pycose_key(identity, private=False)
    assert msg.verify_signature()
    # ...and a wrong key does not verify: the check above can fail.
    msg.key = _pycose_key(NodeIdentity.generate(), private=False)
    assert not msg.verify_signature()


def test_pycose_made_report_verifies_here() -> None:
    identity = NodeIdentity.generate()
    payload = make_payload()
    msg = Sign1Message(
        phdr={Algorithm: EdDSA, ContentType: rpt.CONTENT_TYPE, KID: identity.public_key},
        payload=rpt.encode_payload(payload),
    )
    msg.key = _pycose_key(identity, private=True)
    theirs = msg.encode()
    signed = verify_report(theirs)
    assert signed.payload == payload
    assert signed.observer_key == identity.public_key
    assert theirs == identity.sign_report(payload).cose  # Ed25519 is deterministic
