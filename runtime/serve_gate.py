"""What a request to `annotate-cli serve` must pass before a route sees it (docs/serve.md holds
the threat model these answer).

Every request passes one gate before a route sees it (`Gate`): the token where there is one; a
Host header naming loopback, the bound address or an --allow-host name (a page that rebinds its
own domain name to 127.0.0.1 sends its domain); no Origin other than an --allow-origin one (a
page of another site in the user's browser sends its own). A body is read only as
application/json (what a page can send without asking first is text/plain or a form), and only
up to --max-body bytes, chunked or not (`json_body`). The webhook writes labels only for a
caller holding the token, or from this machine's loopback through the gate.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from .untrusted import JSONError, loads


class Refused(Exception):
    """A request answered with a 4xx and a reason, before or instead of its route's work."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, lower case, without port, brackets or a trailing dot."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h
    name, _, port = h.rpartition(":")
    return (name if name and port.isdigit() else h).rstrip(".")


@dataclass(frozen=True)
class Gate:
    """Who may call the server, decided from a request's headers alone."""

    host: str
    """The address the server is bound to."""
    token: str | None = None
    allow_origins: frozenset[str] = frozenset()
    allow_hosts: frozenset[str] = frozenset()

    def refusal(self, headers: Any) -> Refused | None:
        if self.token is not None and not _authorized(headers.get("authorization"), self.token):
            return Refused(401, "this server needs its token: Authorization: Bearer TOKEN, or basic auth with "
                                "TOKEN as the password")
        host = headers.get("host")
        if not host or not self.host_ok(_host_name(host)):
            return Refused(403, f"Host {host!r} is not this server's (loopback, {self.host}"
                                + "".join(f", {h}" for h in sorted(self.allow_hosts))
                                + "); a name it is reached by goes in --allow-host")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.allow_origins:
            return Refused(403, f"requests from pages of {origin} are refused; a page allowed to call this server "
                                f"goes in --allow-origin")
        return None

    def host_ok(self, name: str) -> bool:
        if name == "localhost" or name in self.allow_hosts or name == self.host.lower():
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False  # a name not listed: what DNS rebinding sends
        bound = ipaddress.ip_address(self.host) if self.host != "localhost" else None
        return ip.is_loopback or (bound is not None and (bound.is_unspecified or ip == bound))


def _authorized(header: str | None, token: str) -> bool:
    if not header:
        return False
    kind, _, value = header.partition(" ")
    if kind.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if kind.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


async def json_body(request: Request) -> Any:
    """The request's JSON body: application/json only, read up to --max-body bytes whatever the
    framing (Content-Length or chunked), parsed within the bounds of runtime/untrusted.py."""
    limit = request.app.state.server.opts.max_body
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise Refused(415, f"the body must be application/json, not {ctype or 'untyped'}")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise Refused(413, f"request body of {size} bytes is over --max-body {limit}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise Refused(413, f"request body is over --max-body {limit} bytes (stopped reading at {n})")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return loads(body) if body else {}
    except JSONError as e:
        raise Refused(400, f"the request body is not JSON: {e}") from None
