"""``overflowd-query --remote URL``: the same questions, asked of a node's API.

The API answers with the very objects ``--json`` prints (`overflowd.answers`), so the CLI
renders a remote answer exactly as a local one. This is the one module of the CLI that talks
to httpx: whatever it raises leaves here as :class:`RemoteError`, one line naming the URL.
An answer is read raw and capped (``MAX_ANSWER_BYTES``): a node we ask is as untrusted as any
other server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from overflowd import __version__
from overflowd.cli.common import UsageError
from overflowd.errors import OverflowdError

#: Connect, read and write each give up after this long: a node's page of 1000 reports comes
#: in well under a second; a node that does not answer in 10 s is not going to.
REMOTE_TIMEOUT_S = 10.0
#: One answer at most this big: a page of 1000 reports is about 2 MB of JSON.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class RemoteError(OverflowdError):
    """The node's API could not be reached, or refused the question; names the URL."""


def base_url(url: str) -> str:
    """``http://host:port/v1`` from what a person pastes (with or without ``/v1/``)."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise UsageError(f"--remote {url[:80]!r}: expected an http:// or https:// URL")
    return u if u.endswith("/v1") else u + "/v1"


class Remote:
    """A client of one node's API (one connection pool for the command's life)."""

    def __init__(self, url: str, *, timeout_s: float = REMOTE_TIMEOUT_S) -> None:
        self.base = base_url(url)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            headers={"user-agent": f"overflowd-query/{__version__}"},
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, params: Mapping[str, str | int | None]) -> dict[str, Any]:
        """GET ``base/path`` with the given (non-None) params; the JSON object it answers."""
        url = f"{self.base}/{path}"
        query = {k: str(v) for k, v in params.items() if v is not None}
        try:
            with self._client.stream("GET", url, params=query) as answer:
                body = bytearray()
                for chunk in answer.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise RemoteError(f"{url}: answer larger than {MAX_ANSWER_BYTES} bytes")
                status = answer.status_code
        except httpx.HTTPError as exc:
            raise RemoteError(f"{url}: {_why(exc)}") from None
        if status == 400:  # the question is refused (a bad value): usage, as locally
            raise UsageError(f"{_detail(bytes(body))} (said {url})")
        if status != 200:
            raise RemoteError(f"{url}: HTTP {status}: {_detail(bytes(body))}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise RemoteError(f"{url}: the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise RemoteError(f"{url}: the answer is not a JSON object")
        return doc


def _why(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {REMOTE_TIMEOUT_S:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({str(exc)[:120] or 'refused'})"
    return f"{type(exc).__name__}: {str(exc)[:120]}"


def _detail(body: bytes) -> str:
    """The API's own one-line reason (FastAPI's ``detail``), else the start of the body."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # a 422: [{"loc": [...], "msg": ...}, ...]
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg', '')}"
            for d in detail[:3]
            if isinstance(d, dict)
        )
    text = detail if isinstance(detail, str) else body[:200].decode("utf-8", "replace")
    return " ".join(text.split())[:300]
