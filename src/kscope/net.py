"""Is a server there, and is it the kind asked for? One short connection, so an unreachable host is an error at once
rather than after retries, and one short request, so a server of another kind is too."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request

from kscope.errors import KscopeError


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """Does ``host:port`` accept a TCP connection within ``timeout`` seconds?"""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _host_port(url: str) -> tuple[str, int] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a bad port, an unclosed [IPv6 bracket
        return None
    return (parts.hostname, port) if parts.scheme in ("http", "https") and parts.hostname else None


def check_url(url: str, flag: str) -> None:
    """Refuse, before any work, ``url`` unless it is ``http(s)://host[:port]/...`` and something answers there."""
    where = _host_port(url)
    if where is None:
        raise KscopeError(f"{flag} {url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    if not reachable(*where):
        raise KscopeError(f"{flag} {url}: nothing answers at {where[0]}:{where[1]}")


def _answer(req: urllib.request.Request, timeout: float) -> tuple[str, object]:
    """``(status text, parsed JSON or None)`` of one request."""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read(1 << 20)
            status = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}", None
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}", None
    try:
        return status, json.loads(body)
    except ValueError:
        return f"{status}, not JSON", None


def check_openai_url(url: str, flag: str, model: str, timeout: float = 5.0) -> None:
    """Refuse, before any work, an ``url`` that is not an OpenAI-style API: it must list its models (``GET /models``) or
    answer a one-token chat completion (``POST /chat/completions``) in the OpenAI reply shape."""
    check_url(url, flag)
    base = url.rstrip("/")
    status, data = _answer(urllib.request.Request(base + "/models"), timeout)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "ok"}], "max_tokens": 1}).encode()
    chat_status, chat = _answer(urllib.request.Request(base + "/chat/completions", body, {"Content-Type": "application/json"}),
                                timeout)
    if isinstance(chat, dict) and isinstance(chat.get("choices"), list):
        return
    raise KscopeError(f"{flag} {url}: the server there is not an OpenAI-style API (GET /models: {status}; POST "
                      f"/chat/completions: {chat_status}); give the base URL that serves both, e.g. http://127.0.0.1:8000/v1")
