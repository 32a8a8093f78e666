"""TLS material for jfe's tests: a real CA and leaves (``cryptography``), and real ClientHellos.

`TestCertificateSource` implements jfe.certs's ``CertificateSource`` protocol (S5-DESIGN.md)
with a CA made here, so the proxy's tests run with real certificates while jfe-certs builds
the product's source. It is a test fixture, not a stub in the product: it issues a real leaf
per name, caches it, and counts what it did.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import sys
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FALLBACK_NAME = "jfe-fallback.invalid"


def python_client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The ClientHello Python's ssl sends for ``server_name``/``alpn``: real bytes, no socket."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@dataclass
class CertificateStatistics:
    granted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    budget_left: int | None = None


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class TestCA:
    """A throwaway CA: ``ca_pem`` for clients' trust stores, `leaf` for servers."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("jfe test CA"))
            .issuer_name(_name("jfe test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self._dir = Path(tempfile.mkdtemp(prefix="jfe-test-ca-"))
        # Removed with the CA (or at exit): every test and bench run made one and left it.
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self.ca_file = self._dir / "ca.pem"
        self.ca_file.write_bytes(self.ca_pem)

    def leaf(self, name: str) -> tuple[Path, Path]:
        """A leaf for ``name`` (chain file, key file), written to the CA's directory."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        chain = self._dir / f"{name}.pem"
        keyfile = self._dir / f"{name}.key"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem)
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return chain, keyfile

    def server_context(self, name: str) -> ssl.SSLContext:
        chain, keyfile = self.leaf(name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain, keyfile)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        return ctx


class TestCertificateSource:
    """``CertificateSource`` over a `TestCA`: names in ``allowed`` get leaves, others a fallback."""

    __test__ = False

    def __init__(self, ca: TestCA, allowed: set[str] | None = None) -> None:
        self.ca = ca
        self.allowed = allowed
        self._cache: dict[str, ssl.SSLContext] = {}
        self._fallback = ca.server_context(FALLBACK_NAME)
        self.calls: Counter[str] = Counter()
        self._stats = CertificateStatistics()

    def cached(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name is None:
            return None
        return self._cache.get(server_name)

    async def context_for(
        self, server_name: str | None, client: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> ssl.SSLContext:
        self.calls[str(client)] += 1
        if server_name is None or (self.allowed is not None and server_name not in self.allowed):
            reason = "no_name" if server_name is None else "not_allowed"
            self._stats.refused[reason] = self._stats.refused.get(reason, 0) + 1
            return self._fallback
        ctx = self._cache.get(server_name)
        if ctx is None:
            ctx = self.ca.server_context(server_name)
            self._cache[server_name] = ctx
            self._stats.granted += 1
        return ctx

    def statistics(self) -> CertificateStatistics:
        return CertificateStatistics(
            self._stats.granted, dict(self._stats.refused), self._stats.budget_left
        )


def _run_jfe(home: Path) -> int:
    """``python -m tests.support.jfe_certs HOME [CHAIN KEY]``: `jfe run` with this module's CA.

    The netns tests run jfe as its own process (signals, leftovers after SIGKILL) while
    jfe-certs builds the product's certificate source; this runs the same `jfe.cli.serve`
    with a `TestCertificateSource` and writes the CA to ``HOME/test-ca.pem`` for clients.
    """
    import logging

    import trio

    from jfe.cli import serve
    from jfe.config import load_jfe
    from overflowd.errors import OverflowdError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    ca = TestCA()
    (home / "test-ca.pem").write_bytes(ca.ca_pem)
    source = TestCertificateSource(ca)
    if len(sys.argv) > 3:  # bench/jfe.py: one given leaf for every name, as haproxy serves
        fixed = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        fixed.load_cert_chain(sys.argv[2], sys.argv[3])
        source.cached = lambda _name: fixed  # type: ignore[method-assign]
    try:
        trio.run(serve, home, load_jfe(home).proxy, source)
    except OverflowdError as exc:
        print(f"jfe: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_run_jfe(Path(sys.argv[1])))
