"""A small trio TLS server that takes its certificates from a jfe CertificateSource, as jfe's
proxy does: read the ClientHello first (SNI, ALPN), then ask the source for the context
(``challenge_context`` for ACME tls-alpn-01, ``cached``, then ``context_for``) and wrap the
connection with it, replaying the bytes already read. It answers ``ok NAME\\n`` and closes.

A test fixture for the certificate tests (the product's proxy is jfe/proxy.py); its ClientHello
reader is deliberately minimal: one record, no fragmentation, bounded at 16 KiB.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import trio

from jfe.certs import Certificates

MAX_HELLO = 16 * 1024
HELLO_TIMEOUT_S = 5.0


def parse_hello(data: bytes) -> tuple[str | None, tuple[str, ...]] | None:
    """(SNI, ALPN) of a ClientHello in ``data``; None while incomplete; ValueError if not TLS."""
    if len(data) < 5:
        return None
    if data[0] != 22:
        raise ValueError("not a TLS handshake record")
    (length,) = struct.unpack("!H", data[3:5])
    if len(data) < 5 + length:
        return None
    body = data[5 : 5 + length]
    if body[0] != 1:
        raise ValueError("not a ClientHello")
    pos = 4 + 2 + 32
    pos += 1 + body[pos]
    (n,) = struct.unpack("!H", body[pos : pos + 2])
    pos += 2 + n
    pos += 1 + body[pos]
    (ext_len,) = struct.unpack("!H", body[pos : pos + 2])
    pos += 2
    end = pos + ext_len
    sni: str | None = None
    alpn: list[str] = []
    while pos + 4 <= end:
        etype, elen = struct.unpack("!HH", body[pos : pos + 4])
        ext = body[pos + 4 : pos + 4 + elen]
        pos += 4 + elen
        if etype == 0 and len(ext) >= 5 and ext[2] == 0:
            (nlen,) = struct.unpack("!H", ext[3:5])
            sni = ext[5 : 5 + nlen].decode("ascii", "replace")
        elif etype == 16 and len(ext) >= 2:
            i = 2
            while i < len(ext):
                plen = ext[i]
                alpn.append(ext[i + 1 : i + 1 + plen].decode("ascii", "replace"))
                i += 1 + plen
    return sni, tuple(alpn)


class _Replay(trio.abc.Stream):
    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class TlsServer:
    source: Certificates
    port: int = 0
    handshakes: int = 0
    failures: int = 0
    names: list[str | None] = field(default_factory=list)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            data = b""
            with trio.fail_after(HELLO_TIMEOUT_S):
                while (hello := parse_hello(data)) is None and len(data) < MAX_HELLO:
                    chunk = await stream.receive_some(MAX_HELLO)
                    if not chunk:
                        return
                    data += chunk
            if hello is None:
                return
            sni, alpn = hello
            peer = stream.socket.getpeername()[0]
            client = ipaddress.ip_address(peer)
            ctx = self.source.challenge_context(sni, alpn)
            challenge = ctx is not None
            if ctx is None:
                ctx = self.source.cached(sni) or await self.source.context_for(sni, client)
            tls = trio.SSLStream(_Replay(stream, data), ctx, server_side=True)
            with trio.fail_after(HELLO_TIMEOUT_S):
                await tls.do_handshake()
                self.handshakes += 1
                self.names.append(sni)
                if not challenge:
                    await tls.send_all(f"ok {sni}\n".encode())
            await tls.aclose()
        except (trio.BrokenResourceError, trio.TooSlowError, ValueError, OSError, IndexError):
            self.failures += 1
        finally:
            await stream.aclose()


def handshake(
    port: int, name: str, cafile: str | None, *, timeout: float = 10.0
) -> tuple[float, str]:
    """A blocking TLS client (Python ssl): (seconds for connect + handshake, the first line or
    the verification error). Verifies against ``cafile`` when given."""
    ctx = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                elapsed = time.perf_counter() - start
                line = tls.recv(200).decode()
                return elapsed, line
        except ssl.SSLCertVerificationError as exc:
            return time.perf_counter() - start, f"verify-failed: {exc.verify_message}"
