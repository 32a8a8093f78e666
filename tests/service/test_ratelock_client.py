"""The client library refuses what a man in the middle makes of ratelockd's answers.

A real ``ratelockd`` process on a Unix socket, and between it and the client a real proxy on
another Unix socket that forwards each request and then, by mode, forges, replays, re-addresses
or edits the answer. The client must raise for every one of them, and must be unmoved by what
the proxy can change without the key (the HTTP status, Retry-After).
"""

from __future__ import annotations

import dataclasses
import http.server
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from overflowd.errors import (
    RatelockUnavailable,
    VerdictDecodeError,
    VerdictReplayError,
    VerdictSignatureError,
    VerdictStaleError,
)
from overflowd.identity import NodeIdentity
from ratelock import verdict as vd
from ratelock.client import AsyncClient, Client
from tests.support.ratelockd import Ratelockd, add_client, make_home

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "date",
               "server"}


@dataclasses.dataclass
class Recorded:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Mitm(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A forwarding HTTP proxy on a Unix socket whose answers ``mode`` rewrites."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that refused our answer and hung up: that is the test passing

    def __init__(self, path: Path, upstream: Path) -> None:
        self.upstream = httpx.Client(transport=httpx.HTTPTransport(uds=str(upstream)),
                                     base_url="http://ratelockd", timeout=30)
        self.mode = "pass"
        self.recorded: Recorded | None = None
        self.forger = NodeIdentity.generate()
        self.kid = b""
        super().__init__(str(path), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Mitm

    def log_message(self, *args: object) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path
        mode = self.server.mode
        if mode == "readdress":
            path = path.replace("/users/alice/", "/users/bob/")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        r = self.server.upstream.request(self.command, path, headers=headers, content=body)
        answer = Recorded(r.status_code, [(k, v) for k, v in r.headers.items()
                                          if k.lower() not in HOP_HEADERS], r.content)
        if mode == "record":
            self.server.recorded = answer
        elif mode == "replay":
            assert self.server.recorded is not None
            answer = self.server.recorded
        elif mode in ("forge", "forge-kid"):
            answer = self._forged(answer)
        elif mode == "status":
            answer = Recorded(200, [(k, v) for k, v in answer.headers
                                    if k.lower() != "retry-after"], answer.body)
        elif mode == "body":
            answer = Recorded(answer.status, answer.headers, answer.body[:-1] + b"!")
        self.send_response(answer.status)
        for k, v in answer.headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def _forged(self, real: Recorded) -> Recorded:
        """The real verdict's fields, outcome turned to "ok", signed by another key (with its own
        kid, or with the real node's kid as a forger would try)."""
        text = dict((k.lower(), v) for k, v in real.headers)["ratelock-verdict"]
        cose = _unb64(text)
        v = vd.decode_unverified(cose).verdict
        fake = dataclasses.replace(v, outcome="ok")
        kid = self.server.forger.public_key if self.server.mode == "forge" else self.server.kid
        forged = vd.encode_verdict(fake, kid, self.server.forger.signer())
        headers = [(k, v) for k, v in real.headers if k.lower() != "ratelock-verdict"]
        headers.append(("ratelock-verdict", _b64(forged)))
        return Recorded(200, headers, real.body)

    do_GET = do_POST = do_PUT = do_DELETE = _any


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ratelockd, Mitm, str]]:
    home = tmp_path_factory.mktemp("rlc") / "home"
    make_home(home, "user_failures_burst = 2\nuser_failures_per_hour = 1\n")
    token = add_client(home, "app")
    d = Ratelockd(home)
    mitm = Mitm(home / "mitm.sock", d.socket_path)
    mitm.kid = d.public_key
    thread = threading.Thread(target=mitm.serve_forever, daemon=True)
    thread.start()
    try:
        with d.client(token) as c:
            assert c.enroll("alice", b"alice-pw").ok
            assert c.enroll("bob", b"bob-pw").ok
            assert c.put("rec", b"the record").ok
        yield d, mitm, token
    finally:
        mitm.shutdown()
        mitm.server_close()
        mitm.upstream.close()
        d.stop()


def _through(setup: tuple[Ratelockd, Mitm, str], mode: str, **kw: object) -> Client:
    d, mitm, token = setup
    mitm.mode = mode
    return Client(token=token, public_key=d.public_key,
                  socket_path=Path(mitm.server_address), **kw)  # type: ignore[arg-type]


