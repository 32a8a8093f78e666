"""POST/GET /v1/subscriptions as FastAPI routes over services/api_subscriptions.py's desk.

Apart from it so that the daemon imports FastAPI only when the API app is built (on its first
request: services/api.py), not at start (issue #16, idle RSS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from overflowd.services.api_peers import read_capped
from overflowd.services.api_subscriptions import (
    _BODY,
    MAX_BODY_BYTES,
    PATH,
    Answer,
    SubscriptionDesk,
    _detail,
)
from overflowd.wire import webhook as wh


def router(desk: Callable[[], SubscriptionDesk | None]) -> APIRouter:
    r = APIRouter()

    async def answer(request: Request, handle: Callable[..., Any]) -> Response:
        d = desk()
        if d is None:
            out = _detail(401, "not a configured peer")
        else:
            body = await read_capped(request, MAX_BODY_BYTES)
            if body is None:
                out = _detail(413, f"body is larger than {MAX_BODY_BYTES} bytes")
            else:
                try:
                    headers = wh.normalize_headers(request.headers.raw)
                except wh.WebhookDecodeError as exc:  # a header given twice: anyone's input
                    out = _detail(400, exc.reason)
                else:
                    who = d.authenticate(headers, body)
                    out = who if isinstance(who, Answer) else await handle(d, who, body)
        return Response(out.body, out.status, media_type="application/json")

    @r.post(
        PATH,
        summary="subscribe to the reports about prefixes the subscriber's DNS record covers",
        responses={
            400: {"description": "malformed body or headers"},
            401: {"description": "not a configured peer, a bad signature, or a replay"},
            403: {"description": "the peer is banned"},
        },
        openapi_extra=_BODY,
    )
    async def subscribe(request: Request) -> Response:
        return await answer(request, lambda d, p, b: d.subscribe(p, b))

    @r.get(
        PATH,
        summary="the calling peer's subscriptions (signed as the POST, over an empty body)",
    )
    async def listing(request: Request) -> Response:
        return await answer(request, lambda d, p, b: d.listing(p))

    return r


__all__ = ["router"]
