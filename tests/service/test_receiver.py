"""The webhook receiver on 127.0.0.1: accepted once, rejected and counted, unbowed by floods.

In-process (hypercorn on trio, port 0) for the protocol cases, and ``overflowd-receive`` as a
real process (``python -m overflowd.cli.receive``) for the command line.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.receiver import encode_body
from overflowd.services.receive_http import JsonLinesSink, ReceiverLimits, WebhookReceiver
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def identity() -> NodeIdentity:
    return NodeIdentity(seed=bytes(range(32)))


def delivery(
    identity: NodeIdentity, report: rpt.SignedReport, ts: float | None = None
) -> tuple[dict[str, str], bytes]:
    body = encode_body(report)
    return wh.sign(
        report.report_id, int(time.time() if ts is None else ts), body, identity.sign
    ), body


def lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Served:
    def __init__(self, receiver: WebhookReceiver, base: str, out: Path) -> None:
        self.receiver, self.base, self.out = receiver, base, out


@pytest.fixture
async def served(tmp_path: Path, identity: NodeIdentity) -> AsyncIterator[Served]:
    out = tmp_path / "out.jsonl"
    sink = JsonLinesSink(str(out))
    receiver = WebhookReceiver(
        sink,
        trusted_keys={identity.public_key},
        limits=ReceiverLimits(max_in_flight=256),
    )
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(functools.partial(receiver.run, ("127.0.0.1", 0)))
            assert host == "127.0.0.1" and port > 0
            yield Served(receiver, f"http://{host}:{port}", out)
            nursery.cancel_scope.cancel()
    sink.close()


async def test_valid_delivery_is_written_once_and_replays_answered_2xx(
    served: Served, identity: NodeIdentity
) -> None:
    report = identity.sign_report(make_payload())
    headers, body = delivery(identity, report)
    async with httpx.AsyncClient(base_url=served.base) as client:
        first = await client.post("/hooks/overflowd", content=body, headers=headers)
        assert first.status_code == 204
        # A replay of the very same request (the sender lost our answer): 2xx, nothing written.
        again = await client.post("/", content=body, headers=headers)
        assert again.status_code == 200 and again.text.strip() == "duplicate"
        # A retry with a fresh signature and timestamp: the same.
        h2, b2 = delivery(identity, report, ts=time.time() + 1)
        assert (await client.post("/", content=b2, headers=h2)).status_code == 200
        metrics = (await client.get("/metrics")).text
    written = lines(served.out)
    assert [w["id"] for w in written] == [report.report_id]
    assert written[0] == json.loads(body)
    s = served.receiver.statistics()
    assert (s.accepted, s.duplicates) == (1, 2)
    assert "overflowd_receiver_accepted_total 1" in metrics
    assert "overflowd_receiver_duplicates_total 2" in metrics
    assert "# TYPE overflowd_receiver_rejected_total counter" in metrics


async def test_forged_altered_stale_untrusted_are_rejected_and_counted(
    served: Served, identity: NodeIdentity
) -> None:
    report = identity.sign_report(make_payload())
    headers, body = delivery(identity, report)
    stranger = NodeIdentity(seed=bytes(31) + b"\x07")
    theirs = stranger.sign_report(make_payload())
    cases: list[tuple[str, dict[str, str], bytes, int]] = []
    # forged: somebody else's key signs the webhook around our report
    cases.append(("bad_signature", delivery(stranger, report)[0], body, 401))
    # altered: one byte of the body
    altered = body.replace(b'"proto":17', b'"proto":18')
    assert altered != body
    cases.append(("bad_signature", headers, altered, 401))
    # stale, and from the future
    # 305, not 301: int() truncates the timestamp, and our clock moves on before the check.
    for skew in (-305, 305):
        h, b = delivery(identity, report, ts=time.time() + skew)
        cases.append(("stale", h, b, 401))
    # untrusted: a valid delivery from a key not in --trust
    h, b = delivery(stranger, theirs)
    cases.append(("untrusted", h, b, 401))
    # malformed
    cases.append(("malformed", {**headers, "webhook-timestamp": "soon"}, body, 400))
    cases.append(("malformed", headers, b"not json", 400))
    cases.append(
        ("report_malformed", *_with_cose(identity, report, b"\xd2\x84garbage"), 400)  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(base_url=served.base) as client:
        for reason, h, b, status in cases:
            r = await client.post("/", content=b, headers=h)
            assert r.status_code == status, (reason, r.text)
            assert r.text.startswith(reason), r.text
        big = await client.post("/", content=b"x" * (64 * 1024 + 1), headers=headers)
        assert big.status_code == 413
        assert (await client.get("/")).status_code == 405
        assert (await client.get("/healthz")).text.strip() == "ok"
    assert lines(served.out) == []
    rejected = served.receiver.statistics().rejected
    assert rejected["bad_signature"] == 2 and rejected["stale"] == 2
    assert rejected["untrusted"] == 1 and rejected["malformed"] == 2
    assert rejected["report_malformed"] == 1 and rejected["too_large"] == 1
    assert rejected["method"] == 1


def _with_cose(
    identity: NodeIdentity, report: rpt.SignedReport, cose: bytes
) -> tuple[dict[str, str], bytes]:
    doc = rpt.to_json(report)
    doc["cose"] = rpt.b64url(cose)
    body = json.dumps(doc).encode()
    return wh.sign(report.report_id, int(time.time()), body, identity.sign), body


async def test_a_flood_of_garbage_does_not_stop_valid_deliveries(
    served: Served, identity: NodeIdentity
) -> None:
    rng = random.Random(4)
    valid = [identity.sign_report(make_payload()) for _ in range(20)]
    template_h, template_b = delivery(identity, valid[0])
    garbage_sent = 0
    answers: list[int] = []

    def garbage() -> tuple[dict[str, str], bytes]:
        kind = rng.randrange(4)
        if kind == 0:
            return {}, rng.randbytes(rng.randrange(0, 4000))
        if kind == 1:
            return dict(template_h), rng.randbytes(len(template_b))
        if kind == 2:
            h = dict(template_h)
            h["webhook-signature"] = "v1a," + base64.b64encode(rng.randbytes(64)).decode()
            return h, template_b
        return {"webhook-id": "x" * rng.randrange(1, 400), "webhook-timestamp": "1"}, b"{}"

    async def flood(client: httpx.AsyncClient, n: int) -> None:
        nonlocal garbage_sent
        for _ in range(n):
            h, b = garbage()
            r = await client.post("/", content=b, headers=h)
            garbage_sent += 1
            assert 400 <= r.status_code < 500 or r.status_code == 503

    async def raw_junk() -> None:
        # Not even HTTP: the server must drop these connections, not stall on them.
        host, port = served.base.removeprefix("http://").split(":")
        for _ in range(20):
            stream = await trio.open_tcp_stream(host, int(port))
            with trio.move_on_after(2):
                await stream.send_all(rng.randbytes(300) + b"\r\n\r\n")
                await stream.receive_some(100)
            await stream.aclose()

    async def valid_sender(client: httpx.AsyncClient) -> None:
        for report in valid:
            h, b = delivery(identity, report)
            r = await client.post("/", content=b, headers=h)
            answers.append(r.status_code)
            await trio.sleep(0.01)

    limits = httpx.Limits(max_connections=100)
    with trio.fail_after(TIMEOUT_S):
        async with (
            httpx.AsyncClient(base_url=served.base, limits=limits) as bad,
            httpx.AsyncClient(base_url=served.base) as good,
            trio.open_nursery() as nursery,
        ):
            for _ in range(16):
                nursery.start_soon(flood, bad, 60)
            nursery.start_soon(raw_junk)
            nursery.start_soon(valid_sender, good)
    assert garbage_sent == 16 * 60
    assert answers == [204] * len(valid)
    assert sorted(w["id"] for w in lines(served.out)) == sorted(r.report_id for r in valid)
    s = served.receiver.statistics()
    assert sum(s.rejected.values()) >= 16 * 60 and s.in_flight == 0


async def test_overload_answers_503_with_retry_after(
    tmp_path: Path, identity: NodeIdentity
) -> None:
    """Readers full: 503 before the body is read. In-flight full: 503 once it is read."""
    sink = JsonLinesSink(str(tmp_path / "o.jsonl"))
    receiver = WebhookReceiver(sink, limits=ReceiverLimits(max_in_flight=1, max_reading=1))
    sent: list[dict[str, object]] = []
    bodies_read = 0

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        nonlocal bodies_read
        bodies_read += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    receiver._reading = 1  # as if one request were reading its body
    await receiver(scope, receive, send)
    assert sent[0]["status"] == 503 and bodies_read == 0
    assert (b"retry-after", b"1") in sent[0]["headers"]  # type: ignore[operator]
    receiver._reading, receiver._in_flight = 0, 1  # as if one were being verified
    sent.clear()
    await receiver(scope, receive, send)
    assert sent[0]["status"] == 503 and bodies_read == 1
    assert (b"retry-after", b"1") in sent[0]["headers"]  # type: ignore[operator]
    rejected = receiver.statistics().rejected
    assert rejected["reading_full"] == 1 and rejected["overloaded"] == 1
    sink.close()


# -- the command ---------------------------------------------------------------------------------


def start_receiver(out: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``overflowd-receive`` on 127.0.0.1, port 0; return it and its base URL."""
    env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "overflowd.cli.receive",
            "--listen",
            "127.0.0.1:0",
            "--out",
            str(out),
            *extra,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("overflowd-receive did not start")


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
        raise