def test_the_proxy_is_transparent_when_it_does_nothing(
    setup: tuple[Ratelockd, Mitm, str],
) -> None:
    with _through(setup, "pass") as c:
        assert c.verify("alice", b"alice-pw").ok
        assert c.get("rec").data == b"the record"


def test_a_forged_verdict_is_refused(setup: tuple[Ratelockd, Mitm, str]) -> None:
    # wrong guesses for bob: the daemon says "wrong", the forger says "ok"
    with _through(setup, "forge") as c, pytest.raises(VerdictSignatureError):
        c.verify("bob", b"a wrong guess")
    # the node's kid on a signature by another key
    with _through(setup, "forge-kid") as c, pytest.raises(VerdictSignatureError):
        c.verify("bob", b"a wrong guess")


def test_a_replayed_verdict_is_refused(setup: tuple[Ratelockd, Mitm, str]) -> None:
    with _through(setup, "record") as c:
        assert c.verify("alice", b"alice-pw").ok  # the proxy keeps this "ok"
    with _through(setup, "replay") as c, pytest.raises(VerdictReplayError):
        c.verify("alice", b"a wrong guess")


def test_a_readdressed_request_is_refused(setup: tuple[Ratelockd, Mitm, str]) -> None:
    # alice's request sent as bob's, with bob's password: the daemon says ok, for bob
    with _through(setup, "readdress") as c, pytest.raises(VerdictReplayError):
        c.verify("alice", b"bob-pw")


def test_an_edited_record_is_refused(setup: tuple[Ratelockd, Mitm, str]) -> None:
    with _through(setup, "body") as c, pytest.raises(VerdictSignatureError):
        c.get("rec")


def test_the_status_line_changes_nothing(setup: tuple[Ratelockd, Mitm, str]) -> None:
    with _through(setup, "status") as c:
        outcomes = [c.verify("mallory-victim", b"x").outcome for _ in range(1)]
        assert outcomes == ["unknown"]
        c.enroll("carol", b"carol-pw")
        assert [c.verify("carol", b"guess").outcome for _ in range(2)] == ["wrong", "wrong"]
        over = c.verify("carol", b"guess")  # the proxy made it 200 without Retry-After
        assert over.outcome == "over_budget" and over.retry_after_s and over.retry_after_s > 0


def test_a_stale_verdict_is_refused(setup: tuple[Ratelockd, Mitm, str]) -> None:
    with _through(setup, "pass", clock=lambda: time.time() + 120) as c, \
            pytest.raises(VerdictStaleError):
        c.verify("alice", b"alice-pw")


def test_an_answer_without_a_verdict_is_refused(
    setup: tuple[Ratelockd, Mitm, str], tmp_path: Path,
) -> None:
    d, _, token = setup
    with Client(token=token, public_key=d.public_key, url="http://127.0.0.1:9") as c, \
            pytest.raises(RatelockUnavailable, match=r"127\.0\.0\.1:9"):
        c.verify("alice", b"alice-pw")
    with Client(token=token, public_key=d.public_key, socket_path=tmp_path / "none.sock") as c, \
            pytest.raises(RatelockUnavailable, match=r"none\.sock"):
        c.verify("alice", b"alice-pw")
    # /healthz answers, but no verdict: the client never takes an unsigned answer
    c = Client(token=token, public_key=d.public_key, socket_path=d.socket_path)
    req = c.core.request("GET", "/healthz", "verify", "alice")
    with c, pytest.raises(VerdictDecodeError):
        c._send(req)


async def test_the_async_client_verifies_the_same(setup: tuple[Ratelockd, Mitm, str]) -> None:
    d, mitm, token = setup
    async with AsyncClient(token=token, public_key=d.public_key, socket_path=d.socket_path) as c:
        with trio.fail_after(30):
            assert (await c.verify("alice", b"alice-pw")).ok
            assert (await c.get("rec")).data == b"the record"
    mitm.mode = "forge"
    async with AsyncClient(token=token, public_key=d.public_key,
                           socket_path=Path(mitm.server_address)) as c:
        with trio.fail_after(30), pytest.raises(VerdictSignatureError):
            await c.verify("nobody", b"guess")
