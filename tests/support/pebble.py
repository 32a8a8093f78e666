"""A real, throwaway Pebble (Let's Encrypt's test ACME server, Debian ``pebble``) for jfe's
ACME tests, with its defaults for what matters: 5% of good nonces rejected and random
validation delays (no ``PEBBLE_VA_NOSLEEP``). Names resolve through ``-dnsserver`` (a Knot
server the test starts), challenges are validated against ``tls_port`` on 127.0.0.1.

Pebble's packaged example config names certificate files the package does not ship: this module
makes a small CA and a certificate for 127.0.0.1 for Pebble's own HTTPS listener. A missing
``pebble`` binary is a loud failure, never a skip.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.knot import free_udp_tcp_port

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


class PebbleUnavailable(RuntimeError):
    pass


def _listener_certs(base: Path) -> tuple[Path, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = base / "ca.pem", base / "cert.pem", base / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


class Pebble:
    """``pebble`` on 127.0.0.1 (free ports), resolving through ``dns_server``."""

    def __init__(self, *, dns_server: str, tls_port: int, env: dict[str, str] | None = None):
        binary = shutil.which("pebble", path=os.environ.get("PATH", "") + ":/usr/bin")
        if binary is None:
            raise PebbleUnavailable("pebble not found: apt-get install pebble (make test does)")
        self.binary = binary
        self.dns_server = dns_server
        self.tls_port = tls_port
        self.env = env or {}
        self.base = Path(tempfile.mkdtemp(prefix="jfc-pebble-"))
        self.ca_bundle, cert, key = _listener_certs(self.base)
        self.port = free_udp_tcp_port()
        self.management_port = free_udp_tcp_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(cert),
                "privateKey": str(key),
                "httpPort": free_udp_tcp_port(),
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.base / "pebble.json").write_text(json.dumps(config))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
        env.update(self.env)
        with (self.base / "pebble.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "-config",
                    str(self.base / "pebble.json"),
                    "-dnsserver",
                    self.dns_server,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(
                    self.directory_url, context=self._context(), timeout=1
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise PebbleUnavailable(f"pebble did not serve {self.directory_url}:\n{tail}")

    def root_pem(self) -> bytes:
        """The root that signs what this Pebble issues (random per run)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context(), timeout=5) as r:
            data: bytes = r.read()
        return data

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.base / "pebble.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