async def test_overflowd_receive_process_with_trust_file(
    tmp_path: Path, identity: NodeIdentity
) -> None:
    keyfile = tmp_path / "trusted.keys"
    keyfile.write_text(f"# the lab node\n{identity.public_key_b64}\n")
    out = tmp_path / "reports.jsonl"
    proc, base = start_receiver(out, "--trust", str(keyfile))
    try:
        report = identity.sign_report(make_payload())
        headers, body = delivery(identity, report)
        stranger = NodeIdentity(seed=bytes(31) + b"\x09")
        h2, b2 = delivery(stranger, stranger.sign_report(make_payload()))
        with trio.fail_after(TIMEOUT_S):
            async with httpx.AsyncClient(base_url=base) as client:
                assert (await client.post("/", content=body, headers=headers)).status_code == 204
                assert (await client.post("/", content=body, headers=headers)).status_code == 200
                r = await client.post("/", content=b2, headers=h2)
                assert r.status_code == 401 and r.text.startswith("untrusted")
                metrics = (await client.get("/metrics")).text
        assert 'overflowd_receiver_rejected_total{reason="untrusted"} 1' in metrics
    finally:
        assert stop(proc) == 0
    assert [w["id"] for w in lines(out)] == [report.report_id]
    # Restarted on the same file, it still knows what it wrote.
    proc, base = start_receiver(out, "--trust", identity.public_key_b64)
    try:
        with trio.fail_after(TIMEOUT_S):
            async with httpx.AsyncClient(base_url=base) as client:
                h, b = delivery(identity, report)
                assert (await client.post("/", content=b, headers=h)).status_code == 200
    finally:
        assert stop(proc) == 0
    assert len(lines(out)) == 1


