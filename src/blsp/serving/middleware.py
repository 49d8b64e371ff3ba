"""The ASGI middleware of ``blsp serve``: body size limit (413), Host check (DNS rebinding), API key.

Each refusal answers in the OpenAI error shape before the request reaches a route.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from blsp.serving.openai_api import error_body


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 (declared or streamed), in the OpenAI shape.

    A body declared too large is read and discarded (up to a bound) before answering, so that the
    client, still uploading, reads the 413 instead of a reset connection.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | None) -> bytes:
        what = f"{size} bytes" if size is not None else "larger than the limit"
        msg = f"request body is {what}; this server accepts at most {self.max_bytes} bytes (--max-body-mb)"
        return json.dumps(error_body(msg, code="request_too_large")).encode()

    async def _send_413(self, send: Any, size: int | None) -> None:
        body = self._message(size)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            drained, cap = 0, max(16 * self.max_bytes, 64 << 20)
            while drained < min(declared, cap):
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                drained += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            return await self._send_413(send, declared)

        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return msg

        async def tracking_send(msg: Any) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._send_413(send, None)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


async def _send_error(
    send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _header(scope: Any, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class HostCheckMiddleware:
    """Answer only requests whose ``Host`` header names an allowed host (any port): DNS rebinding.

    A web page on an attacker's domain that re-points its name to 127.0.0.1 still sends its own
    name as ``Host``; a server bound to loopback therefore accepts only ``localhost``,
    ``127.0.0.1`` and ``[::1]`` (plus ``--allowed-host`` names).
    """

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = {h.lower().strip() for h in allowed}

    @staticmethod
    def hostname(host: str) -> str:
        host = host.strip().lower()
        if host.startswith("["):
            return host[: host.find("]") + 1] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = _header(scope, b"host") or ""
            if self.hostname(host) not in self.allowed:
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                msg = (
                    f"Host header {host[:100]!r} is not allowed on this server; allowed: "
                    f"{', '.join(sorted(self.allowed))} (the operator can add names with --allowed-host)"
                )
                return await _send_error(send, 400, error_body(msg, code="invalid_host"))
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Bearer authentication (``Authorization: Bearer KEY``) on every ``/v1`` route: 401 otherwise."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope.get("path", "").startswith("/v1")
            and scope.get("method") != "OPTIONS"
        ):
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                msg = "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
            elif not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                msg = "Incorrect API key provided"
            else:
                return await self.app(scope, receive, send)
            return await _send_error(
                send,
                401,
                error_body(msg, code="invalid_api_key"),
                [(b"www-authenticate", b'Bearer realm="blsp"')],
            )
        await self.app(scope, receive, send)
