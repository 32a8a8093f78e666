"""jfe's local CA: an ECDSA P-256 key derived from the node identity, and the leaves it signs.

Why derived, not signed by the identity (docs/jfe-certificates.md): the node identity is
Ed25519, and a CA whose key is Ed25519 makes every chain carry an Ed25519 signature, which
browsers and many TLS stacks do not accept in X.509. So the CA key is ECDSA P-256 (what every
client verifies), derived from the identity seed with HKDF-SHA256 and a label of its own
(domain separation: the bytes are never the Ed25519 key, and no other use of the seed can yield
them). The CA needs no secret of its own to back up or leak; a new identity means a new CA.

So that anyone holding the node's public key can check that a CA belongs to that node, the CA
certificate carries a non-critical extension (OID :data:`BINDING_OID`) holding the node's
Ed25519 public key and its signature over a purpose string and the CA's SubjectPublicKeyInfo:
a signature made for this purpose only (DESIGN.md "Every signature says what it is for").

This module is sync and does no network I/O; :mod:`jfe.certs` runs it in worker threads. It
never writes a private key to disk except in files created with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from overflowd import files
from overflowd.errors import CertificateError
from overflowd.identity import NodeIdentity

#: HKDF info for the CA key: changing it makes a new CA (hence the version).
CA_KEY_LABEL = b"overflowd jfe local CA ECDSA P-256 key v1"
#: What the identity's signature in the binding extension is for.
BINDING_PURPOSE = b"overflowd jfe CA binding v1\x00"
#: A UUID-based OID (ITU-T X.667, arc 2.25): ours without registering a private enterprise arc.
BINDING_OID = x509.ObjectIdentifier("2.25.49497394323158844787077379272892871125")
#: id-pe-acmeIdentifier, RFC 8737 §6.1.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: The CA lives this long; it is remade (same key) when less than a year is left.
CA_LIFETIME = dt.timedelta(days=3650)
CA_RENEW_BEFORE = dt.timedelta(days=365)
#: Leaves are dated this far in the past, for clients whose clocks are a little behind.
BACKDATE = dt.timedelta(hours=1)
#: The fallback certificate's name: .invalid (RFC 6761) can never be a real name.
FALLBACK_NAME = "fallback.jfe.invalid"

CA_FILE = "ca.pem"


def derive_ca_key(identity: NodeIdentity) -> ec.EllipticCurvePrivateKey:
    """The CA's P-256 key: HKDF-SHA256(seed, info=CA_KEY_LABEL) reduced into [1, n-1].

    48 bytes (128 bits more than the group order) make the reduction's bias negligible
    (FIPS 186-5 A.2.1, "extra random bits").
    """
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=CA_KEY_LABEL).derive(
        identity.seed
    )
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    scalar = int.from_bytes(okm, "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _binding_value(identity: NodeIdentity, ca_public: ec.EllipticCurvePublicKey) -> bytes:
    # public key (32) || Ed25519 signature (64) over purpose || SPKI DER
    return identity.public_key + identity.sign(BINDING_PURPOSE + _spki(ca_public))


def verify_binding(ca_cert: x509.Certificate, node_public_key: bytes) -> bool:
    """True if ``ca_cert`` carries the node's signature over its own key (see module doc)."""
    try:
        ext = ca_cert.extensions.get_extension_for_oid(BINDING_OID)
    except x509.ExtensionNotFound:
        return False
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension) or len(value.value) != 96:
        return False
    key, sig = value.value[:32], value.value[32:]
    if key != node_public_key:
        return False
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key).verify(sig, BINDING_PURPOSE + _spki(public))
    except Exception:  # cryptography's InvalidSignature and malformed keys alike
        return False
    return True


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, created 0600 (it holds a private key)."""
    files.write_private(path, data)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_leaf_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class Leaf:
    """One certificate with its key, as the PEM file jfe caches (key, leaf, chain)."""

    name: str
    pem: bytes
    not_after: float  # Unix time

    @staticmethod
    def not_after_of(pem: bytes) -> float:
        cert = x509.load_pem_x509_certificate(pem)
        return cert.not_valid_after_utc.timestamp()


class LocalCA:
    """The CA certificate (cached in ``directory``/ca.pem) and its derived key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    def signed(self, pem: bytes) -> bool:
        """True if the first certificate in ``pem`` was signed by this CA's key."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
            cert.verify_directly_issued_by(self.cert)
        except Exception:  # InvalidSignature, ValueError, TypeError: all mean "not ours"
            return False
        return True

    @classmethod
    def open(cls, directory: Path, identity: NodeIdentity, now: float) -> LocalCA:
        """The cached CA certificate if it is this identity's and not near its end, else a new
        one (same derived key, so leaves already issued stay valid under it)."""
        key = derive_ca_key(identity)
        path = directory / CA_FILE
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except FileNotFoundError:
            cert = None
        except (OSError, ValueError) as exc:
            raise CertificateError(f"{path}: not a CA certificate: {exc}") from None
        if (
            cert is None
            or _spki(cert.public_key()) != _spki(key.public_key())  # type: ignore[arg-type]
            or cert.not_valid_after_utc - when < CA_RENEW_BEFORE
            or not verify_binding(cert, identity.public_key)
        ):
            cert = cls._make_cert(key, identity, when)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            os.replace(tmp, path)
        return cls(key, cert)

    @staticmethod
    def _make_cert(
        key: ec.EllipticCurvePrivateKey, identity: NodeIdentity, when: dt.datetime
    ) -> x509.Certificate:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "overflowd node"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"jfe local CA {identity.fingerprint}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - BACKDATE)
            .not_valid_after(when + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.UnrecognizedExtension(BINDING_OID, _binding_value(identity, key.public_key())),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )

    def issue(self, name: str, now: float, lifetime_s: float) -> Leaf:
        """A leaf for ``name`` (already normalised by the gate), with a fresh P-256 key."""
        leaf_key = new_leaf_key()
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        not_after = when + dt.timedelta(seconds=lifetime_s)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        pem = key_pem(leaf_key) + cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        return Leaf(name=name, pem=pem, not_after=cert.not_valid_after_utc.timestamp())


def tls_alpn_challenge_pem(name: str, key_authorization: str) -> bytes:
    """The self-signed certificate (with its key) that answers an ACME tls-alpn-01 challenge
    for ``name``: SAN ``name`` and the critical acmeIdentifier extension holding SHA-256 of the
    key authorization as a DER OCTET STRING (RFC 8737 §3)."""
    key = new_leaf_key()
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key_pem(key) + cert.public_bytes(serialization.Encoding.PEM)