def test_overflowd_receive_usage_errors(tmp_path: Path) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "overflowd.cli.receive", *argv],
            capture_output=True,
            timeout=30,
        )

    assert run().returncode == 2
    bad = run("--listen", "nowhere", "--out", "-")
    assert bad.returncode == 1 and b"ADDR:PORT" in bad.stderr
    bad = run("--listen", "127.0.0.1:0", "--out", "-", "--trust", str(tmp_path / "missing"))
    assert bad.returncode == 1 and b"--trust" in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        bad = run("--listen", f"127.0.0.1:{port}", "--out", str(tmp_path / "o.jsonl"))
    assert bad.returncode == 1
    assert bad.stderr.decode().strip() == (
        f"overflowd-receive: error: --listen 127.0.0.1:{port}: "
        "cannot listen: Address already in use"
    )


def test_listen_and_trust_parsing(tmp_path: Path) -> None:
    from overflowd.cli.receive import parse_listen, parse_trust
    from overflowd.errors import ConfigError

    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen(":80") == ("0.0.0.0", 80)
    for bad in ("8080", "host:", "h:99999"):
        with pytest.raises(ConfigError):
            parse_listen(bad)
    key = bytes(range(32))
    assert parse_trust([]) is None
    assert parse_trust([base64.b64encode(key).decode()]) == {key}
    assert parse_trust([base64.urlsafe_b64encode(key).decode().rstrip("=")]) == {key}
    keys = tmp_path / "keys"
    keys.write_text("not a key\n")
    with pytest.raises(ConfigError, match=":1: not a base64"):
        parse_trust([str(keys)])
    keys.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="no keys"):
        parse_trust([str(keys)])


class _BrokenSink(JsonLinesSink):
    """A sink with a bug (not an OSError) on its first two writes: the per-request boundary."""

    def __init__(self, out: str) -> None:
        super().__init__(out)
        self.fail = 2

    def write_many(self, lines: list[bytes]) -> None:  # what the receiver writes through
        if self.fail:
            self.fail -= 1
            raise KeyError("a bug")
        super().write_many(lines)


async def test_an_unexpected_exception_is_a_500_counted_and_the_server_keeps_serving(
    tmp_path: Path, identity: NodeIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.jsonl"
    sink = _BrokenSink(str(out))
    receiver = WebhookReceiver(sink)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(functools.partial(receiver.run, ("127.0.0.1", 0)))
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
                codes = []
                for _ in range(3):
                    h, b = delivery(identity, identity.sign_report(make_payload()))
                    codes.append((await client.post("/", content=b, headers=h)).status_code)
                metrics = (await client.get("/metrics")).text
            nursery.cancel_scope.cancel()
    sink.close()
    assert codes == [500, 500, 204]
    assert 'overflowd_receiver_errors_total{type="KeyError"} 2' in metrics
    assert 'overflowd_receiver_rejected_total{reason="internal_error"} 2' in metrics
    warnings = [r for r in caplog.records if "internal_error" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: the second within the interval is not logged
    assert len(lines(out)) == 1
