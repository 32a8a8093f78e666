"""The peer inbox's route (POST /v1/inbox) and its response models: FastAPI and pydantic.

Apart from services/api_peers.py so that the daemon imports FastAPI and pydantic only when the
API app is built (on its first request: services/api.py), not at start (issue #16, idle RSS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from overflowd.services.api_peers import PeerInbox, _detail, read_capped
from overflowd.wire import peering


class InboxRefusal(BaseModel):
    index: int
    reason: str


class InboxAnswerOut(BaseModel):
    """How many of the reports sent were stored, already held, and refused (by index)."""

    accepted: int
    duplicates: int
    refused: list[InboxRefusal]


_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["reports"],
                    "properties": {
                        "reports": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["cose", "hops"],
                                "properties": {
                                    "cose": {"type": "string", "description": "base64url COSE"},
                                    "hops": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": peering.MAX_HOPS,
                                    },
                                },
                            },
                        }
                    },
                }
            },
            peering.CBOR: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "CBOR {\"reports\": [[h'COSE_Sign1', hops], ...]}, "
                    "deterministic encoding, no tags (docs/peers.md)",
                }
            },
        },
    }
}


def router(inbox: Callable[[], PeerInbox | None]) -> APIRouter:
    """The inbox route; ``inbox()`` is None when no peers are configured (every sender 401)."""
    r = APIRouter()

    @r.post(
        peering.INBOX_PATH,
        summary="reports a configured peer forwards (signed, batched)",
        response_model=InboxAnswerOut,
        responses={
            400: {"description": "not an inbox body, or malformed headers"},
            401: {"description": "not a configured peer, a bad signature, or a replay"},
            403: {"description": "the peer is banned (docs/peers.md); see Retry-After"},
            413: {"description": "body over peering.inbox_max_body_bytes"},
            415: {"description": "a Content-Type other than application/json or application/cbor"},
            429: {"description": "over the peer's inbound budget; see Retry-After"},
            503: {"description": "the store cannot take reports now; see Retry-After"},
        },
        openapi_extra=_REQUEST_BODY,
    )
    async def inbox_post(request: Request) -> Response:
        box = inbox()
        if box is None:
            return Response(_detail("not a configured peer"), 401, media_type="application/json")
        # A banned peer is turned away before its body is read or anything is verified.
        banned = box.refuse_banned(request.headers)
        if banned is not None:
            result = banned
        else:
            body = await read_capped(request, box.max_body_bytes)
            result = (
                box.oversized()
                if body is None
                else await anyio.to_thread.run_sync(box.handle, request.headers.raw, body)
            )
        headers = {}
        if result.retry_after_s is not None:
            headers["retry-after"] = str(result.retry_after_s)
        return Response(result.body, result.status, headers=headers, media_type="application/json")

    return r


__all__ = ["InboxAnswerOut", "InboxRefusal", "router"]
