"""The ClientHello sniffer against real ClientHellos (Python ssl, openssl s_client) and garbage."""

from __future__ import annotations

import socket
import subprocess

import pytest

from jfe import sniff
from jfe.sniff import MAX_CLIENT_HELLO_BYTES, NotTls, parse_client_hello
from overflowd.errors import JfeError
from tests.support.jfe_certs import python_client_hello


def test_python_ssl_client_hello_gives_sni_and_alpn() -> None:
    hello = python_client_hello("Www.Example.ORG", alpn=["h2", "http/1.1"])
    parsed = parse_client_hello(hello)
    assert parsed is not None
    assert parsed.server_name == "www.example.org"
    assert parsed.alpn == ("h2", "http/1.1")
    assert 0x0304 in parsed.supported_versions
    assert parsed.record_bytes == len(hello)
    assert parsed.cipher_suites > 1


def test_no_sni_no_alpn() -> None:
    parsed = parse_client_hello(python_client_hello(None))
    assert parsed is not None
    assert parsed.server_name is None and parsed.alpn == ()


def test_every_prefix_needs_more_and_extra_bytes_are_not_consumed() -> None:
    hello = python_client_hello("a.example", alpn=["smtp"])
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None, cut
    parsed = parse_client_hello(hello + b"\x17\x03\x03")  # bytes after it belong to TLS
    assert parsed is not None and parsed.record_bytes == len(hello)


def test_client_hello_split_over_records_is_reassembled() -> None:
    hello = python_client_hello("split.example", alpn=["h2"])
    body = hello[5:]
    records = b""
    for i in range(0, len(body), 50):
        chunk = body[i : i + 50]
        records += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    parsed = parse_client_hello(records)
    assert parsed is not None
    assert (parsed.server_name, parsed.alpn, parsed.record_bytes) == (
        "split.example",
        ("h2",),
        len(records),
    )


def _capture_openssl_hello(args: list[str]) -> bytes:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while parse_client_hello(data) is None:
                    chunk = conn.recv(65536)
                    assert chunk, "openssl closed before a whole ClientHello"
                    data += chunk
                return data
        finally:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("args", "name", "alpn"),
    [
        (
            ["-servername", "mail.example.net", "-alpn", "smtp,h2"],
            "mail.example.net",
            ("smtp", "h2"),
        ),
        (["-noservername", "-tls1_2"], None, ()),
    ],
)
def test_openssl_s_client_hello(args: list[str], name: str | None, alpn: tuple[str, ...]) -> None:
    parsed = parse_client_hello(_capture_openssl_hello(args))
    assert parsed is not None
    assert parsed.server_name == name
    assert parsed.alpn == alpn


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO example.org\r\n",
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x02\x00",  # record version 2.x
        b"\x16\x03\x05",  # record minor version past TLS 1.3's
        b"\x17\x03\x03\x00\x10",  # application data first
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # server_hello, not client_hello
    ],
)
def test_garbage_is_not_tls(data: bytes) -> None:
    with pytest.raises(NotTls):
        parse_client_hello(data)


def test_not_tls_is_a_jfe_error_with_an_offset() -> None:
    with pytest.raises(JfeError) as info:
        parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")
    assert isinstance(info.value, NotTls) and info.value.offset is not None


def test_length_fields_that_lie_are_not_tls() -> None:
    hello = bytearray(python_client_hello("lie.example"))
    # Handshake length one byte shorter than the record: bytes after the ClientHello.
    n = int.from_bytes(hello[6:9], "big") - 1
    hello[6:9] = n.to_bytes(3, "big")
    with pytest.raises(NotTls):
        parse_client_hello(bytes(hello))


