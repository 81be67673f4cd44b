"""HTTP_AUTH_TOKEN: a bearer token in front of everything but the probes.

``/healthz`` and ``/readyz`` stay open (kubelets and load balancers send no token; their
answers name dependencies, never secrets). Every other path needs
``Authorization: Bearer <token>``, compared in constant time; without it the answer is
401 with ``WWW-Authenticate: Bearer``.

The status page at ``/`` is one static file that holds no data (it polls ``status``),
so its 401 carries the page itself: a browser shows it, and its script asks for the
token (or takes it once from the URL fragment, ``/#token=…``, which never reaches the
server or its logs) and sends it as a bearer header on every poll.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

__all__ = ["OPEN_PATHS", "bearer_auth"]

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
_CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="vabus-aggregator"'}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_auth(token: str, page: Callable[[web.Request], bytes] | None = None) -> Middleware:
    """A middleware that lets a request through only with ``token`` as its bearer
    token, or when its path is one of :data:`OPEN_PATHS`. ``page(request)``, when given,
    is the body of the 401 for ``/`` (the status page)."""
    if not token:
        raise ValueError("bearer_auth needs a token")
    # Digests of equal length: compare_digest's time then tells nothing, not even the
    # token's length.
    expected = hashlib.sha256(token.encode()).digest()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or _authorized(request, expected):
            return await handler(request)
        if request.path == "/" and page is not None:
            return web.Response(
                status=401,
                body=page(request),
                content_type="text/html",
                charset="utf-8",
                headers={**_CHALLENGE, "Cache-Control": "no-cache"},
            )
        return web.json_response(
            {"error": "unauthorized", "detail": "send Authorization: Bearer <HTTP_AUTH_TOKEN>"},
            status=401,
            headers=_CHALLENGE,
        )

    return auth


def _authorized(request: web.Request, expected: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(digest, expected)
