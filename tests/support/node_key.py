"""The key of the node behind an API URL, read once from its ``/v1/identity``.

Inbox and subscription requests name their recipient (``peering.message_id(body, key)``), so
a test that signs as a peer needs the key of the node it posts to.
"""

from __future__ import annotations

import base64
import functools

import httpx


@functools.lru_cache(maxsize=64)
def node_key(url: str) -> bytes:
    """``url`` is any URL under the node's ``/v1/`` (e.g. its inbox)."""
    base = url.split("/v1/", 1)[0]
    doc = httpx.get(base + "/v1/identity", timeout=10).json()
    key = base64.b64decode(doc["key"])
    assert len(key) == 32
    return key