def test_size_bound() -> None:
    # A handshake header announcing more than the bound is refused at once, not buffered.
    with pytest.raises(NotTls, match="bound"):
        parse_client_hello(b"\x16\x03\x01\x40\x00\x01\x00\x40\x00")
    # Records that each stay small but together pass the bound are refused too.
    fragment = b"\x01\x00\xff\xff" + b"\x00" * 996
    records = b"\x16\x03\x01" + len(fragment).to_bytes(2, "big") + fragment
    filler = b"\x16\x03\x01\x03\xe8" + b"\x00" * 1000
    with pytest.raises(NotTls, match="bound"):
        parse_client_hello(records + filler * (MAX_CLIENT_HELLO_BYTES // len(filler) + 1))


def _placeholder(n: int) -> str:
    """A valid name of exactly ``n`` characters (labels of at most 50)."""
    labels, left = [], n
    while left > 51:
        labels.append("p" * 50)
        left -= 51
    labels.append("p" * left)
    return ".".join(labels)


@pytest.mark.parametrize(
    "bad",
    [
        b"bad name.example",
        b"a..b.example",
        b"x" * 64 + b".example",
        b"caf\xc3\xa9.example",
        b"nul\x00.example",
    ],
)
def test_bad_server_names_are_refused(bad: bytes) -> None:
    placeholder = _placeholder(len(bad)).encode()
    hello = python_client_hello(placeholder.decode())
    assert parse_client_hello(hello) is not None
    assert hello.count(placeholder) == 1
    with pytest.raises(NotTls, match="host_name"):
        parse_client_hello(hello.replace(placeholder, bad))


def test_trailing_dot_is_dropped() -> None:
    hello = python_client_hello("pppp.example")
    parsed = parse_client_hello(hello.replace(b"pppp.example", b"ppp.example."))
    assert parsed is not None and parsed.server_name == "ppp.example"


def test_looks_like_tls() -> None:
    assert sniff.looks_like_tls(b"") is None
    assert sniff.looks_like_tls(b"\x16") is None
    assert sniff.looks_like_tls(b"\x16\x03\x01") is True
    assert sniff.looks_like_tls(b"2") is False


def _tiny_record_hello(padding: int) -> bytes:
    """A ClientHello with a padding extension, sent as one-byte TLS records (legal, hostile)."""
    ext = (21).to_bytes(2, "big") + padding.to_bytes(2, "big") + bytes(padding)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(ext).to_bytes(2, "big") + ext
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(b"\x16\x03\x01\x00\x01" + message[i : i + 1] for i in range(len(message)))


def test_trickled_tiny_records_cost_linear_work() -> None:
    """Review (jfe #12): re-parsing after each read walked every record again, so a client
    trickling ~2,650 one-byte records, one per read, cost 11 s of event-loop CPU."""
    import time

    records = _tiny_record_hello(2600)
    assert len(records) < MAX_CLIENT_HELLO_BYTES
    buffer = sniff.HelloBuffer()
    started = time.process_time()
    hello = None
    for i in range(0, len(records), 6):
        hello = buffer.feed(records[i : i + 6])
        if hello is not None:
            break
    spent = time.process_time() - started
    assert hello is not None and hello.record_bytes == len(records)
    assert spent < 1.0, f"{spent:.2f} s of CPU for one trickled ClientHello"


@pytest.mark.parametrize(
    "stream",
    [
        python_client_hello("a.example", alpn=["h2"]) + b"\x17\x03\x03",
        _tiny_record_hello(40),
        _tiny_record_hello(40)[:-3] + b"\x17\x03\x03\x00\x01",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
        b"\x16\x03\x01\x00\x02\x01\x00\x16\x03\x01\x00\x02\xff\xff",
        b"\x16\x03\x01\x40\x01" + bytes(20),
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x05",
    ],
)
def test_hello_buffer_agrees_with_parse_client_hello_on_every_split(stream: bytes) -> None:
    for step in (1, 2, 7):
        buffer = sniff.HelloBuffer()
        for end in range(step, len(stream) + step, step):
            piece = stream[end - step : end]
            try:
                expected: object = parse_client_hello(stream[:end])
            except NotTls:
                expected = NotTls
            try:
                got: object = buffer.feed(piece)
            except NotTls:
                got = NotTls
            assert got == expected, (step, end)
            if got is not None:
                break
