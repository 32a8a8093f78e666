"""``overflowd-receive`` attacked over real sockets on 127.0.0.1: strangers cannot shut it out.

Each test starts the real command (``python -m overflowd.cli.receive``, port 0) and plays the
attacker with raw TCP or httpx. Attackers connect *from* other loopback addresses
(127.0.0.2, 127.0.0.3, ...: all of 127/8 is loopback on Linux) so that the per-client limits
see them as other clients than the well-behaved sender on 127.0.0.1; every packet still goes
to 127.0.0.1. Deadlines are short flags so the tests are quick; each wait has a timeout, and
timing assertions leave seconds of slack (two cores shared by many runs).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import trio

from overflowd.identity import NodeIdentity
from overflowd.receiver import encode_body
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

TIMEOUT_S = 60
COMMAND = (sys.executable, "-m", "overflowd.cli.receive", "--listen", "127.0.0.1:0")
GOOD = NodeIdentity(seed=bytes(range(32)))


@contextmanager
def receiver(
    tmp_path: Path, *flags: str, listen: str = "127.0.0.1:0"
) -> Iterator[tuple[str, int, Path]]:
    """``overflowd-receive`` on 127.0.0.1 port 0: (base URL, port, output file); stopped after.

    Its stderr goes to a file, never a pipe nobody reads (a full pipe would stall the server).
    """
    out = tmp_path / "reports.jsonl"
    errfile = tmp_path / "receive.stderr"
    env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
    with open(errfile, "wb") as err:
        proc = subprocess.Popen(
            [*COMMAND[:-1], listen, "--out", str(out), *flags],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        base = ""
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"listening on (http://\S+)", errfile.read_text())
            if found:
                base = found.group(1)
                break
            time.sleep(0.05)
        assert base, f"overflowd-receive did not start: {errfile.read_text()}"
        yield base, int(base.rsplit(":", 1)[1]), out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def signed(identity: NodeIdentity) -> tuple[dict[str, str], bytes]:
    report = identity.sign_report(make_payload())
    body = encode_body(report)
    return wh.sign(report.report_id, int(time.time()), body, identity.sign), body


async def metrics(base: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200, (r.status_code, r.text)
    text = r.text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def wait_metric(base: str, name: str, at_least: float) -> dict[str, float]:
    """Poll /metrics until ``name`` reaches ``at_least`` (the caller's fail_after bounds it)."""
    while True:
        m = await metrics(base)
        if m.get(name, 0) >= at_least:
            return m
        await trio.sleep(0.05)


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port whose source address is ``source`` (in 127/8)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


SLOW_HEAD = b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3000\r\n\r\n{"


async def read_all(stream: trio.SocketStream, limit_s: float) -> bytes:
    """Everything the server sends until it closes (or ``limit_s``), resets counted as a close."""
    data = b""
    with trio.move_on_after(limit_s):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: closed all the same
                break
            if not chunk:
                break
            data += chunk
    return data


async def test_64_slow_bodies_do_not_shut_out_a_real_delivery(tmp_path: Path) -> None:
    """On main: every real delivery got 503 while 64 strangers dripped their bodies."""
    with receiver(tmp_path) as (base, port, out), trio.fail_after(TIMEOUT_S):
        streams: list[trio.SocketStream] = []
        # 72 slow bodies from 9 addresses, 8 each: within every per-client limit.
        for i in range(72):
            stream = await connect_from(f"127.0.0.{2 + i // 8}", port)
            await stream.send_all(SLOW_HEAD)
            streams.append(stream)
        polls = 0
        while True:  # until the server has seen all 72 (or, on main, /metrics is shut out too)
            async with httpx.AsyncClient(base_url=base) as client:
                r = await client.get("/metrics")
            polls += 1  # each poll is a request too
            if r.status_code != 200:
                break
            found = re.search(r"^overflowd_receiver_requests_total (\d+)$", r.text, re.M)
            if found and int(found.group(1)) >= 72 + polls:
                break
            await trio.sleep(0.05)
        headers, body = signed(GOOD)
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.post("/", content=body, headers=headers)
            assert r.status_code in (200, 204), (r.status_code, r.text)
            # and again, while the strangers keep dripping
            for stream in streams:
                await stream.send_all(b" ")
            headers, body = signed(GOOD)
            r = await client.post("/", content=body, headers=headers)
            assert r.status_code in (200, 204), (r.status_code, r.text)
        for stream in streams:
            await stream.aclose()
    assert len(out.read_text().splitlines()) == 2


async def test_a_slow_body_gets_408_within_the_deadline(tmp_path: Path) -> None:
    deadline_s = 1.5
    with receiver(tmp_path, "--body-timeout-s", str(deadline_s)) as (base, port, _):
        with trio.fail_after(TIMEOUT_S):
            stream = await connect_from("127.0.0.2", port)
            start = trio.current_time()
            await stream.send_all(SLOW_HEAD)
            answer = b""

            async def drip() -> None:
                # one byte every 0.2 s: hypercorn's read timeout alone never fires
                while True:
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(b" ")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip)
                answer = await read_all(stream, deadline_s + 8)
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - start
            await stream.aclose()
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert deadline_s - 0.2 <= elapsed <= deadline_s + 6, elapsed
            m = await metrics(base)
        assert m['overflowd_receiver_rejected_total{reason="body_timeout"}'] == 1


async def test_slow_headers_are_closed_by_the_header_deadline(tmp_path: Path) -> None:
    """hypercorn's keep-alive timer runs from the connection's start until the headers end."""
    with receiver(tmp_path, "--header-timeout-s", "1") as (_, port, _):
        with trio.fail_after(TIMEOUT_S):
            stream = await connect_from("127.0.0.2", port)
            start = trio.current_time()
            closed = False
            for _ in range(60):  # 12 s of drip at most
                try:
                    await stream.send_all(b"X")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed = True
                    break
                with trio.move_on_after(0.2):
                    try:
                        if await stream.receive_some(100) == b"":
                            closed = True
                            break
                    except trio.BrokenResourceError:
                        closed = True
                        break
            assert closed and trio.current_time() - start <= 1 + 6
            await stream.aclose()


async def test_per_client_connection_cap(tmp_path: Path) -> None:
    flags = ("--max-connections-per-client", "4", "--body-timeout-s", "30")
    with receiver(tmp_path, *flags) as (base, port, out), trio.fail_after(TIMEOUT_S):
        held = []
        for _ in range(4):
            stream = await connect_from("127.0.0.2", port)
            await stream.send_all(SLOW_HEAD)
            held.append(stream)
        # 4 held + the /metrics poll's own: the accept queue is FIFO, so all 4 are counted
        await wait_metric(base, "overflowd_receiver_connections", 5)
        # The fifth from the same address: closed without an answer, even to a full request.
        headers, body = signed(GOOD)
        request = (
            b"POST / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        fifth = await connect_from("127.0.0.2", port)
        try:
            await fifth.send_all(request)
        except trio.BrokenResourceError:
            pass
        assert await read_all(fifth, 10) == b""
        await fifth.aclose()
        # Others are not affected.
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.post("/", content=body, headers=headers)
            assert r.status_code == 204, r.text
        m = await metrics(base)
        assert m['overflowd_receiver_connections_refused_total{reason="per_client"}'] == 1
        # One held connection goes: the address may connect again.
        await held.pop().aclose()
        while True:
            again = await connect_from("127.0.0.2", port)
            h2, b2 = signed(GOOD)
            raw = (
                b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in h2.items())
                + f"Content-Length: {len(b2)}\r\n\r\n".encode()
                + b2
            )
            try:
                await again.send_all(raw)
            except trio.BrokenResourceError:
                pass
            answer = await read_all(again, 10)
            await again.aclose()
            if answer:
                break
            await trio.sleep(0.1)  # the server has not seen the close yet
        assert answer.startswith(b"HTTP/1.1 204 "), answer
        for stream in held:
            await stream.aclose()
    assert len(out.read_text().splitlines()) == 2


@asynccontextmanager
async def client_from(base: str, source: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=base, transport=transport) as client:
        yield client


async def test_throwaway_keys_are_capped_in_rate_and_bytes_a_good_key_gets_through(
    tmp_path: Path,
) -> None:
    cap = 60_000  # the output file's cap, bytes
    flags = (
        *("--key-rate-per-s", "0.5", "--key-burst", "4"),
        *("--new-keys-per-s", "0.2", "--new-keys-burst", "3"),
        *("--max-out-bytes", str(cap)),
    )
    with receiver(tmp_path, *flags) as (base, _, out), trio.fail_after(TIMEOUT_S):
        async with client_from(base, "127.0.0.1") as good:
            headers, body = signed(GOOD)
            assert (await good.post("/", content=body, headers=headers)).status_code == 204
            start = trio.current_time()
            answers: dict[int, int] = {}
            retry_after: list[int] = []

            async def stranger(n: int) -> None:
                me = NodeIdentity(seed=n.to_bytes(32, "big"))
                async with client_from(base, f"127.0.0.{2 + n % 8}") as bad:
                    for _ in range(10):
                        h, b = signed(me)
                        r = await bad.post("/", content=b, headers=h)
                        answers[r.status_code] = answers.get(r.status_code, 0) + 1
                        if r.status_code == 429:
                            retry_after.append(int(r.headers["retry-after"]))

            async with trio.open_nursery() as nursery:
                for n in range(1, 41):
                    nursery.start_soon(stranger, n)
            # the well-behaved key, after the flood: it has tokens left
            for _ in range(3):
                headers, body = signed(GOOD)
                r = await good.post("/", content=body, headers=headers)
                assert r.status_code == 204, (r.status_code, r.text)
            elapsed = trio.current_time() - start
        m = await metrics(base)
    assert sum(answers.values()) == 400
    accepted_strangers = answers.get(204, 0)
    # At most burst + rate x elapsed new keys, each at most burst + rate x elapsed reports.
    new_keys = 3 + math.floor(0.2 * elapsed)
    per_key = 4 + math.floor(0.5 * elapsed)
    assert 0 < accepted_strangers <= new_keys * per_key, (accepted_strangers, elapsed)
    assert answers.get(429, 0) == 400 - accepted_strangers
    assert retry_after and all(1 <= s <= 3600 for s in retry_after)
    assert m['overflowd_receiver_rejected_total{reason="new_key_rate"}'] > 0
    assert m['overflowd_receiver_rejected_total{reason="key_rate"}'] > 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 + accepted_strangers
    assert sum(1 for doc in lines if doc["observer"]["key"] == GOOD.public_key_b64) >= 4
    assert out.stat().st_size <= cap


async def test_bytes_per_key_and_output_file_caps(tmp_path: Path) -> None:
    _, body = signed(GOOD)
    line = len(body) + 1
    flags = (
        *("--key-max-bytes", str(3 * line + 10), "--key-window-s", "3600"),
        *("--max-out-bytes", str(5 * line + 10)),
    )
    with receiver(tmp_path, *flags) as (base, _, out), trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=base) as client:
            codes = []
            for _ in range(4):
                h, b = signed(GOOD)
                r = await client.post("/", content=b, headers=h)
                codes.append(r.status_code)
            assert codes == [204, 204, 204, 429]
            assert 1 <= int(r.headers["retry-after"]) <= 3600
            other = NodeIdentity(seed=b"\x05" * 32)
            codes = []
            for _ in range(3):
                h, b = signed(other)
                codes.append((await client.post("/", content=b, headers=h)).status_code)
            assert codes == [204, 204, 507]  # the file is full after five reports
        m = await metrics(base)
    assert m['overflowd_receiver_rejected_total{reason="key_bytes"}'] == 1
    assert m['overflowd_receiver_rejected_total{reason="out_full"}'] == 1
    assert len(out.read_text().splitlines()) == 5
    assert out.stat().st_size <= 5 * line + 10


