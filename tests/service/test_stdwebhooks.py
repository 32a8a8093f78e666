"""The ecosystem's own verifiers accept our deliveries: Standard Webhooks ``v1`` beside ``v1a``.

Issue #9: the ``standardwebhooks`` package (PyPI 1.1, and npm's) verifies only the symmetric
``v1`` scheme, so it refused every delivery overflowd made (``v1a`` only); the first test is
that finding. The rest run the receivers of docs/webhooks.md ("Verifying with the Standard
Webhooks libraries") as real processes on 127.0.0.1 -- the Python one on the PyPI package, the
JavaScript one on the npm package (installed by npm into this session's temporary directory)
under node -- and POST to them over HTTP what our signing produced, then what WebhookDelivery
sends to an endpoint with a secret.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from standardwebhooks.webhooks import WebhookVerificationError

from overflowd import notify
from overflowd.errors import SignatureError
from overflowd.identity import NodeIdentity
from overflowd.receiver import encode_body
from overflowd.store import Store
from overflowd.wire import webhook as wh
from tests.support import cli, npm
from tests.support.reports import make_payload

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
#: Start-up of a receiver process (node or python) and each request: generous, still bounded.
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
SECRET = "whsec_" + base64.b64encode(hashlib.sha256(b"stdwebhooks test").digest()).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(32)).decode()

IDENTITY = NodeIdentity(seed=bytes(range(32)))
STRANGER = NodeIdentity(seed=bytes(range(1, 33)))


def doc_block(lang: str, marker: str) -> str:
    """The one ```lang block of docs/webhooks.md containing ``marker``: the docs' own code."""
    (block,) = [
        b for b in re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S) if marker in b
    ]
    return str(block)


PY_RECEIVER = functools.partial(doc_block, "python", "with the standardwebhooks package")
JS_RECEIVER = functools.partial(doc_block, "js", "npm standardwebhooks")
PY_FRAGMENT = functools.partial(doc_block, "python", "overflowd's library")


def delivery(
    *, secrets: tuple[str, ...] = (SECRET,), identity: NodeIdentity = IDENTITY, n: int = 1
) -> tuple[dict[str, str], bytes, list[str]]:
    """Headers and body as our signing makes them now: one report, or a batch of ``n``."""
    reports = [identity.sign_report(make_payload()) for _ in range(n)]
    if n == 1:
        body, msg_id = encode_body(reports[0]), reports[0].report_id
    else:  # the batch form (OPS-DESIGN): {"reports": [...]}, id from the report ids
        docs = [json.loads(encode_body(r)) for r in reports]
        body = json.dumps({"reports": docs}, separators=(",", ":")).encode()
        ids = ",".join(r.report_id for r in reports).encode()
        msg_id = "batch_" + hashlib.sha256(ids).hexdigest()[:32]
    headers = wh.sign(msg_id, int(time.time()), body, identity.sign, secrets=secrets)
    return headers, body, [r.report_id for r in reports]


# -- the finding -------------------------------------------------------------------------------


def test_the_reference_library_refused_our_v1a_only_deliveries_and_accepts_v1() -> None:
    hook = standardwebhooks.Webhook(SECRET)
    headers, body, _ = delivery(secrets=())
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        hook.verify(body, headers)
    headers, body, _ = delivery()
    assert hook.verify(body, headers) == json.loads(body)
    # Rotation: two secrets, either verifies; a third does not.
    headers, body, _ = delivery(secrets=(OTHER_SECRET, SECRET))
    assert hook.verify(body, headers) == json.loads(body)
    assert standardwebhooks.Webhook(OTHER_SECRET).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        standardwebhooks.Webhook(wh.format_secret(bytes(range(24)))).verify(body, headers)


def test_the_reference_library_reads_our_secret_as_we_do() -> None:
    key = wh.parse_secret(SECRET)
    assert SECRET.endswith("=")
    for text in (SECRET, SECRET.rstrip("=")):  # padding optional in both
        assert standardwebhooks.Webhook(text)._whsecret == key == wh.parse_secret(text)
    headers, body, _ = delivery()
    # Its own signing of our message is our v1 entry, byte for byte.
    at = standardwebhooks.webhooks.datetime.fromtimestamp(
        int(headers["webhook-timestamp"]), tz=standardwebhooks.webhooks.timezone.utc
    )
    theirs = standardwebhooks.Webhook(SECRET).sign(headers["webhook-id"], at, body.decode())
    assert headers["webhook-signature"].split()[0] == theirs


# -- receiver processes ------------------------------------------------------------------------


@dataclass
class Receiver:
    proc: subprocess.Popen[bytes]
    url: str

    def post(self, headers: dict[str, str], body: bytes) -> httpx.Response:
        return httpx.post(self.url, headers=headers, content=body, timeout=REQUEST_TIMEOUT_S)

    def stop(self) -> list[dict[str, Any]]:
        """Stop it; the JSON lines it printed (one per accepted report)."""
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=START_TIMEOUT_S)
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def start(command: list[str], env: dict[str, str], cwd: Path) -> Receiver:
    """Run a receiver that prints ``listening on PORT`` on stderr; wait for that line, bounded."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env={**os.environ, **env},
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while b"\n" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                proc.kill()
                raise AssertionError(f"receiver did not start: {seen!r}")
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=START_TIMEOUT_S)
                raise AssertionError(f"receiver exited {proc.returncode}: {seen!r}")
            seen += chunk
    line = seen.split(b"\n", 1)[0].decode()
    assert line.startswith("listening on "), line
    return Receiver(proc, f"http://127.0.0.1:{int(line.rsplit(' ', 1)[1])}/hook")


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npm's ``standardwebhooks`` (major version 1) in this session's temporary directory."""
    prefix = tmp_path_factory.getbasetemp() / "npm-standardwebhooks"
    try:
        return npm.npm_install(prefix, "standardwebhooks@1")
    except npm.NpmOffline as exc:
        pytest.skip(f"SKIPPED, no network: the npm registry cannot be reached ({exc})")
    except npm.NpmUnavailable as exc:
        pytest.fail(str(exc))


def test_an_unreachable_registry_is_the_one_reason_to_skip(tmp_path: Path) -> None:
    """The fixture's skip path, for real: npm against a closed port on 127.0.0.1."""
    with pytest.raises(npm.NpmOffline, match="ECONNREFUSED"):
        npm.npm_install(
            tmp_path / "x", "standardwebhooks@1", registry="http://127.0.0.1:9/", retries=0
        )
    assert not (tmp_path / "x" / "node_modules" / "standardwebhooks").exists()
    assert npm.is_network_failure("npm error code EAI_AGAIN")
    assert not npm.is_network_failure("npm error code E404\nnpm error 404 Not Found")


@pytest.fixture
def py_receiver(tmp_path: Path) -> Iterator[Receiver]:
    script = tmp_path / "sw_receiver.py"
    script.write_text(PY_RECEIVER())
    r = start([sys.executable, str(script), "0"], {"WEBHOOK_SECRET": SECRET}, tmp_path)
    yield r
    if r.proc.poll() is None:
        r.stop()


@pytest.fixture
def js_receiver(node_modules: Path) -> Iterator[Receiver]:
    script = node_modules.parent / "receiver.js"  # beside node_modules, so require() finds it
    script.write_text(JS_RECEIVER())
    env = {"WEBHOOK_SECRET": SECRET, "OVERFLOWD_NODE_KEY": IDENTITY.public_key_b64}
    r = start([npm.find("node"), str(script), "0"], env, script.parent)
    yield r
    if r.proc.poll() is None:
        r.stop()


def check_receiver(r: Receiver, *, checks_v1a: bool) -> None:
    """What each of the docs' receivers must accept and refuse, over real HTTP."""
    accepted: list[str] = []
    headers, body, ids = delivery()
    assert r.post(headers, body).status_code == 204
    accepted += ids
    headers, body, ids = delivery(secrets=(OTHER_SECRET, SECRET))  # rotation
    assert r.post(headers, body).status_code == 204
    accepted += ids
    headers, body, ids = delivery(n=3)  # a batch
    assert r.post(headers, body).status_code == 204
    accepted += ids

    refused: list[tuple[dict[str, str], bytes]] = []
    headers, body, _ = delivery(secrets=())  # v1a only: these libraries cannot check it
    refused.append((headers, body))
    headers, body, _ = delivery(secrets=(OTHER_SECRET,))  # somebody else's secret
    refused.append((headers, body))
    headers, body, _ = delivery()
    refused.append((headers, body.replace(b'"flow-seen"', b'"flow-gone"')))  # body changed
    stale = wh.sign(headers["webhook-id"], int(time.time()) - 600, body, IDENTITY.sign,
                    secrets=[SECRET])  # fmt: skip
    refused.append((stale, body))
    for h, b in refused:
        answer = r.post(h, b)
        assert answer.status_code == 401, (answer.status_code, answer.text)
        assert answer.text.startswith("v1:")
    # The right secret but another node's Ed25519 key: only a v1a check sees it.
    headers, body, ids = delivery(identity=STRANGER)
    answer = r.post(headers, body)
    if checks_v1a:
        assert (answer.status_code, answer.text) == (401, "v1a: not signed by the node's key")
    else:
        assert answer.status_code == 204
        accepted += ids
    printed = r.stop()
    assert [p["id"] for p in printed] == accepted
    assert {p["kind"] for p in printed} == {"flow-seen"}


def test_the_python_receiver_in_the_docs_verifies_our_deliveries(py_receiver: Receiver) -> None:
    check_receiver(py_receiver, checks_v1a=False)


def test_the_javascript_receiver_in_the_docs_verifies_our_deliveries(
    js_receiver: Receiver,
) -> None:
    check_receiver(js_receiver, checks_v1a=True)


def test_the_javascript_receiver_refuses_what_is_not_a_post_or_too_large(
    js_receiver: Receiver,
) -> None:
    assert httpx.get(js_receiver.url, timeout=REQUEST_TIMEOUT_S).status_code == 405
    headers, body, _ = delivery()
    big = body + b" " * (1 << 20)
    try:
        answer = js_receiver.post(headers, big)
    except httpx.HTTPError:
        pass  # the receiver may close the connection before the client has sent it all
    else:
        assert answer.status_code == 413
    headers, body, _ = delivery()
    assert js_receiver.post(headers, body).status_code == 204  # still serving
    assert len(js_receiver.stop()) == 1


def test_the_npm_package_alone_on_the_exact_bytes(node_modules: Path) -> None:
    """The npm package's own verify() on headers and body as we produced them (stdin)."""
    script = node_modules.parent / "verify_stdin.js"
    script.write_text(
        'const { Webhook } = require("standardwebhooks");\n'
        'const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));\n'
        "const body = Buffer.from(input.body, 'base64');\n"
        "for (const secret of input.secrets) {\n"
        "  try { new Webhook(secret).verify(body, input.headers); console.log('ok'); }\n"
        "  catch (err) { console.log(err.name); }\n"
        "}\n"
    )
    headers, body, _ = delivery(secrets=(SECRET, OTHER_SECRET))
    secrets = [SECRET, OTHER_SECRET, SECRET.rstrip("="), wh.format_secret(bytes(range(40)))]
    stdin = json.dumps(
        {"headers": headers, "body": base64.b64encode(body).decode(), "secrets": secrets}
    )
    run = npm.run_node(script, stdin=stdin)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ok", "ok", "ok", "WebhookVerificationError"]


def test_the_der_wrap_the_docs_name_verifies_v1a_in_node(tmp_path: Path) -> None:
    """node:crypto with the key as DER SubjectPublicKeyInfo: the docs' 12-byte prefix + key."""
    (prefix,) = re.findall(r"the\s+12 bytes `([0-9a-f]{24})`", DOC.read_text())
    script = tmp_path / "der.js"
    script.write_text(
        'const crypto = require("node:crypto");\n'
        "const [prefix, key, signed, sig] = process.argv.slice(2)"
        '.map((h) => Buffer.from(h, "hex"));\n'
        "const pub = crypto.createPublicKey("
        '{ key: Buffer.concat([prefix, key]), format: "der", type: "spki" });\n'
        "console.log(crypto.verify(null, signed, pub, sig));\n"
        "console.log(crypto.verify(null, Buffer.concat([signed, Buffer.from(' ')]), pub, sig));\n"
    )
    headers, body, _ = delivery(secrets=())
    signed = wh.signed_content(headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    sig = base64.b64decode(headers["webhook-signature"].removeprefix("v1a,"))
    args = [prefix, IDENTITY.public_key.hex(), signed.hex(), sig.hex()]
    run = npm.run_node(script, *args)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["true", "false"]


def test_the_overflowd_library_fragment_in_the_docs() -> None:
    code = compile(PY_FRAGMENT(), "webhooks.md", "exec")
    headers, body, _ = delivery()
    scope: dict[str, Any] = {
        "headers": headers,
        "body": body,
        "secret": SECRET,
        "node_key": IDENTITY.public_key,
    }
    exec(code, scope)
    with pytest.raises(SignatureError):
        exec(code, {**scope, "body": body + b" "})
    with pytest.raises(SignatureError):
        exec(code, {**scope, "node_key": STRANGER.public_key})
    with pytest.raises(wh.WebhookDecodeError):  # no v1 entry at all
        exec(code, {**scope, "headers": delivery(secrets=())[0]})


# -- through WebhookDelivery -------------------------------------------------------------------

async def test_webhook_delivery_to_endpoints_with_a_secret(
    py_receiver: Receiver, js_receiver: Receiver, tmp_path: Path
) -> None:
    from overflowd.services import webhook as svc

    endpoint = notify.WebhookEndpoint
    urls = [py_receiver.url, js_receiver.url]
    settings = svc.WebhookSettings(
        endpoints=tuple(
            endpoint(url=url, prefixes=("198.51.100.0/24",), secret=SECRET) for url in urls
        ),
        allow_prefixes=("127.0.0.0/8",),
        require_https=False,
        total_timeout_s=5.0,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        poll_interval_s=0.05,
    )
    ids = []
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        for _ in range(4):
            r = IDENTITY.sign_report(make_payload(dst="198.51.100.9"))
            store.add_report(r, received_ms=int(time.time() * 1000), via="local")
            assert svc.enqueue(store, r, urls) == 2
            ids.append(r.report_id)
        counts = await svc.WebhookDelivery(store, IDENTITY, settings).drain(timeout_s=30)
    assert counts["pending"] == counts["dead"] == 0
    for r in (py_receiver, js_receiver):
        assert sorted(p["id"] for p in r.stop()) == sorted(ids)


# -- overflowd key webhook-secret --------------------------------------------------------------


def test_key_webhook_secret_prints_a_secret_the_libraries_read(tmp_path: Path) -> None:
    first = cli.run("overflowd", "key", "webhook-secret", home=tmp_path / "home")
    second = cli.run("overflowd", "key", "webhook-secret", home=tmp_path / "home")
    assert (first.code, first.err, second.code) == (0, "", 0)
    secret = first.out.strip()
    assert first.out == secret + "\n" and secret != second.out.strip()
    assert len(wh.parse_secret(secret)) == wh.NEW_SECRET_BYTES == 32
    assert standardwebhooks.Webhook(secret)._whsecret == wh.parse_secret(secret)
    headers, body, _ = delivery(secrets=(secret,))
    standardwebhooks.Webhook(secret).verify(body, headers)
    assert not (tmp_path / "home").exists()  # needs no node home, creates none


def test_key_webhook_secret_out_writes_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "hook.secret"
    made = cli.run("overflowd", "key", "webhook-secret", "--out", str(path))
    assert (made.code, made.out, made.err) == (0, f"{path}\n", "")
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(wh.parse_secret(text)) == 32
    again = cli.run("overflowd", "key", "webhook-secret", "--out", str(path))
    assert again.code == 1 and again.out == ""
    assert again.err == (
        f"overflowd: error: --out {path}: exists; refusing to replace a secret without --force\n"
    )
    assert path.read_text() == text
    forced = cli.run("overflowd", "key", "webhook-secret", "--out", str(path), "--force")
    assert forced.code == 0 and path.read_text() != text
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook.secret"]  # no temporary left


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing/dir/s", "cannot write: No such file or directory"), (".", "is a directory")],
)
def test_key_webhook_secret_out_refused(tmp_path: Path, where: str, message: str) -> None:
    target = tmp_path / where
    run = cli.run("overflowd", "key", "webhook-secret", "--out", str(target))
    assert (run.code, run.out) == (1, "")
    assert run.err == f"overflowd: error: --out {target}: {message}\n"
    assert list(tmp_path.iterdir()) == []