async def test_with_trust_untrusted_keys_are_refused_and_trusted_ones_not_rate_limited(
    tmp_path: Path,
) -> None:
    flags = ("--trust", GOOD.public_key_b64, "--key-burst", "1", "--key-rate-per-s", "0.001")
    with receiver(tmp_path, *flags) as (base, _, out), trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(3):
                h, b = signed(GOOD)
                assert (await client.post("/", content=b, headers=h)).status_code == 204
            h, b = signed(NodeIdentity(seed=b"\x06" * 32))
            r = await client.post("/", content=b, headers=h)
            assert r.status_code == 401 and r.text.startswith("untrusted")
    assert len(out.read_text().splitlines()) == 3


async def test_readers_are_capped_per_client_and_in_all(tmp_path: Path) -> None:
    flags = ("--max-reading-per-client", "2", "--max-reading", "4", "--body-timeout-s", "30")
    with receiver(tmp_path, *flags) as (base, port, _), trio.fail_after(TIMEOUT_S):
        held = []
        for source in ("127.0.0.2", "127.0.0.2"):
            stream = await connect_from(source, port)
            await stream.send_all(SLOW_HEAD)
            held.append(stream)
        await wait_metric(base, "overflowd_receiver_reading", 2)
        third = await connect_from("127.0.0.2", port)
        await third.send_all(SLOW_HEAD)
        answer = await read_all(third, 10)
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        assert b"retry-after: 1" in answer.lower()
        for source in ("127.0.0.3", "127.0.0.4"):
            stream = await connect_from(source, port)
            await stream.send_all(SLOW_HEAD)
            held.append(stream)
        await wait_metric(base, "overflowd_receiver_reading", 4)
        fifth = await connect_from("127.0.0.5", port)
        await fifth.send_all(SLOW_HEAD)
        answer = await read_all(fifth, 10)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        m = await metrics(base)
        assert m['overflowd_receiver_rejected_total{reason="client_reading_full"}'] == 1
        assert m['overflowd_receiver_rejected_total{reason="reading_full"}'] == 1
        for stream in (*held, third, fifth):
            await stream.aclose()


def test_limit_flags_out_of_range_are_one_clear_line(tmp_path: Path) -> None:
    for flag, value in (
        ("--body-timeout-s", "0"),
        ("--max-connections-per-client", "0"),
        ("--key-rate-per-s", "nan"),
        ("--max-out-bytes", "-1"),
    ):
        done = subprocess.run(
            [*COMMAND, "--out", str(tmp_path / "o.jsonl"), flag, value],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 1, (flag, done.stderr)
        err = done.stderr.decode().strip()
        assert err.startswith(f"overflowd-receive: error: {flag} ") and "\n" not in err
    helped = subprocess.run(
        [sys.executable, "-m", "overflowd.cli.receive", "--help"], capture_output=True, timeout=30
    )
    text = helped.stdout.decode()
    for flag in ("--body-timeout-s", "--max-connections-per-client", "--key-max-bytes"):
        assert flag in text
    assert "[10]" in text and "[16777216]" in text  # defaults are shown


def test_every_limit_flag_is_in_the_receiver_docs() -> None:
    from overflowd.cli.receive import LIMIT_FLAGS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    section = doc[doc.index("### Receiver limits") : doc.index("## Sending")]
    for flag, *_ in LIMIT_FLAGS:
        assert f"`{flag}`" in section, flag
